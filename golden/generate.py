"""The golden generator: the cases, the Tracer that names a forward's intermediates, the re-run
verifier, and the long-sequence benchmark. It needs torch and imports the reference; the checker
for other implementations is golden/verify.py beside it, numpy only. Reached through the CLI:

    python m3_reference.py golden --out golden/     # every case from fixed seeds (bit-identical on one machine)
    python m3_reference.py verify golden/           # the reference re-run on the committed cases
    python m3_reference.py bench                    # long-sequence sparse attention, in fresh processes

A case is a directory: config.json + model.safetensors (the upstream layout, loadable by any
implementation's usual loader), inputs.safetensors and outputs.safetensors (end results and
named intermediates, in forward order). golden/manifest.json lists each case's description,
dtype, end results, required tensors, per-tensor tolerances, tensor names and shapes, and the
sha256 of every file. The tolerance and near-tie rules, and the comparison itself, live in
golden/verify.py, which this module imports, so the generator and the checker share one copy.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import m3_reference as m3
from golden import verify as V

GOLDEN_MEDIA = dict(image_grids=((1, 2, 2), (1, 2, 4)), video_hw=(2, 2))   # 24 patches keep the pixels small


def golden_config(**overrides) -> m3.M3Config:
    """The models behind the golden cases: the tiny preset made smaller so golden/ stays small."""
    return replace(m3.M3Config.tiny(), vocab_size=128, hidden_size=32, head_dim=8, rotary_dim=4,
                   sparse_index_dim=8, sparse_topk_blocks=3, dense_intermediate_size=48,
                   intermediate_size=16, shared_intermediate_size=16, num_local_experts=6,
                   image_token_index=120, video_token_index=121, vision_start_token_index=122,
                   vision_end_token_index=123, projector_hidden_size=32, **overrides)


class Tracer:
    """Records named intermediates of one forward through forward hooks, in forward order.

    Router and indexer internals are recomputed from the hooked module inputs with the same pure
    functions the forward calls, so the model code carries no tracing. Names, in order:
    `vision.{image,video}.{patches,projected,features}`, `embeddings`, then per layer
    `layers.{i}.indexer.{block_scores,block_ids}`, `layers.{i}.router.{scores,ids,weights}`,
    `layers.{i}.hidden`; `hidden` (after the final norm); per MTP depth `mtp.{d}.layer.indexer.*`,
    `mtp.{d}.layer.router.*`, `mtp.{d}.hidden`.
    """

    def __init__(self, model: m3.MiniMaxM3, media: list[str], prefix: str = ""):
        self.out: dict[str, torch.Tensor] = {}
        self.prefix = prefix
        self.handles = []
        text = model.language_model.model
        # hooks on the pieces themselves (not on TextModel.forward), so a streamed run is traced alike
        self._pre(text.layers[0], self._enter)
        for i, layer in enumerate(text.layers):
            self._layer(layer.self_attn, layer.ffn_module, lambda i=i: f"layers.{i}.")
            self._post(layer, lambda y, i=i: self._put(f"layers.{i}.hidden", y))
        self._post(text.norm, lambda y: self._put("hidden", y))
        self.depth = -1                    # the MTP depth running (0-based; a repeated depth runs M times),
                                           # reset as each forward enters layer 0
        for depth in text.mtp["layers"] if model.config.num_mtp_modules else []:
            self._pre(depth, lambda a: setattr(self, "depth", self.depth + 1))
            self._layer(depth.self_attn, depth.ffn_module, lambda: f"mtp.{self.depth}.layer.")
            self._post(depth.final_layernorm, lambda y: self._put(f"mtp.{self.depth}.hidden", y))
        if model.config.vision is not None:
            # each of the three runs once per media kind, images first
            for module, part in [(model.vision_tower, "patches"), (model.multi_modal_projector, "projected"),
                                 (model.patch_merge_mlp, "features")]:
                calls = iter(media)
                self._post(module, lambda y, part=part, calls=calls: self._put(f"vision.{next(calls)}.{part}", y))

    def _enter(self, args):
        """A forward enters layer 0: its input is the embeddings; no MTP depth has run yet."""
        self._put("embeddings", args[0])
        self.depth = -1

    def _pre(self, module: nn.Module, fn):
        self.handles.append(module.register_forward_pre_hook(lambda m, args: fn(args)))

    def _post(self, module: nn.Module, fn):
        self.handles.append(module.register_forward_hook(lambda m, args, y: fn(y)))

    def _put(self, name: str, t: torch.Tensor):
        self.out[self.prefix + name] = t.detach().clone()

    def _update(self, named: dict[str, torch.Tensor]):
        for name, t in named.items():
            self._put(name, t)

    def _layer(self, attn: m3.Attention, ffn: nn.Module, prefix):
        """Indexer and router hooks of one layer; prefix() names it when it runs."""
        if attn.sparse:
            self._pre(attn, lambda a: self._update(indexer_outputs(attn, a[0], a[1], prefix() + "indexer.", *a[2:3])))
        if isinstance(ffn, m3.MoE):
            self._pre(ffn, lambda a: self._update(router_outputs(ffn, a[0], prefix() + "router.")))

    def close(self):
        for h in self.handles:
            h.remove()


def router_outputs(moe: m3.MoE, x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """scores: biased fp32 router scores [T, E] (what the choice ranks); ids: chosen experts sorted
    ascending [T, K]; weights: their routing weights in that order [T, K] fp32."""
    x_TD = x.reshape(-1, x.shape[-1])
    p = torch.sigmoid(F.linear(x_TD.float(), moe.gate.weight.float()))
    w, ids = m3.route(x_TD, moe.gate.weight, moe.e_score_correction_bias, moe.top_k, moe.scaling)
    order = ids.argsort(-1)
    return {prefix + "scores": p + moe.e_score_correction_bias.float(), prefix + "ids": ids.gather(-1, order),
            prefix + "weights": w.gather(-1, order)}


def indexer_outputs(attn: m3.Attention, x: torch.Tensor, layout: m3.Layout, prefix: str,
                    cache: m3.LayerCache | None = None) -> dict[str, torch.Tensor]:
    """block_scores: unscaled fp32 block scores before forcing [B, Hi, S, nb] (-inf: no causal key);
    block_ids: the selection [B, Hi, S, topk] int32, ascending, -1 padded. With a cache (before this
    call's keys join it), the new queries sit after the cached slots and rank all index keys. With
    padded rows (the layout's spans), each row's own tokens as if it ran alone, `row.{b}.` + prefix:
    its new queries after its own cached tokens."""
    history = cache.ik if cache is not None and cache.length else None
    if layout.spans is None:
        return _selection(attn, x, layout, prefix, history)
    past, out = (0 if history is None else history.shape[1]), {}
    for b, (start, end) in enumerate(layout.spans):
        lo, hi = max(past, start), min(past + x.shape[1], end)               # the row's new tokens
        if hi > lo:
            new = slice(lo - past, hi - past)
            row = m3.Layout(*(t[b:b + 1, new] for t in (layout.positions, layout.cos, layout.sin)))
            own = None if start >= past else history[b:b + 1, start:past]     # the row's cached index keys
            out.update({f"row.{b}.{k}": t for k, t in _selection(attn, x[b:b + 1, new], row, prefix, own).items()})
    return out


def _selection(attn: m3.Attention, x: torch.Tensor, layout: m3.Layout, prefix: str,
               history: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The indexer on x's queries after `history` [B, past, Di], the cached index keys (or none)."""
    iq, ik = attn.index_qk(x, layout.cos, layout.sin)
    past = 0 if history is None else history.shape[1]
    if past:
        ik = torch.cat([history, ik], dim=1)
    scores = m3.index_block_scores(iq, ik, past, attn.block_size)
    ids = m3.select_blocks(scores, past, attn.block_size, attn.topk, attn.init_blocks, attn.local_blocks)
    return {prefix + "block_scores": scores, prefix + "block_ids": ids}


# ---- cases ----------------------------------------------------------------------------------

def _model_inputs(cfg: m3.M3Config, seed: int, batch: int, length: int, media: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if media:
        inputs = m3.demo_inputs(cfg, seed, **GOLDEN_MEDIA)
        inputs["labels"][0, ::7] = -100
        return inputs
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=g)
    return dict(input_ids=ids, labels=ids.masked_fill(torch.rand(batch, length, generator=g) < 0.15, -100))


def run_model_case(path: Path, dtype: torch.dtype, inputs: dict) -> dict[str, torch.Tensor]:
    """Load the case's checkpoint and run the forward with a Tracer: every named output, in order."""
    model = m3.from_pretrained(path, dtype=dtype)
    media = [m for m, key in (("image", "pixel_values"), ("video", "pixel_values_videos")) if key in inputs]
    tracer = Tracer(model, media)
    with torch.no_grad():
        out = model(**{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()})
    tracer.close()
    return named_outputs(tracer.out, out)


def named_outputs(traced: dict[str, torch.Tensor], out: m3.M3Output) -> dict[str, torch.Tensor]:
    """The golden names in forward order: the traced intermediates with `logits` right after
    `hidden` (the head runs before the MTP depths), then `mtp.{d}.logits` and the losses."""
    result = {}
    for name, t in traced.items():
        result[name] = t
        if name == "hidden":
            result["logits"] = out.logits
    result.setdefault("logits", out.logits)
    result.update({f"mtp.{d}.logits": lg for d, lg in enumerate(out.mtp_logits)})
    result.update({name: getattr(out, name) for name in ("lm_loss", "mtp_loss", "loss")
                   if getattr(out, name) is not None})
    return result


def run_component_case(path: Path, name: str, inputs: dict) -> dict[str, torch.Tensor]:
    """Component cases: the component's weights come from the case checkpoint (full upstream keys)."""
    from safetensors.torch import load_file
    cfg = m3.M3Config.from_json(path / "config.json")
    weights = load_file(path / m3.SINGLE_FILE) if (path / m3.SINGLE_FILE).exists() else {}

    def module(m: nn.Module, prefix: str) -> nn.Module:
        m.load_state_dict({k.removeprefix(prefix): t for k, t in weights.items() if k.startswith(prefix)})
        return m.eval()
    L1 = "language_model.model.layers.1."
    with torch.no_grad():
        if name == "rms_norm":
            return {"y": m3.rms_norm(inputs["x"], weights["language_model.model.layers.0.input_layernorm.weight"], cfg.rms_norm_eps)}
        if name == "swiglu_oai":
            return {"out": m3.swiglu_oai(inputs["gate"], inputs["up"], cfg.swiglu_alpha, cfg.swiglu_limit)}
        if name == "rope":
            cos, sin = m3.rope_angles(inputs["position_ids"], cfg.rotary_dim, cfg.rope_theta)
            q = m3.norm_rope(inputs["q"], weights["language_model.model.layers.0.self_attn.q_norm.weight"], cos, sin, cfg.rms_norm_eps)
            return {"cos": cos, "sin": sin, "q": q}
        if name == "vision_rope":
            segments = m3.video_segments(inputs["grid_thw"].tolist(), cfg.vision.vision_segment_max_frames)
            positions = m3.vision_positions(segments, cfg.vision.spatial_merge_size)
            cos, sin = m3.vision_rope_angles(positions, cfg.vision.head_dim, cfg.vision.rope_theta)
            return {"positions": positions, "cos": cos, "sin": sin, "q": m3.rope(inputs["q"], cos, sin)}
        if name == "moe":
            moe = module(m3.MoE(cfg), L1 + "block_sparse_moe.")
            return {**router_outputs(moe, inputs["x"], "router."), "out": moe(inputs["x"])}
        if name in ("attention", "sparse_attention"):
            layer = 0 if name == "attention" else 1
            attn = module(m3.Attention(cfg, sparse=cfg.is_sparse(layer)), f"language_model.model.layers.{layer}.self_attn.")
            layout = m3.Layout(inputs["position_ids"], *m3.rope_angles(inputs["position_ids"], cfg.rotary_dim,
                                                                         cfg.rope_theta))
            extra = indexer_outputs(attn, inputs["x"], layout, "indexer.") if attn.sparse else {}
            return {**extra, "out": attn(inputs["x"], layout)}
        if name == "vision":
            model = m3.MiniMaxM3(cfg)
            model.load_state_dict({**model.state_dict(), **weights})
            tracer = Tracer(model.eval(), ["image", "video"])
            model.vision_features(inputs["pixel_values"], inputs["image_grid_thw"])
            model.vision_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
            tracer.close()
            return tracer.out
    if name.startswith("preprocess_"):
        return run_processor_case(name, cfg, inputs)
    return run_piece_case(name, cfg, weights, inputs)


def run_processor_case(name: str, cfg: m3.M3Config, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The processor cases: resize, normalise, patchify and expand the prompt (no weights)."""
    if name == "preprocess_image":
        out, grids = {}, []
        for i in range(sum(k.startswith("image.") for k in inputs)):
            frames = m3.resized_frames(inputs[f"image.{i}"], cfg, video=False)
            rows, grid = m3.pixel_rows(frames, cfg)
            out.update({f"image.{i}.resized": frames[0].permute(1, 2, 0), f"image.{i}.pixel_values": rows,
                        f"image.{i}.grid_thw": torch.tensor([grid])})
            grids.append(grid)
        return {**out, "expanded_ids": m3.expand_prompt(inputs["input_ids"], grids, None, cfg=cfg)}
    if name == "preprocess_video":
        frames = m3.resized_frames(inputs["frames"], cfg, video=True)
        rows, grid = m3.pixel_rows(frames, cfg)
        stamps = m3.video_timestamps(frames.shape[0], grid[0], cfg, float(inputs["fps"]), inputs["frame_indices"].tolist())
        return {"video.resized": frames.permute(0, 2, 3, 1), "video.pixel_values": rows,
                "video.grid_thw": torch.tensor([grid]), "video.timestamps": torch.tensor(stamps),
                "expanded_ids": m3.expand_prompt(inputs["input_ids"], None, [grid], [inputs["timestamp_ids"].tolist()],
                                              cfg=cfg)}
    raise ValueError(f"unknown processor case {name!r}")


def run_piece_case(name: str, cfg: m3.M3Config, weights: dict[str, torch.Tensor],
                   inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The component cases of the pieces around the layers: the multimodal splice, the MTP fusion,
    the losses and MXFP8 dequantisation (weights under their checkpoint keys)."""
    T = "language_model.model."
    with torch.no_grad():
        if name == "splice":
            e = m3.splice(F.embedding(inputs["input_ids"], weights[T + "embed_tokens.weight"]), inputs["input_ids"],
                       inputs["image_features"], cfg.image_token_index, "image")
            return {"embeddings": m3.splice(e, inputs["input_ids"], inputs["video_features"], cfg.video_token_index, "video")}
        if name == "mtp_fusion":                     # MTPDepth.forward up to its decoder layer
            depth = T + "mtp.layers.0."
            e = F.embedding(m3.mtp_input_ids(inputs["input_ids"], 1), weights[T + "embed_tokens.weight"])
            e_n = m3.rms_norm(e, weights[depth + "enorm.weight"], cfg.rms_norm_eps)
            h_n = m3.rms_norm(inputs["hidden"], weights[depth + "hnorm.weight"], cfg.rms_norm_eps)
            return {"embedding": e, "embedding.normed": e_n, "hidden.normed": h_n,
                    "fused": F.linear(torch.cat([e_n, h_n], dim=-1), weights[depth + "eh_proj.weight"])}
        if name == "losses":
            out = m3.M3Output(inputs["logits"], [inputs[f"mtp.{d}.logits"] for d in range(cfg.num_mtp_modules)])
            out = m3.add_losses(out, inputs["labels"], cfg.mtp)
            return {"lm_loss": out.lm_loss, "mtp_loss": out.mtp_loss, "loss": out.loss}
        if name == "mxfp8":
            return {"weight": m3.dequant_mxfp8(inputs["weight"].view(torch.float8_e4m3fn), inputs["weight_scale_inv"])}
    raise ValueError(f"unknown component case {name!r}")


def _component_inputs(name: str, cfg: m3.M3Config, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale
    S = 37                                                   # not a multiple of the block size (8)
    positions = torch.arange(S).expand(2, S)
    if name == "rms_norm":
        return {"x": r(2, 13, cfg.hidden_size, scale=3.0)}
    if name == "swiglu_oai":                                 # inside, beyond +-limit, and huge
        return {"gate": torch.cat([r(64, scale=4.0), torch.tensor([-1e30, -8.0, 7.0, 8.0, 1e30])]),
                "up": torch.cat([r(64, scale=4.0), torch.tensor([1e30, 8.0, -7.0, -8.0, -1e30])])}
    if name == "rope":
        return {"position_ids": positions * 11, "q": r(2, S, cfg.num_attention_heads, cfg.head_dim)}
    if name == "vision_rope":
        grid = torch.tensor([[1, 2, 4], [cfg.vision.vision_segment_max_frames + 1, 2, 2]])
        return {"grid_thw": grid, "q": r(int(grid.prod(-1).sum()), cfg.vision.num_attention_heads, cfg.vision.head_dim)}
    if name == "moe":
        return {"x": r(1, 13, cfg.hidden_size)}
    if name in ("attention", "sparse_attention"):
        return {"x": r(2, S, cfg.hidden_size), "position_ids": positions}
    if name == "vision":
        inputs = m3.demo_inputs(cfg, seed, **GOLDEN_MEDIA)
        return {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
    pixels = lambda *shape: torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    img, vid = cfg.image_token_index, cfg.video_token_index
    ids = lambda *shape: torch.randint(0, cfg.image_token_index, shape, generator=g)
    if name == "splice":                 # images in both rows, the video's rows between them (row-major)
        input_ids = ids(2, 12)
        input_ids[0, 2:5], input_ids[0, 7:9], input_ids[1, 0:2], input_ids[1, 4:7] = img, vid, vid, img
        return {"input_ids": input_ids, "image_features": r(6, cfg.hidden_size), "video_features": r(4, cfg.hidden_size)}
    if name == "mtp_fusion":
        return {"input_ids": ids(2, 13), "hidden": r(2, 13, cfg.hidden_size, scale=2.0)}
    if name == "losses":                 # -100 inside and at the last positions, where depth 2's targets end
        labels = ids(2, 11)
        labels[0, [3, 9, 10]], labels[1, [0, 5]] = -100, -100
        logits = {f"mtp.{d}.logits": r(2, 11, cfg.vocab_size, scale=3.0) for d in range(cfg.num_mtp_modules)}
        return {"logits": r(2, 11, cfg.vocab_size, scale=3.0), **logits, "labels": labels}
    if name == "mxfp8":                  # 80 inputs: 3 blocks, the last one partial; scales 2^-60 .. 2^60
        codes = torch.arange(256, dtype=torch.uint8)
        codes = codes[(codes & 0x7F) != 0x7F]                 # every e4m3 code but the two NaNs
        weight = codes[torch.randint(0, codes.numel(), (6, 80), generator=g)]
        return {"weight": weight, "weight_scale_inv": torch.randint(67, 188, (6, 3), generator=g, dtype=torch.uint8)}
    if name == "preprocess_image":       # no resize; 56 up and 112 down; aspect 35 with a short side under 14 px
        return {"image.0": pixels(56, 56, 3), "image.1": pixels(50, 120, 3), "image.2": pixels(12, 420, 3),
                "input_ids": torch.tensor([[5, img, 6, 7, img, 8, img, 9]])}
    if name == "preprocess_video":       # 3 frames (padded to 4); 70 / 28 = 2.5 rounds to 2 (half to even)
        return {"frames": pixels(3, 45, 70, 3), "fps": torch.tensor(2.5), "frame_indices": torch.tensor([0, 4, 9]),
                "timestamp_ids": torch.tensor([[100, 110], [101, 110]]), "input_ids": torch.tensor([[5, 6, vid, 7]])}
    raise ValueError(name)


# component cases: name (after "component-"), the component run, its seed, config changes from
# golden_config(), the end results, `pins` (patterns of the other outputs a foreign file must
# hold: see required_outputs) and what the case covers
COMPONENT_CASES = [
    dict(name="rms_norm", component="rms_norm", seed=0, end_results=["y"],
         description="Gemma RMSNorm of layer 0's input_layernorm on [2, 13, D] inputs of scale 3"),
    dict(name="swiglu_oai", component="swiglu_oai", seed=1, end_results=["out"],
         description="SwiGLU-OAI on values inside, at and beyond +-limit, and +-1e30 (gate and up clamps)"),
    dict(name="rope", component="rope", seed=2, end_results=["q"],
         description="per-head q norm + partial NeoX RoPE (rotary_dim 4 of head_dim 8) at positions 0, 11, ..., 396"),
    dict(name="vision_rope", component="vision_rope", seed=3, end_results=["q"],
         description="3D RoPE positions in merge-window order for an image and a video of max_frames + 1 groups"),
    dict(name="moe", component="moe", seed=4, end_results=["out"], pins=[r"router\.(ids|weights)"],
         description="router (biased scores, ids, weights) and MoE output of layer 1, 13 tokens"),
    dict(name="attention", component="attention", seed=5, end_results=["out"],
         description="dense causal GQA attention of layer 0 (4 query / 2 KV heads), S = 37"),
    dict(name="sparse_attention", component="sparse_attention", seed=6, overrides=dict(sparse_topk_blocks=6),
         end_results=["out"], pins=[r"indexer\.block_ids"],
         description="indexer block scores/ids and block-sparse attention of layer 1, S = 37: not a multiple "
                     "of the block size 8, top-6 above its 5 blocks so every causal block is kept"),
    dict(name="sparse_attention_top3", component="sparse_attention", seed=8, end_results=["out"],
         pins=[r"indexer\.block_ids"],
         description="as sparse_attention with top-3 (1 init + 1 local forced) of the 5 blocks: queries in "
                     "blocks 3 and 4 drop 1 and 2 of their causal blocks"),
    dict(name="vision", component="vision", seed=7, end_results=["vision.image.features", "vision.video.features"],
         description="vision tower, projector and merger: images of grids (1, 2, 2) and (1, 2, 4) and a video of "
                     "3 temporal groups cut into segments of 2"),
    dict(name="splice", component="splice", seed=9, end_results=["embeddings"],
         description="multimodal splice: embed_tokens of 2 rows of 12 ids, then 6 image and 4 video feature rows "
                     "put at their placeholders in row-major order (images in both rows, a video run in each)"),
    dict(name="mtp_fusion", component="mtp_fusion", seed=10, end_results=["fused"],
         description="MTP depth 1's input: eh_proj(cat[enorm(embed_tokens(ids shifted left by 1, tail 0)), "
                     "hnorm(hidden)]), embedding first; hidden stands for the main model's output after its norm"),
    dict(name="losses", component="losses", seed=11, overrides=dict(num_mtp_modules=2), end_results=["loss"],
         pins=[r"lm_loss|mtp_loss"],
         description="lm_loss = CE(logits[:, i], labels[:, i + 1]); mtp_loss = 0.1 / 2 * sum_k CE(mtp.{k-1}.logits"
                     "[:, i], labels[:, i + 1 + k]) for two depths, each mean over its own valid targets (-100 and "
                     "targets past the end skipped); loss = their sum"),
    dict(name="mxfp8", component="mxfp8", seed=12, end_results=["weight"],
         description="MXFP8 dequantisation w[o, i] = e4m3(weight[o, i]) * 2^(weight_scale_inv[o, i // 32] - 127) "
                     "of a [6, 80] weight (every e4m3 code but NaN; 3 scale columns = ceil(80 / 32), the last block "
                     "partial; E8M0 scales from 2^-60 to 2^60); inputs are the raw bytes, uint8"),
    dict(name="router_bias", component="moe", seed=14, end_results=["out"], pins=[r"router\.(ids|weights)"],
         weights=lambda m: bias_decides_(m),
         description="the MoE of layer 1 where the correction bias decides: gate weights scaled by 0.01 (every "
                     "expert's sigmoid score within 0.01 of 0.5), bias 6 + 0.003 e for expert e; in fp32 the "
                     "0.003 steps rank the experts, bf16 (spacing 2^-5 at 6) would round them all to 6"),
]


def bias_decides_(model: m3.MiniMaxM3) -> m3.MiniMaxM3:
    """Layer 1's router made to hinge on its correction bias: near-equal affinities, biases 0.003 apart."""
    moe = model.language_model.model.layers[1].block_sparse_moe
    with torch.no_grad():
        moe.gate.weight.mul_(0.01)
        moe.e_score_correction_bias.copy_(6.0 + 0.003 * torch.arange(moe.e_score_correction_bias.numel()))
    return model


def golden_cases() -> list[dict]:
    """Every case: name, description, kind, dtype, the model config, how to make inputs and run it,
    its end results and `pins` (required_outputs)."""
    base = golden_config()
    text = replace(base, vision=None)
    cases = [dict(c, name=f"component-{c['name']}", kind="component", dtype="float32",
                  config=replace(base, **c.get("overrides", {})))
             for c in COMPONENT_CASES]
    cases += [
        dict(name="preprocess-image", kind="component", component="preprocess_image", dtype="float32", seed=200,
             config=base, end_results=[f"image.{i}.pixel_values" for i in range(3)] + ["expanded_ids"],
             pins=[r"image\.\d\.grid_thw"],
             description="three images through the processor: 56x56 (no resize), 50x120 (to 56x112: one side "
                         "rounds up, one down), 12x420 (aspect 35, short side under 14 px: to 28x420); the "
                         "prompt's three placeholders expanded with start/end ids"),
        dict(name="preprocess-video", kind="component", component="preprocess_video", dtype="float32", seed=201,
             config=base, end_results=["video.pixel_values", "expanded_ids"], pins=[r"video\.(grid_thw|timestamps)"],
             description="3 frames of 45x70 (to 56x56: 2.5 rounds to 2), padded to 4 frames = 2 temporal groups, "
                         "source fps 2.5 at frame indices 0, 4, 9 (timestamps 0.0 and 3.6 s); the placeholder "
                         "expanded with per-group timestamp ids"),
        dict(name="text", kind="model", config=text, dtype="float32", seed=100, batch=2, length=29, media=False,
             description="text-only model, batch of 2, 29 tokens, MTP depth 1, labels with -100"),
        dict(name="vision-language", kind="model", config=base, dtype="float32", seed=101, media=True,
             description="two images of different grids and a video of 3 temporal groups (segments of 2)"),
        dict(name="sparse-edge-b4", kind="model", seed=102, batch=1, length=203, media=False, dtype="float32",
             config=replace(text, sparse_block_size=4, sparse_topk_blocks=5, sparse_init_block=2, sparse_local_block=2),
             pins=[r"layers\.\d+\.indexer\.block_ids"],
             description="block 4, top-5 with 2 init + 2 local blocks, 203 tokens: most of 51 blocks dropped"),
        dict(name="sparse-edge-b7", kind="model", seed=103, batch=1, length=150, media=False, dtype="float32",
             config=replace(text, sparse_block_size=7, sparse_topk_blocks=3, sparse_init_block=2, sparse_local_block=2,
                            num_mtp_modules=0), pins=[r"layers\.\d+\.indexer\.block_ids"],
             description="block 7, top-3 with 2 init + 2 local blocks, 150 tokens: from block 3 on, more are "
                         "forced than fit, so the init blocks and the own block stay and the other local drops"),
        dict(name="mtp-depth-2", kind="model", config=replace(text, num_mtp_modules=2), dtype="float32", seed=104,
             batch=2, length=23, media=False, description="two MTP depths, pinning the recursion h_1 -> h_2"),
        dict(name="bf16", kind="model", config=base, dtype="bfloat16", seed=101, media=True,
             description="the vision-language case with bf16 weights and activations"),
    ]
    cases += decoding_cases(text) + cache_cases() + mtp_variant_cases(text, base)
    cases += gradient_cases([c for c in cases if c["name"] in ("text", "mtp-depth-2", "vision-language")])
    cases += training_cases()
    return [dict(c, end_results=c.get("end_results", ["logits"])) for c in cases]


def training_cases() -> list[dict]:
    """Losses a training port computes beyond the forward: MSA's indexer KL on a cache case's
    weights, the losses of a batch split across ranks on mtp-depth-2's."""
    return [
        dict(name="indexer-kl", kind="kl", checkpoint="cache-decode-boundary", config=cache_config(), dtype="float32",
             seed=130, batch=2, length=40, end_results=["indexer_loss"],
             pins=[r"layers\.\d+\.(indexer\.block_ids|indexer_kl)", r"grad\..+"],
             description="indexer_loss='kl' (MiniMax MSA's indexer distillation) on 2 rows of 40 tokens, block 8, "
                         "top-3: layer 1's `layers.1.indexer_kl` (mean over rows, index heads and queries of KL("
                         "teacher || student) over each query's selected causal keys), `indexer_loss` (their sum) "
                         "and its gradient `grad.<checkpoint key>` on the only parameters it reaches, the indexer's"),
        dict(name="mtp-loss-split", kind="split", checkpoint="mtp-depth-2",
             config=golden_config(num_mtp_modules=2, vision=None),
             dtype="float32", seed=131, batch=4, length=23, split=[1, 3], end_results=["loss"],
             pins=[r"part\.\d+\..+", r"(lm_|mtp_)?loss"],
             description="a batch of 4 rows split 1 + 3 across ranks (input `split`), labels with -100 at different "
                         "rates: per part p `part.{p}.lm_loss`, `.mtp_loss`, `.loss`, the valid target counts "
                         "`part.{p}.lm_tokens` [1] and `part.{p}.mtp_tokens` [2] (per depth) and each depth's mean "
                         "CE `part.{p}.mtp_ce` [2]; then the whole batch's `lm_loss`, `mtp_loss`, `loss`, which "
                         "are the token-weighted combinations of the parts' (README)"),
    ]


def gradient_cases(forward: list[dict]) -> list[dict]:
    """For training ports: the gradients of a model case's losses, on its weights and inputs."""
    return [dict(c, name=f"grad-{c['name']}", kind="grad", checkpoint=c["name"],
                 end_results=["grad.inputs_embeds"], pins=[r"grad\..+", r"(lm_|mtp_)?loss"],
                 description=f"the gradients of case {c['name']}'s losses on its weights (golden/{c['name']}/) and "
                             f"inputs: `grad.<checkpoint key>` of loss = lm_loss + mtp_loss for every parameter that "
                             f"gets one, and `grad.inputs_embeds` [B, S, D] (the text model's input, media spliced "
                             f"in); `grad.mtp_loss.*` and `grad.lm_loss.*` each term alone; fp32. Not stored, "
                             f"derived by the verifier: grad.lm_loss.X = grad.X - grad.mtp_loss.X, and in the MTP "
                             f"depths, which lm_loss does not reach, grad.mtp_loss.X = grad.X")
            for c in forward]


def decoding_cases(text: m3.M3Config) -> list[dict]:
    """The cases of decoding: a cached forward, a padded batch, MTP speculative decoding."""
    return [
        dict(name="decode", kind="decode", config=replace(text, sparse_block_size=4, num_mtp_modules=0),
             dtype="float32", seed=105, steps=[37, 1, 1, 3, 1, 2], end_results=[f"step.{s}.logits" for s in range(6)],
             pins=[r"step\.\d+\.layers\.\d+\.indexer\.block_ids"],
             description="a cached forward (no MTP depth: a cached call runs none): a 37-token prefill, then calls "
                         "of 1, 1, 3, 1 and 2 tokens (input `steps`); block 4, top-3 with 1 init + 1 local block, "
                         "so from the fourth block on new queries drop blocks of the cached history; per call s, "
                         "`step.{s}.*`: the traced forward, q_start (cached positions before it) and cache_length "
                         "(after it)"),
        dict(name="padded-batch", kind="padded", config=text, dtype="float32", seed=106, lengths=[41, 12, 30],
             max_new_tokens=5, end_results=[f"row.{b}.logits" for b in range(3)] + ["generated"],
             description="three left-padded rows of 41, 12 and 30 tokens (attention_mask); per row b, `row.{b}.*`: "
                         "the traced forward over its own tokens, which equals the row run alone (block 8, top-3: "
                         "row 0 drops blocks); `generated`: the max_new_tokens tokens of greedy decoding"),
        dict(name="mtp-speculative", kind="speculative", config=replace(text, mtp=m3.MTPConfig.vllm_drafter()), dtype="float32", seed=107, lengths=[30, 22],
             max_new_tokens=12, draft_tokens=3, weights=agreeing_mtp_,
             end_results=["generated"], pins=[r"step\.\d+\.(draft_logits|drafts|accepted)"],
             description="MTP speculative decoding, drafting as vLLM does, of two left-padded rows (30 and 22 "
                         "tokens), 3 drafts per step; weights bent (agreeing_mtp_) so that some drafts are kept "
                         "and some rolled back; per main-model call s after the prefill: `step.{s}.draft_logits`, "
                         "`step.{s}.drafts`, `step.{s}.accepted`; `generated`: the 12 new tokens"),
    ]


def cache_config() -> m3.M3Config:
    """The model of the cache cases: a full-attention layer, then a sparse one (dense MLPs, no MTP
    depth, text only): block 8, top-3 with 1 init + 1 local block, so that from 4 blocks on a query
    drops blocks."""
    return golden_config(num_hidden_layers=2, moe_layer_freq=[0, 0], sparse_attention_freq=[0, 1],
                         num_mtp_modules=0, vision=None)


def cache_cases() -> list[dict]:
    """Where serving ports broke: calls with a cache, each checked against one-shot forwards
    (`oneshot_mismatches`) when generated and by the test suite."""
    run = dict(kind="cached", config=cache_config(), dtype="float32",
               pins=[r"step\.\d+\.(?:row\.\d+\.)?(?:layers\.\d+\.indexer\.block_ids|cache\..+)"])
    calls = "call s = 0, 1, ... runs the next steps[s] columns of input_ids with the cache"
    cases = [
        dict(run, name="cache-decode-boundary", seed=120, steps=[29, 1, 1, 1, 1],
             description=f"a 29-token prefill (not a multiple of the block size 8), then 4 single-token decode "
                         f"calls across the block boundary at 32; from 25 tokens on the history is longer than "
                         f"top-k x block size (24), so decode queries drop blocks; {calls}"),
        dict(run, name="cache-short-prompt", seed=121, steps=[10, 1, 1],
             description=f"a 10-token prompt: 2 blocks, fewer than top-k = 3, so every selection row ends in -1 "
                         f"(unused slot, never a block), then 2 decode calls; {calls}"),
        dict(run, name="cache-chunked-prefill", seed=122, steps=[11, 11, 11, 6],
             description=f"a 39-token prefill in chunks of 11 (not a multiple of the block size; chunks 2-4 start "
                         f"mid-block: a block's pooled max spans two chunks), equal to the one-shot prefill; {calls}"),
        dict(run, name="cache-prefix-hit", seed=123, steps=[27, 9], rollback=[-1, 21],
             description="a prefix-cache hit at an unaligned offset: call 0 runs A + C (21 + 6 tokens), the cache "
                         "rolls back to A's 21 positions (rollback[1], mid-block), call 1 continues with B (9 "
                         "tokens): equal to A + B in one shot"),
        dict(run, name="cache-handoff", seed=124, steps=[26, 1, 1, 1], handoff=[1, 0, 0, 0],
             description="a prefill/decode split: after the 26-token prefill the cache is handed over as tensors "
                         "(step.0.cache.*: mask, each layer's k and v, the sparse layer's index_keys; handoff[0] "
                         "= 1) and 3 decode calls run from it"),
        dict(run, name="cache-verify-rows", seed=125, steps=[30, 4], prompt_lengths=[30, 17, 25],
             description="MTP verify rows: three left-padded prompts of 30, 17 and 25 tokens (attention_mask), "
                         "then one call where each row verifies 1 + 3 tokens at its own causal length; padded "
                         "calls report per row (step.{s}.row.{b}.*, with the row's own q_start)"),
    ]
    # end results: every call's logits (per row in the padded case: its history holds pads in every call)
    rows = lambda c: [f"row.{b}." for b in range(len(c["prompt_lengths"]))] if "prompt_lengths" in c else [""]
    return [dict(c, end_results=[f"step.{s}.{r}logits" for s in range(len(c["steps"])) for r in rows(c)])
            for c in cases]


def mtp_variant_cases(text: m3.M3Config, base: m3.M3Config) -> list[dict]:
    """One case per MTPConfig option away from M3's, on a two-layer trunk (dense, then MoE + sparse,
    which the depths are built like); weights stored in the layout of the implementation that uses
    the option."""
    trunk = dict(num_hidden_layers=2, moe_layer_freq=[0, 1], sparse_attention_freq=[0, 1])
    small, media = replace(text, **trunk), replace(base, **trunk)
    variant = lambda cfg, depths, **mtp: replace(cfg, num_mtp_modules=depths, mtp=m3.MTPConfig(**mtp))
    run = dict(kind="model", dtype="float32", batch=2, length=15, media=False)
    cases = [
        dict(run, name="mtp-pre-norm", config=variant(small, 2, pass_hidden="pre_norm"), seed=110,
             description="two depths, depth 2 fusing depth 1's output before its final_layernorm (Step3p7 "
                         "training, vLLM's drafter); mtp.0.* equal M3's, mtp.1.* differ"),
        dict(run, name="mtp-repeated", config=variant(small, 3, repeated_layer=True), seed=111,
             mtp_layout="nemotron_v3",
             description="one physical depth run three times (NemotronV3 use_repeated_layer), stored in "
                         "NemotronV3's flat layout mtp.layers.{0,1}: mtp.{0,1,2}.* are its three runs"),
        dict(run, name="mtp-per-depth-head", config=variant(small, 1, head="per_depth"), seed=112,
             mtp_layout="step3p7",
             description="a head per depth: the depth's final_layernorm then its own output projection, stored "
                         "in Step3p7's layout model.layers.{N}.transformer.shared_head.{norm,output}"),
        dict(run, name="mtp-inputs-embeds", config=variant(media, 1, embed_source="inputs_embeds"), seed=113,
             media=True,
             description="the depth fuses the model's input embeddings shifted by one, vision features "
                         "included (Step3p7), not embed_tokens of the shifted ids: two images and a video"),
        dict(run, name="mtp-zero-position0", config=variant(small, 1, zero_position0=True), seed=114,
             description="the depth's embedding zeroed at position 0 (vLLM at inference): only slot 0 of "
                         "mtp.0.* moves, and the later slots through the attention"),
        dict(run, name="mtp-sublayers", config=variant(small, 1, sublayers="attention_moe"), seed=115,
             mtp_layout="nemotron_v3",
             description="the depth as an attention sublayer then an MoE sublayer, each h + mixer(norm(h)) "
                         "(NemotronV3 \"*E\"), stored in its flat layout: the same math as M3's decoder layer"),
        dict(run, name="mtp-loss-weight", config=variant(small, 1, loss_weight=0.3), seed=116,
             description="lambda = 0.3 in mtp_loss = lambda / M * sum_k L_k"),
        dict(run, name="mtp-loss-main-tokens", config=variant(small, 1, loss_norm="main_tokens"), seed=117,
             description="each depth's summed CE divided by the main loss's valid-target count (Automodel "
                         "calculate_mtp_loss), labels with -100"),
    ]
    # end results: what the option changes (the main logits never move)
    return [dict(c, end_results=["logits", f"mtp.{c['config'].num_mtp_modules - 1}.logits"] +
                 (["mtp_loss"] if c["name"].startswith("mtp-loss") else []),
                 pins=[r"lm_loss|loss"] if c["name"].startswith("mtp-loss") else []) for c in cases]


def run_case(path: Path, case: dict, inputs: dict) -> dict[str, torch.Tensor]:
    """The reference's outputs of one case (a golden_cases() dict or a manifest entry)."""
    if case["kind"] == "component":
        return run_component_case(path, case["component"], inputs)
    run = {"model": run_model_case, "decode": run_decode_case, "padded": run_padded_case,
           "speculative": run_speculative_case, "cached": run_cached_case, "grad": run_grad_case,
           "kl": run_kl_case, "split": run_split_case}[case["kind"]]
    weights = path.parent / case["checkpoint"] if "checkpoint" in case else path     # another case's weights
    return run(weights, getattr(torch, case["dtype"]), inputs)


def _case_inputs(case: dict) -> dict[str, torch.Tensor]:
    cfg, seed = case["config"], case["seed"]
    if case["kind"] in ("model", "grad"):
        return _model_inputs(cfg, seed, case.get("batch", 1), case.get("length", 0), case["media"])
    g = torch.Generator().manual_seed(seed)
    if case["kind"] == "kl":
        return {"input_ids": torch.randint(0, cfg.vocab_size, (case["batch"], case["length"]), generator=g)}
    if case["kind"] == "split":
        ids = torch.randint(0, cfg.vocab_size, (case["batch"], case["length"]), generator=g)
        rate = torch.tensor([0.6] * case["split"][0] + [0.1] * (case["batch"] - case["split"][0]))[:, None]
        labels = ids.masked_fill(torch.rand(ids.shape, generator=g) < rate, -100)
        return {"input_ids": ids, "labels": labels, "split": torch.tensor(case["split"])}
    if case["kind"] == "decode":
        steps = torch.tensor(case["steps"])
        return dict(input_ids=torch.randint(0, cfg.vocab_size, (1, int(steps.sum())), generator=g), steps=steps)
    if case["kind"] == "cached":
        return _cached_inputs(case, g)
    S = max(case["lengths"])
    mask = torch.stack([(torch.arange(S) >= S - n).long() for n in case["lengths"]])
    ids = torch.randint(0, cfg.vocab_size, mask.shape, generator=g) * mask
    inputs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=torch.tensor([case["max_new_tokens"]]))
    return inputs | ({"draft_tokens": torch.tensor([case["draft_tokens"]])} if "draft_tokens" in case else {})


def _cached_inputs(case: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
    """input_ids [B, sum(steps)] (rows of prompt_lengths left-padded in the first call, pads id 0),
    attention_mask where there are pads, steps and the case's rollback / handoff per call."""
    steps = case["steps"]
    lengths = case.get("prompt_lengths", steps[:1])
    mask = torch.ones(len(lengths), sum(steps), dtype=torch.int64)
    for b, n in enumerate(lengths):
        mask[b, :steps[0] - n] = 0
    ids = torch.randint(0, case["config"].vocab_size, mask.shape, generator=g) * mask
    inputs = dict(input_ids=ids, **({} if bool(mask.all()) else {"attention_mask": mask}), steps=torch.tensor(steps))
    return inputs | {k: torch.tensor(case[k]) for k in ("rollback", "handoff") if k in case}


def run_decode_case(path: Path, dtype: torch.dtype, inputs: dict) -> dict[str, torch.Tensor]:
    """Cached calls of inputs["steps"] tokens each over input_ids [1, S]; call s traced as
    `step.{s}.*` (its layers' indexer, router and hidden; hidden; logits of its tokens), with
    q_start (positions cached before the call) and cache_length (after it)."""
    model = m3.from_pretrained(path, dtype=dtype)
    ids, steps = inputs["input_ids"], inputs["steps"].tolist()
    if sum(steps) != ids.shape[1]:
        raise ValueError(f"steps {steps} must add up to the {ids.shape[1]} input_ids")
    cache, out, start = model.new_cache(), {}, 0
    for s, n in enumerate(steps):
        out[f"step.{s}.q_start"] = torch.tensor([start])
        tracer = Tracer(model, [], f"step.{s}.")
        with torch.no_grad():
            logits = model(ids[:, start:start + n], cache=cache).logits
        tracer.close()
        out.update(tracer.out)
        out.update({f"step.{s}.logits": logits, f"step.{s}.cache_length": torch.tensor([cache.length])})
        start += n
    return out


def run_grad_case(path: Path, dtype: torch.dtype, inputs: dict) -> dict[str, torch.Tensor]:
    """The forward with labels, then by autograd the gradient of loss, of mtp_loss and of lm_loss
    with respect to every parameter that gets one and to the input embeddings: `grad.` (loss),
    `grad.mtp_loss.`, `grad.lm_loss.` + the checkpoint key or `inputs_embeds`; then the losses.
    Parameters that only choose (router bias, indexer) get none, and lm_loss none in MTP depths."""
    model = m3.from_pretrained(path, dtype=dtype)
    res = model(**inputs)
    out = {}
    for term, prefix in (("loss", "grad."), ("mtp_loss", "grad.mtp_loss."), ("lm_loss", "grad.lm_loss.")):
        out |= gradients(model, getattr(res, term), prefix, {"inputs_embeds": res.inputs_embeds})
    return out | {n: getattr(res, n).detach() for n in ("lm_loss", "mtp_loss", "loss")}


def gradients(model: m3.MiniMaxM3, loss: torch.Tensor, prefix: str = "grad.",
              inputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """d loss / d every parameter that gets a gradient, under `prefix` + its checkpoint key, and
    / d each tensor of `inputs` under `prefix` + its name (the graph is kept for further losses)."""
    named = {m3.checkpoint_key(n, model.config): p for n, p in model.named_parameters()} | (inputs or {})
    grads = torch.autograd.grad(loss, list(named.values()), retain_graph=True, allow_unused=True)
    return {prefix + k: g for k, g in zip(named, grads) if g is not None}


def run_kl_case(path: Path, dtype: torch.dtype, inputs: dict) -> dict[str, torch.Tensor]:
    """indexer_loss="kl" on input_ids: per layer the traced selection and hidden state, each sparse
    layer's `layers.{i}.indexer_kl`, `indexer_loss`, and its gradient on every parameter it reaches
    (`grad.<checkpoint key>`)."""
    model = m3.from_pretrained(path, dtype=dtype)
    kl, text = {}, model.language_model.model
    hooks = [layer.self_attn.register_forward_hook(
        lambda m, a, y, i=i: kl.update({f"layers.{i}.indexer_kl": a[1].indexer_kl[-1]}))
        for i, layer in enumerate(text.layers) if layer.self_attn.sparse]
    tracer = Tracer(model, [])
    res = model(inputs["input_ids"], indexer_loss="kl")
    tracer.close()
    for h in hooks:
        h.remove()
    # the selections and the layers' states (what the loss reads), not the head's logits
    out = {k: t for k, t in tracer.out.items() if k.startswith("layers.")} | {k: t.detach() for k, t in kl.items()}
    out["indexer_loss"] = res.indexer_loss.detach()
    return out | gradients(model, res.indexer_loss)


def run_split_case(path: Path, dtype: torch.dtype, inputs: dict) -> dict[str, torch.Tensor]:
    """A batch split into parts of split[p] rows (ranks, micro-batches): per part p, its losses
    alone (`part.{p}.lm_loss`, `.mtp_loss`, `.loss`), its valid target counts (`part.{p}.lm_tokens`
    [1], `part.{p}.mtp_tokens` [M]) and each depth's mean CE (`part.{p}.mtp_ce` [M]); then the whole
    batch's losses, the token-weighted combinations of the parts' (README, "MTP variants")."""
    model = m3.from_pretrained(path, dtype=dtype)
    ids, labels, out, start = inputs["input_ids"], inputs["labels"], {}, 0
    if sum(inputs["split"].tolist()) != ids.shape[0]:
        raise ValueError(f"split {inputs['split'].tolist()} must add up to the {ids.shape[0]} rows")
    with torch.no_grad():
        for p, rows in enumerate(inputs["split"].tolist()):
            part, start = slice(start, start + rows), start + rows
            res = model(ids[part], labels=labels[part])
            terms = [m3.cross_entropy_sum(lg, labels[part], 1 + k) for k, lg in enumerate(res.mtp_logits, start=1)]
            out.update({f"part.{p}.{n}": getattr(res, n) for n in ("lm_loss", "mtp_loss", "loss")})
            out[f"part.{p}.lm_tokens"] = m3.cross_entropy_sum(res.logits, labels[part], 1)[1].reshape(1)
            out[f"part.{p}.mtp_tokens"] = torch.stack([n for _, n in terms])
            out[f"part.{p}.mtp_ce"] = torch.stack([total / n.clamp(min=1) for total, n in terms])
        res = model(ids, labels=labels)
    return out | {n: getattr(res, n) for n in ("lm_loss", "mtp_loss", "loss")}


def run_cached_case(path: Path, dtype: torch.dtype, inputs: dict) -> dict[str, torch.Tensor]:
    """A serving engine's calls: call s runs the next steps[s] columns of input_ids (and of
    attention_mask: left pads in the first call) with the cache, after rolling the cache back to
    rollback[s] positions when that is >= 0 (a prefix-cache hit); after it, the cache is handed
    over through its tensors (Cache.tensors -> safetensors bytes -> Cache.from_tensors) where
    handoff[s] is 1. Per call, `step.{s}.`: q_start, the traced forward (padded rows as
    `row.{b}.*`, each with its own q_start), logits, the cache's index keys after the call
    (`cache.layers.{i}.index_keys`; every cache tensor where it was handed over), cache_length."""
    from safetensors.torch import load, save
    model = m3.from_pretrained(path, dtype=dtype)
    ids, steps = inputs["input_ids"], inputs["steps"].tolist()
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    rollback, handoff = (inputs[k].tolist() if k in inputs else [d] * len(steps) for k, d in (("rollback", -1),
                                                                                               ("handoff", 0)))
    if sum(steps) != ids.shape[1] or len(rollback) != len(steps) or len(handoff) != len(steps):
        raise ValueError(f"steps {steps} must add up to the {ids.shape[1]} input_ids, with one rollback and "
                         f"handoff entry per call")
    cache, out, start = model.new_cache(), {}, 0
    for s, n in enumerate(steps):
        if rollback[s] >= 0:
            cache.truncate(rollback[s])
        out.update(cached_call(model, cache, ids[:, start:start + n], mask[:, start:start + n], f"step.{s}."))
        start += n
        tensors = cache.tensors()
        if handoff[s]:                                   # what a prefill node sends a decode node, and back
            tensors = load(save({k: t.contiguous() for k, t in tensors.items()}))
            cache = m3.Cache.from_tensors(model.config, tensors)
        kept = {k: t for k, t in tensors.items() if handoff[s] or k.endswith("index_keys")}
        out.update(cache_rows(kept, cache.mask, f"step.{s}."))
        out[f"step.{s}.cache_length"] = torch.tensor([cache.length])
    return out


def cache_rows(tensors: dict[str, torch.Tensor], mask: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """Cache tensors under `prefix` + `cache.` + name; with pads in the history, per row
    (`row.{b}.cache.*`, [1, the row's tokens, ...]), since pad slots hold nothing a port must match."""
    if bool(mask.all()):
        return {f"{prefix}cache.{k}": t for k, t in tensors.items()}
    return {f"{prefix}row.{b}.cache.{k}": t[b:b + 1, mask[b].bool()] for b in range(mask.shape[0])
            for k, t in tensors.items() if k != "mask"}


def cached_call(model: m3.MiniMaxM3, cache: m3.Cache, ids: torch.Tensor, mask: torch.Tensor,
                prefix: str) -> dict[str, torch.Tensor]:
    """One traced call after the cache: q_start (cached slots), the forward's intermediates and
    logits; where the history or the call holds pads, per row (`row.{b}.`, with the row's q_start:
    its own cached tokens)."""
    past = cache.length
    history = cache.mask if cache.mask is not None else mask[:, :0]
    tracer = Tracer(model, [], prefix)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache).logits
    tracer.close()
    out = {prefix + "q_start": torch.tensor([past]), **tracer.out, prefix + "logits": logits}
    if bool(cache.mask.all()):
        return out
    spans = [(max(start - past, 0), end - past) for start, end in m3.row_spans(cache.mask)]
    out = {prefix + "q_start": out[prefix + "q_start"], **by_row(out, spans, *ids.shape, prefix)}
    out.update({f"{prefix}row.{b}.q_start": torch.tensor([int(history[b].sum())]) for b in range(ids.shape[0])})
    return out


def oneshot(model: m3.MiniMaxM3, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A cacheless forward of ids [1, S]: logits, each sparse layer's block ids and its index keys
    ([1, S, Di], what a cache would hold), under the golden names without a call prefix."""
    text, keys = model.language_model.model, {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, i=i: keys.update({f"layers.{i}.index_keys": m.index_qk(a[0], a[1].cos, a[1].sin)[1]}))
        for i, layer in enumerate(text.layers) if layer.self_attn.sparse]
    tracer = Tracer(model, [])
    with torch.no_grad():
        logits = model(ids).logits
    tracer.close()
    for h in hooks:
        h.remove()
    return {"logits": logits, **{k: t for k, t in tracer.out.items() if k.endswith("block_ids")}, **keys}


def oneshot_mismatches(model: m3.MiniMaxM3, inputs: dict, outputs: dict) -> list[str]:
    """Where a `cached` case's calls differ from one-shot forwards: for each call and row, the
    row's history after the call (rolled back as the case says, pads left out) runs alone without a
    cache, and the call's logits (fp32 model tolerance), block ids (equal) and the cache's index keys
    after the call (same tolerance) must match it at the row's positions."""
    ids, steps = inputs["input_ids"], inputs["steps"].tolist()
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    rollback = inputs["rollback"].tolist() if "rollback" in inputs else [-1] * len(steps)
    tol, problems, kept, start = V.FP32_MODEL_TOL, [], [], 0
    for s, n in enumerate(steps):
        kept = (kept[:rollback[s]] if rollback[s] >= 0 else kept) + list(range(start, start + n))
        start += n
        for b in range(ids.shape[0]):
            mine = [c for c in kept if mask[b, c]]                       # the row's tokens, in order
            new = int(mask[b, start - n:start].sum())
            ref = oneshot(model, ids[b:b + 1, mine])
            prefix = f"step.{s}.row.{b}." if f"step.{s}.row.{b}.logits" in outputs else f"step.{s}."
            row = (lambda t: t) if prefix.endswith(f"row.{b}.") else (lambda t: t[b:b + 1])
            got = {"logits": row(outputs[prefix + "logits"])[:, -new:] if new else None}
            got |= {k: row(outputs[prefix + k])[:, :, -new:] for k in ref if k.endswith("block_ids")}
            got |= {k: outputs[prefix + "cache." + k] if prefix.endswith(f"row.{b}.") else
                    outputs[prefix + "cache." + k][b:b + 1] for k in ref if k.endswith("index_keys")}
            want = {"logits": ref["logits"][:, len(mine) - new:], **{k: ref[k][:, :, len(mine) - new:] for k in ref
                                                                    if k.endswith("block_ids")},
                    **{k: ref[k] for k in ref if k.endswith("index_keys")}}
            for k, t in got.items():
                if t is None:
                    continue
                same = torch.equal(t, want[k]) if k.endswith("block_ids") else \
                    torch.allclose(t, want[k], rtol=tol, atol=tol)
                if not same:
                    problems.append(f"call {s} row {b}: {k} differs from the one-shot forward")
    return problems


def run_padded_case(path: Path, dtype: torch.dtype, inputs: dict) -> dict[str, torch.Tensor]:
    """A left-padded batch: per row b, the traced forward over the row's own tokens as if it ran
    alone (`row.{b}.` + the model-case names, MTP included), then `generated`: the max_new_tokens
    [1] tokens of greedy decoding [B, max_new_tokens]."""
    model = m3.from_pretrained(path, dtype=dtype)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    tracer = Tracer(model, [])
    with torch.no_grad():
        res = model(ids, attention_mask=mask)
    tracer.close()
    B, S = ids.shape
    out = by_row(named_outputs(tracer.out, res), m3.row_spans(mask), B, S)
    n = int(inputs["max_new_tokens"])
    out["generated"] = model.generate(ids, n, attention_mask=mask)[0][:, S:]
    return out


def by_row(whole: dict[str, torch.Tensor], spans: list[tuple[int, int]], B: int, S: int,
           prefix: str = "") -> dict[str, torch.Tensor]:
    """A padded call's traced tensors per row, `prefix` + `row.{b}.` + name: row b's new tokens are
    the slots spans[b] of the call's S; the indexer is traced per row already (its names start
    with `row.`)."""
    out = {k: v for k, v in whole.items() if k.startswith(prefix + "row.")}
    for b, (lo, hi) in enumerate(spans):
        for name, t in whole.items():
            if name.startswith(prefix + "row.") or t.dim() == 0 or name.endswith("q_start"):
                continue
            base = name.removeprefix(prefix)
            router = ".router." in base                                   # [B*S, ...], a row alone: [n, ...]
            out[f"{prefix}row.{b}.{base}"] = t.view(B, S, *t.shape[1:])[b, lo:hi] if router else t[b:b + 1, lo:hi]
    return out


def run_speculative_case(path: Path, dtype: torch.dtype, inputs: dict) -> dict[str, torch.Tensor]:
    """MTP speculative decoding of a left-padded batch: per main-model call s = 1.. after the
    prefill, `step.{s}.draft_logits` [B, n, V] and `step.{s}.drafts` [B, n] (the MTP drafter's),
    `step.{s}.accepted` [1] (drafts every row kept); `generated` [B, max_new_tokens]."""
    model = m3.from_pretrained(path, dtype=dtype)
    ids, trace = inputs["input_ids"], []
    tokens, _ = model.generate(ids, int(inputs["max_new_tokens"]), attention_mask=inputs["attention_mask"],
                               mtp=True, draft_tokens=int(inputs["draft_tokens"]), draft_trace=trace)
    out = {}
    for s, step in enumerate(trace, start=1):
        out.update({f"step.{s}.draft_logits": step["draft_logits"], f"step.{s}.drafts": step["drafts"],
                    f"step.{s}.accepted": torch.tensor([step["accepted"]])})
    out["generated"] = tokens[:, ids.shape[1]:]
    return out


def agreeing_mtp_(model: m3.MiniMaxM3, agree: float = 0.05, hidden: float = 0.2) -> m3.MiniMaxM3:
    """Bend random weights so MTP drafts are often right (a golden that exercises acceptance and
    rollback): norm scales 1 (Gemma offset 0) except the MTP `final_layernorm`s, each block's output
    projections scaled by `agree` (the residual stream stays near the token embedding, attention
    still counts), and each MTP depth's eh_proj the identity on the embedding plus `hidden` times
    its weights on the hidden state (a per-depth head: lm_head's weights). The main head and a depth then predict nearly the same next
    token from the same token, and the hidden state passed on (pre- or post-norm) still matters."""
    D = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1 and "final_layernorm" not in name:
                p.zero_()
            if name.endswith(("o_proj.weight", "down_proj.weight", "w2.weight")):
                p.mul_(agree)
        for depth in model.language_model.model.mtp["layers"]:
            depth.eh_proj.weight[:, :D] = torch.eye(D)
            depth.eh_proj.weight[:, D:] *= hidden
            if hasattr(depth, "output"):                 # a per-depth head: the main head's copy
                depth.output.weight.copy_(model.language_model.lm_head.weight)
    return model


def greedy_margin(model: m3.MiniMaxM3, tokens: torch.Tensor, mask: torch.Tensor, prompt: int) -> float:
    """The smallest gap between the top two logits over the choices that produced tokens[:, prompt:]:
    a golden's greedy tokens must not hang on a near tie."""
    full = F.pad(mask, (0, tokens.shape[1] - mask.shape[1]), value=1)
    with torch.no_grad():
        return top2_gap(model(tokens, attention_mask=full).logits[:, prompt - 1:-1])


def top2_gap(logits: torch.Tensor) -> float:
    top2 = logits.float().topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


def make_case(case: dict, path: Path) -> dict:
    """Write one case directory and return its manifest entry."""
    from safetensors.torch import save_file
    path.mkdir(parents=True)
    cfg = case["config"]
    model = case.get("weights", lambda m: m)(m3.init_random_(m3.MiniMaxM3(cfg), case["seed"]))
    model = model.to(getattr(torch, case["dtype"]))
    processor = {f.name: getattr(m3.ProcessorConfig(), f.name) for f in fields(m3.ProcessorConfig)}
    if case["kind"] == "component":
        inputs = _component_inputs(case["component"], cfg, case["seed"])
        m3_keys = _component_weight_keys(case["component"], model)
        (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if case["component"].startswith("preprocess"):           # the processor's settings, as released
            (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
        if m3_keys:
            save_file({k: t.contiguous() for k, t in model.state_dict().items() if k in m3_keys}, path / m3.SINGLE_FILE)
    else:
        inputs = _case_inputs(case)
        if "checkpoint" not in case:
            m3.save_pretrained(model, path, mtp_layout=case.get("mtp_layout", "m3"))
    outputs = run_case(path, case, inputs)
    derived = gradient_sources(outputs) if case["kind"] == "grad" else {}
    if case["kind"] != "component":
        outputs = {name: outputs[name] for name in V.forward_order(outputs)}
    mismatches = oneshot_mismatches(model, inputs, outputs) if case["kind"] == "cached" else []
    if mismatches:
        raise ValueError(f"case {case['name']}: " + "; ".join(mismatches))
    if "generated" in outputs:
        tokens = torch.cat([inputs["input_ids"], outputs["generated"]], 1)
        margin = min([greedy_margin(model, tokens, inputs["attention_mask"], inputs["input_ids"].shape[1])]
                     + [top2_gap(t) for k, t in outputs.items() if k.endswith("draft_logits")])
        if margin < 10 * V.FP32_MODEL_TOL:
            raise ValueError(f"case {case['name']}: a greedy choice is within {margin:.2g} of a tie; pick another seed")
    save_file({k: v.contiguous() for k, v in inputs.items()}, path / "inputs.safetensors")
    save_file({k: v.detach().contiguous().clone() for k, v in outputs.items() if k not in derived},
              path / "outputs.safetensors")
    shared = [path.parent / case["checkpoint"] / f for f in ("config.json", m3.SINGLE_FILE)] if "checkpoint" in case else []
    return {"name": case["name"], "description": case["description"], "kind": case["kind"],
            **({"component": case["component"]} if case["kind"] == "component" else {}),
            "dtype": case["dtype"], "seed": case["seed"], "tie_tol": V.tie_tolerance(case["dtype"]),
            "config": cfg.to_dict(), "inputs": {k: list(v.shape) for k, v in inputs.items()},
            **({"processor": processor} if case.get("component", "").startswith("preprocess") else {}),
            "end_results": case["end_results"],
            "required": [n for n in required_outputs(case, list(outputs)) if n not in derived],     # derivable
            **({"checkpoint": case["checkpoint"]} if "checkpoint" in case else {}),
            "outputs": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                         **V.tolerance(k, v.is_floating_point(), case["dtype"], case["kind"]),
                         **({"from": derived[k]} if k in derived else {})} for k, v in outputs.items()],
            "files": {**{f.name: V.sha256(f) for f in sorted(path.iterdir())},
                      **{f"../{f.parent.name}/{f.name}": V.sha256(f) for f in shared}}}


def gradient_sources(outputs: dict[str, torch.Tensor]) -> dict[str, list]:
    """The gradients a grad case lists but does not store, each with the stored ones it is the
    signed sum of: grad.lm_loss.X = grad.X - grad.mtp_loss.X; and where lm_loss does not reach X
    (the MTP depths), grad.mtp_loss.X = grad.X, bit for bit (the same backward pass)."""
    sources = {}
    for name in outputs:
        rest = name.removeprefix("grad.mtp_loss.")
        if name.startswith("grad.lm_loss."):
            rest = name.removeprefix("grad.lm_loss.")
            sources[name] = [[1, f"grad.{rest}"], [-1, f"grad.mtp_loss.{rest}"]]
        elif rest != name and f"grad.lm_loss.{rest}" not in outputs:
            if not torch.equal(outputs[name], outputs[f"grad.{rest}"]):
                raise ValueError(f"{name} differs from grad.{rest}, which lm_loss does not reach")
            sources[name] = [[1, f"grad.{rest}"]]
    return sources


def required_outputs(case: dict, names: list[str]) -> list[str]:
    """What the case exists to pin, in forward order (golden/verify.py: a file without one of these
    gets no verdict): its end results, every MTP depth's logits (the main logits do not see the
    depths' conventions), and the names its `pins` patterns match (selections in the
    sparse-selection cases, the drafter's drafts and their logits, the losses, a processor's grids)."""
    pins = [r"(?:(?:step|row)\.\d+\.)?mtp\.\d+\.logits", *case.get("pins", [])]
    return [n for n in names if n in case["end_results"] or any(re.fullmatch(p, n) for p in pins)]


def _component_weight_keys(name: str, model: m3.MiniMaxM3) -> set[str]:
    keys = model.state_dict().keys()
    prefix = {"rms_norm": ("language_model.model.layers.0.input_layernorm.",),
              "rope": ("language_model.model.layers.0.self_attn.q_norm.",),
              "moe": ("language_model.model.layers.1.block_sparse_moe.",),
              "attention": ("language_model.model.layers.0.self_attn.",),
              "sparse_attention": ("language_model.model.layers.1.self_attn.",),
              "vision": ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp."),
              "splice": ("language_model.model.embed_tokens.",),
              "mtp_fusion": ("language_model.model.embed_tokens.",
                             *(f"language_model.model.mtp.layers.0.{n}." for n in ("enorm", "hnorm", "eh_proj")))
              }.get(name, ())
    return {k for k in keys if k.startswith(prefix)} if prefix else set()


def manifest_text(manifest: dict) -> str:
    """manifest.json with one case per line (the gradient cases list hundreds of tensors each)."""
    head = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items() if k != "cases")
    return "{" + head + ', "cases": [\n' + ",\n".join(json.dumps(c) for c in manifest["cases"]) + "\n]}\n"


def generate_golden(out: str | os.PathLike) -> None:
    """Regenerate every case into a temporary sibling directory; swap it in only if all succeeded.
    The directory also gets copies of golden/verify.py and this generator, so that it can be checked
    and regenerated wherever it goes."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        entries = []
        for case in golden_cases():
            entries.append(make_case(case, tmp / case["name"]))
            print(f"  {case['name']:<28} {len(entries[-1]['outputs']):>3} tensors")
        manifest = {"format": V.GOLDEN_FORMAT, "generator": "m3_reference.py golden",
                    "torch": torch.__version__, "cases": entries}
        (tmp / "manifest.json").write_text(manifest_text(manifest))
        for module in (V.__file__, __file__):              # the checker and this generator travel with the cases
            shutil.copyfile(module, tmp / Path(module).name)
    except BaseException:
        shutil.rmtree(tmp)
        raise
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


# ---- the reference re-run on the committed cases ----------------------------------------------

BACKWARD_KINDS = ("grad", "kl")        # cases whose outputs come from autograd


def verify_golden(root: str | os.PathLike, cases: Sequence[str] | None = None) -> int:
    """Re-run the reference on every case (or those named) and compare it with the committed outputs.
    Returns golden/verify.py's exit status: 0 pass, 1 divergence, 2 unusable input, 3 inconclusive.
    With the Triton kernels on, the gradient cases are left out, and said to be: the twins are
    forward-only (no backward), so their gradients are the torch functions' alone."""
    from safetensors.torch import load_file
    if isinstance(cases, str):
        raise TypeError(f"cases must be a list of case names, got the string {cases!r}")
    root = Path(root)
    manifest = V.load_manifest(root)
    entries = [V.find_case(manifest, root, case) for case in cases] if cases else manifest["cases"]
    if m3._kernels is not None:
        backward = [e["name"] for e in entries if e["kind"] in BACKWARD_KINDS]
        if backward:
            print(f"not run with the Triton kernels (forward-only; verify them without --kernels triton): "
                  f"{', '.join(backward)}")
        entries = [e for e in entries if e["kind"] not in BACKWARD_KINDS]
        if not entries:
            raise ValueError("no case left to verify with the Triton kernels: gradient cases need autograd")
    statuses = []
    for entry in entries:
        path = V.check_case_files(root, entry)
        ours = run_case(path, entry, load_file(path / "inputs.safetensors"))
        ours = {k: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for k, t in ours.items()}
        statuses.append(V.check(entry["name"], V.case_rules(entry), V.read_safetensors(path / "outputs.safetensors"), ours))
    return V.worst(statuses)


# ---- the CLI commands m3_reference.py hands over ------------------------------------------------

def cli(args) -> int:
    """`python m3_reference.py golden | verify | bench` (args as m3_reference.main parsed them);
    returns the exit status."""
    if args.command == "golden":
        print(f"generating golden cases into {args.out}")
        generate_golden(args.out)
        return 0
    if args.command == "verify":
        status = m3._or_exit(verify_golden, args.root, args.case)
        print(f"\noverall: exit {status} (0 pass, 1 divergence, 2 unusable input, 3 inconclusive)")
        return status
    if args.one:
        impl, S, ckpt = args.one
        print(json.dumps(_bench_one(impl, int(S), ckpt)))
    elif args.offload:
        bench_offload(Path(args.offload), args.layers, args.experts)
    else:
        bench()
    return 0


# ---- the long-sequence benchmark ---------------------------------------------------------------

def bench_config(sparse: bool) -> m3.M3Config:
    """The tiny text width as a 2-layer stack of MoE layers, all sparse or all dense attention;
    no init block, since transformers has none and runs the same weights for the comparison."""
    return replace(m3.M3Config.tiny(), num_hidden_layers=2, moe_layer_freq=[1, 1],
                   sparse_attention_freq=[int(sparse)] * 2, sparse_init_block=0, num_mtp_modules=0)


def _peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# one attention layer at the released head ratios, head dims scaled down 4x: 16 query heads per KV
# head, index dim = head dim = 32, one index head per KV head, blocks of 16, top-16, 1 local block
ATTENTION_BENCH = dict(H=16, Hkv=1, Dh=32, block=16, topk=16, init=0, local=1)


def _bench_attention(impl: str, S: int) -> dict:
    """One attention layer on random q/k/v (and index q/k) in this (fresh) process: dense causal
    SDPA, or the lightning indexer then block-sparse attention, each timed."""
    c = ATTENTION_BENCH
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, S, h, c["Dh"], generator=g) for h in (c["H"], c["Hkv"], c["Hkv"]))
    iq, ik = torch.randn(1, S, c["Hkv"], c["Dh"], generator=g), torch.randn(1, S, c["Dh"], generator=g)
    before, times = _peak_rss_bytes(), {}
    with torch.no_grad():
        t0 = time.perf_counter()
        if impl == "attention-dense":
            y = m3.causal_attention(q, k, v, c["Dh"] ** -0.5)
        else:
            ids = m3.lightning_indexer(iq, ik, c["block"], c["topk"], c["init"], c["local"])
            times["indexer"] = time.perf_counter() - t0
            y = m3.sparse_attention(q, k, v, ids, c["block"], c["Dh"] ** -0.5)
            times["sparse"] = time.perf_counter() - t0 - times["indexer"]
        seconds = time.perf_counter() - t0
    return dict(impl=impl, S=S, seconds=seconds, peak_mb=(_peak_rss_bytes() - before) / 2 ** 20,
                checksum=float(y.double().abs().mean()), **times)


def _bench_one(impl: str, S: int, ckpt: str) -> dict:
    """One measurement in this (fresh) process: forward of the layer stack on S random embeddings."""
    torch.manual_seed(0)
    if impl in ("attention-dense", "attention-sparse"):
        return _bench_attention(impl, S)
    if impl == "transformers":
        from transformers import MiniMaxM3SparseForConditionalGeneration
        hf = MiniMaxM3SparseForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").eval()
        stack = hf.model.language_model
        run = lambda x, pos: stack(inputs_embeds=x, position_ids=pos).last_hidden_state
        width = hf.config.text_config.hidden_size
    else:
        model = m3.from_pretrained(ckpt)
        if impl == "dense":
            dense = m3.init_random_(m3.MiniMaxM3(bench_config(sparse=False)))
            dense.load_state_dict(model.state_dict(), strict=False)    # same weights, no indexer
            model = dense
        text = model.language_model.model
        run = lambda x, pos: text(x, text.layout(pos))
        width = model.config.hidden_size
    x = torch.randn(1, S, width)
    pos = m3.token_positions(torch.ones(1, S, dtype=torch.long), S)
    before = _peak_rss_bytes()
    with torch.no_grad():
        t0 = time.perf_counter()
        y = run(x, pos)
        seconds = time.perf_counter() - t0
    return dict(impl=impl, S=S, seconds=seconds, peak_mb=(_peak_rss_bytes() - before) / 2 ** 20,
                checksum=float(y.double().abs().mean()))


def bench(lengths=(4096, 16384, 65536), dense_max=16384) -> None:
    """Two tables, each measurement in its own process (time; peak memory = RSS growth during it):
    1. one attention layer at the released head ratios (ATTENTION_BENCH): dense causal SDPA against
       the lightning indexer + block-sparse attention, with the GFLOP/s the sparse attention
       achieves on the FLOPs of the selected blocks, at every S in `lengths`;
    2. the tiny sparse layer stack's forward, dense causal attention on the same weights where
       S <= dense_max, and transformers' eager forward at the first S when it is importable."""
    with tempfile.TemporaryDirectory() as tmp:
        model = m3.MiniMaxM3(replace(bench_config(sparse=True), vision=m3.M3Config.tiny().vision))
        m3.save_pretrained(m3.init_random_(model), tmp)
        runs = [(f"attention-{impl}", S) for S in lengths for impl in ("dense", "sparse")]
        runs += [("sparse", S) for S in lengths] + [("dense", S) for S in lengths if S <= dense_max]
        try:
            import transformers  # noqa: F401
            runs.append(("transformers", lengths[0]))
        except ImportError:
            print("transformers is not importable: skipping the transformers eager comparison")
        results = [_bench_process(impl, S, tmp) for impl, S in runs]
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    _print_attention_bench([r for r in results if r["impl"].startswith("attention-")])
    _print_stack_bench([r for r in results if not r["impl"].startswith("attention-")])


def _bench_process(impl: str, S: int, ckpt: str) -> dict:
    """One measurement in a fresh process (its peak RSS is the run's alone)."""
    import subprocess
    cmd = [sys.executable, os.path.abspath(m3.__file__), "bench", "--one", impl, str(S), ckpt]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"bench run {impl} S={S} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_attention_bench(results: list[dict]) -> None:
    c = ATTENTION_BENCH
    print(f"\n1. one attention layer, H={c['H']} query heads per KV head (Hkv={c['Hkv']}), Dh = index dim = "
          f"{c['Dh']}, block {c['block']}, top-{c['topk']}, batch 1; random q/k/v")
    print(f"{'S':>7}{'dense s':>9}{'dense MB':>10}{'indexer s':>11}{'sparse s':>10}{'idx+sparse s':>14}"
          f"{'sparse MB':>11}{'sparse GFLOP/s':>16}{'(idx+sparse)/dense':>20}")
    dense = {r["S"]: r for r in results if r["impl"] == "attention-dense"}
    for r in (r for r in results if r["impl"] == "attention-sparse"):
        d = dense[r["S"]]
        # the selected blocks' FLOPs: q k^T and p v, 2 * Dh each, over topk * block keys per query head
        flops = 4 * r["S"] * c["H"] * c["topk"] * c["block"] * c["Dh"]
        print(f"{r['S']:>7}{d['seconds']:>9.2f}{d['peak_mb']:>10.0f}{r['indexer']:>11.2f}{r['sparse']:>10.3f}"
              f"{r['seconds']:>14.2f}{r['peak_mb']:>11.0f}{flops / r['sparse'] / 1e9:>16.1f}"
              f"{r['seconds'] / d['seconds']:>20.2f}")


def _print_stack_bench(results: list[dict]) -> None:
    cfg = bench_config(sparse=True)
    print(f"\n2. tiny width (D={cfg.hidden_size}, H={cfg.num_attention_heads}, Hkv={cfg.num_key_value_heads}, "
          f"block {cfg.sparse_block_size}, top-{cfg.sparse_topk_blocks}), 2 MoE layers, batch 1")
    print(f"{'attention':<14}{'S':>8}{'forward s':>12}{'peak MB':>10}")
    for r in results:
        print(f"{r['impl']:<14}{r['S']:>8}{r['seconds']:>12.2f}{r['peak_mb']:>10.0f}")
    ours = {r["S"]: r for r in results if r["impl"] == "sparse"}
    for r in results:
        if r["impl"] == "transformers":
            mine = ours[r["S"]]
            print(f"S={r['S']}: transformers eager / ours = {r['seconds'] / mine['seconds']:.1f}x time, "
                  f"{r['peak_mb'] / max(mine['peak_mb'], 1):.1f}x peak memory "
                  f"(output mean |y|: ours {mine['checksum']:.6f}, transformers {r['checksum']:.6f})")


# ---- the offloaded-decoding benchmark ------------------------------------------------------------

def offload_slice_config(layers: int, experts: int) -> m3.M3Config:
    """A release-shaped slice: the released widths (D 6144, 64 query / 4 KV heads of 128, experts
    of 3072, top-4, the indexer, the shared expert) in `layers` MoE + sparse layers of `experts`
    routed experts each; a 1024-token vocabulary, no vision tower, no MTP depth."""
    return replace(m3.minimax_m3_config(), vocab_size=1024, num_hidden_layers=layers, moe_layer_freq=[1] * layers,
                   sparse_attention_freq=[1] * layers, num_local_experts=experts, num_mtp_modules=0, vision=None)


def write_offload_slice(path: Path, cfg: m3.M3Config, seed: int = 0) -> None:
    """The slice as the release stores it: routed experts in MXFP8 (random e4m3 codes, NaN codes
    excluded, with E8M0 scales of 2^-12), 16 experts per shard; everything else in bf16, N(0, 1/fan_in)
    for matrices and 0 for the norms' offsets, in one more shard; and the index."""
    from safetensors.torch import save_file
    with torch.device("meta"):
        shapes = {m3.checkpoint_key(n, cfg): t.shape for n, t in m3.MiniMaxM3(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    experts = sorted(k for k in shapes if ".experts." in k)
    shards = [experts[i:i + 48] for i in range(0, len(experts), 48)] + [[k for k in shapes if ".experts." not in k]]
    path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, keys in enumerate(shards):
        tensors = {}
        for key in keys:
            shape = shapes[key]
            if ".experts." in key:
                codes = torch.randint(0, 126, shape, generator=g, dtype=torch.uint8)
                codes |= torch.randint(0, 2, shape, generator=g, dtype=torch.uint8) << 7      # the sign bit
                tensors[key] = codes.view(torch.float8_e4m3fn)
                tensors[key + m3.SCALE_SUFFIX] = torch.full(m3.mx_scale_shape(shape), 127 - 12, dtype=torch.uint8)
            elif len(shape) >= 2:
                tensors[key] = (torch.randn(shape, generator=g) * shape[-1] ** -0.5).bfloat16()
            else:
                tensors[key] = torch.zeros(shape, dtype=torch.float32 if "bias" in key else torch.bfloat16)
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, path / name)
        weight_map.update({k: name for k in tensors})
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (path / m3.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def bench_offload(path: Path, layers: int = 1, experts: int = 128, tokens: int = 8, prompt: int = 16,
                  caches=(0.0, 0.25, 1.0)) -> None:
    """Offloaded decoding of the release-shaped slice on the CPU (written to `path` first if absent):
    per device-cache size (a share of one layer's experts), the prefill time, decode tokens/s,
    experts and MiB read from disk per decoded token against the lower bound of a token that
    misses every cache (4 experts x 55.7 MiB per MoE layer), and the cache hit rate."""
    cfg = offload_slice_config(layers, experts)
    if not (path / m3.INDEX_FILE).exists():
        t0 = time.perf_counter()
        write_offload_slice(path, cfg)
        print(f"wrote the slice ({layers} layer(s) x {experts} experts, MXFP8) to {path} in "
              f"{time.perf_counter() - t0:.0f} s")
    stored = 3 * cfg.hidden_size * cfg.intermediate_size * (1 + 1 / 32)       # one expert's bytes, MXFP8
    bound = cfg.num_experts_per_tok * layers * stored
    print(f"{'cache (experts)':>16}{'prefill s':>11}{'tokens/s':>10}{'experts/token':>15}{'MiB/token':>11}"
          f"{'bound MiB':>11}{'hit rate':>10}")
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    for share in caches:
        cached = int(share * experts)
        model = m3.load_offloaded(path, "cpu", torch.bfloat16, cached * 2 * stored / (1 + 1 / 32) / 2 ** 30)
        stats, cache = model.expert_cache.stats, model.new_cache()
        with torch.no_grad():
            t0 = time.perf_counter()
            step = model(ids, cache=cache).logits[:, -1:].argmax(-1)
            t1, before = time.perf_counter(), dict(stats)
            for _ in range(tokens):
                step = model(step, cache=cache).logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
        disk = stats["disk"] - before["disk"]
        served = sum(stats[k] - before[k] for k in ("disk", "host", "device"))
        print(f"{cached:>16}{t1 - t0:>11.1f}{tokens / (t2 - t1):>10.3f}{disk / tokens:>15.1f}"
              f"{(stats['bytes_read'] - before['bytes_read']) / tokens / 2 ** 20:>11.3f}{bound / 2 ** 20:>11.3f}"
              f"{1 - disk / max(served, 1):>10.1%}")
        model.expert_cache.close()
