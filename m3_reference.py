"""MiniMax M3 reference: the whole vision-language MoE in one readable PyTorch file.

MiniMax M3 (428B total, ~22B active) is a decoder-only MoE language model with a CLIP-style
vision tower. Part I is the model, in the order data flows through it: the config, the text
layer's pieces (norm, activation, router and experts, RoPE, attention, the lightning indexer and
block-sparse attention), the decoder layer and MTP depth, the text model, the vision tower,
projector, merger and splice, then the full model and its losses (where the data flow is written
out: vision -> splice -> layers -> head -> MTP) and decoding (the KV and index-key cache, padded
batches, greedy and MTP speculative generation). Part II loads and runs it: the kernel flag,
presets, input checks, config.json and checkpoint I/O (MXFP8 included), the image/video
processor, media files, the streamed forward and the offloaded model (a checkpoint larger than
the device: one piece at a time, or the routed experts read on demand) and the CLI. The
golden-tensor generator, the Tracer that names a forward's intermediates and the benchmarks live
beside the checker in golden/generate.py. The torch code here is the specification; the
functions marked @kernel_twin have Triton twins in kernels.py, used only when the flag asks
(M3_KERNELS=triton, set_kernels("triton"), --kernels triton).

Notable features
  - Gemma RMSNorm everywhere in the text model: y = x * rsqrt(mean(x^2) + eps) * (1 + w), fp32.
  - SwiGLU-OAI in every FFN: gate clamped from above, up clamped both sides, g*sigmoid(1.702 g)*(u+1).
  - Sigmoid router with an aux-free correction bias that picks experts but never weights them,
    weights renormalised and scaled by 2.0; one unscaled, ungated shared expert.
  - Per-head q/k Gemma norm, then partial NeoX RoPE on the first `rotary_dim` channels; attention
    scale head_dim^-0.5 (text and vision alike).
  - Lightning indexer + block-sparse attention: each KV group keeps its top-k key blocks.
  - Multi-token prediction (DeepSeek-V3 style): depth k fuses embed(ids shifted by k) with h_{k-1}.
  - Vision: Conv3d patches, 3D RoPE, per-item attention (videos cut into segments), a per-patch
    projector, then a 2x2 patch-merge MLP; features replace placeholder token embeddings.

Sources checked (facts only): transformers `models/minimax_m3_vl`, vLLM `models/minimax_m3`,
NeMo Automodel `models/minimax_m3_vl`, SGLang `minimax_m3*.py`, MiniMax-AI/MSA test references.
Where they disagree, README.md ("Decisions") lists what this file does; each decision is also
noted where it applies.

    pip install -r requirements.txt
    pytest -q
    python m3_reference.py                      # demo forward of the tiny preset
    python m3_reference.py bench                # long-sequence sparse attention benchmark
    python m3_reference.py golden --out golden  # regenerate the golden cases (fixed seeds)
    python m3_reference.py verify golden/       # re-run the reference on every golden case
    python m3_reference.py run --checkpoint DIR --prompt-ids 1,2,3   # streamed forward, one layer resident
    python m3_reference.py check --checkpoint DIR   # read every weight once: formats, scales, NaN/Inf
    python m3_reference.py generate --mtp       # greedy decoding with MTP drafts (tiny preset)
    python m3_reference.py generate --checkpoint DIR --offload-experts --prompt-ids 1,2,3   # experts on demand
    python golden/verify.py --case text --outputs theirs.safetensors   # another stack, numpy only

Shape letters (one meaning each): B batch; S query positions; Sk key positions; Sc a chunk of
query positions; T tokens B*S, flattened; D model width; V vocabulary; H query heads; Hkv KV
heads; G = H / Hkv query heads per KV head; Dh head dim; R rotary channels (rotary_dim); Hi
index heads; Di index dim; nb key blocks; bs block size; topk blocks kept per query; E routed
experts; K experts per token; I FFN width; M MTP depths; N vision patches; n images or videos
(rows of a grid_thw); Dv vision width; Ra vision rotary channels per axis (d_axis); m spatial
merge size; C image channels; Tp frames per temporal patch; P patch size.

Per call: a `Layout` (one forward call's positions [B, S], their RoPE cos/sin and each padded
row's token span) goes to every layer with the layer's `LayerCache` (its K/V and index keys) when
decoding; `Cache` holds one per layer and MTP depth and the history's pad mask.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# ============================================================================================
# Part I: the model
# ============================================================================================
# Config, then each component in the order data flows through it, then the whole model, its
# losses and decoding. Part II (after it) loads and runs: the kernel flag, presets, input
# checks, config.json, checkpoints, the processor, the streamed forward and the CLI.

# ---- Config: the fields the math reads (released values as defaults) ---------------------

@dataclass
class M3Config:
    """Text model fields (released values as defaults) plus an optional vision part. The MTP
    options (MTPConfig) and the vision tower's (VisionConfig) sit with the MTP depth and the tower.

    `moe_layer_freq[i] != 0` makes layer i an MoE layer (None: every layer);
    `sparse_attention_freq[i] != 0` gives layer i the indexer and block-sparse attention
    (None: no layer). Both are normalised to lists of length `num_hidden_layers`.
    config.json is read and written by `config_from_dict` / `config_to_dict`, after the model.
    """
    # embeddings and head
    vocab_size: int = 200064               # V
    hidden_size: int = 6144                # D
    num_hidden_layers: int = 60            # decoder layers (MTP depths come on top)
    rms_norm_eps: float = 1e-6             # every Gemma RMSNorm of the text model
    max_position_embeddings: int = 1048576  # informational: no rope scaling exists in M3
    # attention
    num_attention_heads: int = 64          # H
    num_key_value_heads: int = 4           # Hkv; query head j reads KV head j // (H / Hkv)
    head_dim: int = 128                    # Dh; the attention scale is Dh^-0.5
    rotary_dim: int = 64                   # R: channels rotated per head; the rest pass through
    rope_theta: float = 5e6                # base of the RoPE frequencies theta^(-2i/R)
    # sparse attention (lightning indexer)
    sparse_attention_freq: list[int] | None = None
    sparse_index_dim: int = 128            # Di
    sparse_num_index_heads: int = 4        # Hi: one selection per KV head, so must equal Hkv
    sparse_topk_blocks: int = 16           # key blocks kept per query; forced blocks count inside
    sparse_block_size: int = 128           # bs: keys per block, blocks anchored at position 0
    sparse_init_block: int = 0             # the first blocks, forced ("sinks")
    sparse_local_block: int = 1            # the last blocks up to the query's own, forced; when more
                                           # are forced than topk: init first, then the nearest local
    # feed-forward
    moe_layer_freq: list[int] | None = None
    dense_intermediate_size: int = 12288   # I of the dense MLP layers
    intermediate_size: int = 3072          # I of one routed expert
    shared_intermediate_size: int = 3072   # I of one shared expert
    n_shared_experts: int = 1              # shared experts, fused into one MLP of n * I
    num_local_experts: int = 128           # E
    num_experts_per_tok: int = 4           # K
    routed_scaling_factor: float = 2.0     # multiplies the renormalised routing weights
    swiglu_alpha: float = 1.702            # g * sigmoid(alpha * g)
    swiglu_limit: float = 7.0              # gate clamped above, up clamped both sides
    # multi-token prediction
    num_mtp_modules: int = 1               # MTP depths M (M3 ships one)
    mtp: MTPConfig = field(default_factory=lambda: MTPConfig())   # conventions of the MTP depths (MTPConfig,
                                           # with the MTP depth below); config.json's
                                           # text_config.mtp_config (the reference's own key) lists the
                                           # fields that differ from M3's
    # multimodal (vision=None: a text-only model, which has no placeholders or projector: all None)
    vision: VisionConfig | None = field(default_factory=lambda: VisionConfig())   # with the vision tower
    image_token_index: int | None = 200025  # placeholder id replaced by image features
    video_token_index: int | None = 200026  # placeholder id replaced by video features
    vision_start_token_index: int | None = 200029  # "]<]start of image[>[" before every image and video group
    vision_end_token_index: int | None = 200030    # "]<]end of image[>[" after it
    projector_hidden_size: int | None = 6144  # hidden width of the projector and the patch merger

    def __post_init__(self):
        n = self.num_hidden_layers
        if self.moe_layer_freq is None:
            self.moe_layer_freq = [1] * n
        if self.sparse_attention_freq is None:
            self.sparse_attention_freq = [0] * n
        self.moe_layer_freq = [int(f) for f in self.moe_layer_freq]
        self.sparse_attention_freq = [int(f) for f in self.sparse_attention_freq]
        if self.vision is None:
            self.image_token_index = self.video_token_index = self.projector_hidden_size = None
            self.vision_start_token_index = self.vision_end_token_index = None
        validate_config(self)

    def is_moe(self, i: int) -> bool:
        return self.moe_layer_freq[i] != 0

    def is_sparse(self, i: int) -> bool:
        return self.sparse_attention_freq[i] != 0

    @property
    def mtp_physical_depths(self) -> int:
        """MTP depths with weights of their own: one when repeated, else num_mtp_modules."""
        return min(self.num_mtp_modules, 1) if self.mtp.repeated_layer else self.num_mtp_modules

    def mtp_physical(self, k: int) -> int:
        """The physical depth (its module and its cache, 0-based) that MTP depth k = 1..M runs."""
        return 0 if self.mtp.repeated_layer else k - 1

    # the presets and config.json: Part II ("Presets", "config.json: reading and writing")
    @classmethod
    def minimax_m3(cls) -> "M3Config":
        return minimax_m3_config()

    @classmethod
    def tiny(cls) -> "M3Config":
        return tiny_config()

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "M3Config":
        return config_from_json(path)

    @classmethod
    def from_dict(cls, d: dict) -> "M3Config":
        return config_from_dict(d)

    def to_dict(self) -> dict:
        return config_to_dict(self)


# ---- Kernel twins: each hot function below may run as its Triton twin (Part II, "Kernel flag")

_kernels = None        # kernels.py, loaded when M3_KERNELS=triton, set_kernels("triton") or --kernels triton


def kernel_twin(fn):
    """Marks a function that kernels.py mirrors under the same name and signature: calls go to the
    twin while the flag says "triton". `fn.torch` is always this specification itself."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return (fn if _kernels is None else getattr(_kernels, fn.__name__))(*args, **kwargs)
    call.torch = fn
    return call


# ============================================================================================
# Gemma RMSNorm
# ============================================================================================

@kernel_twin
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """y = x * rsqrt(mean(x^2) + eps) * (1 + w), over the last dim.

    x [..., D] any float dtype, weight [D] (stored as the offset from 1, zero-initialised).
    Computed in fp32 (input, weight and the +1) and cast back to x.dtype once. With `residual`
    [..., D], x is first replaced by x + residual (in x's dtype, as any residual add) and the pair
    (y, x + residual) is returned: the post-attention norm fused with the residual add.
    """
    if residual is not None:
        x = x + residual
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    y = (y * (1.0 + weight.float())).to(x.dtype)
    return y if residual is None else (y, x)


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)


# ============================================================================================
# SwiGLU-OAI, dense MLP
# ============================================================================================

@kernel_twin
def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """out = g * sigmoid(alpha * g) * (u + 1), with g = min(gate, limit), u = clamp(up, -limit, limit).

    gate, up [..., I] (not interleaved: separate projections) -> [..., I]. The gate is clamped
    from above only, the up projection on both sides. Computed in fp32, cast back to gate.dtype.
    """
    g = gate.float().clamp(max=limit)
    u = up.float().clamp(min=-limit, max=limit)
    return (g * torch.sigmoid(alpha * g) * (u + 1.0)).to(gate.dtype)


class MLP(nn.Module):
    """down(swiglu_oai(gate(x), up(x))): the dense FFN of layers 0..2 and the shared expert.
    x [..., D] -> [..., D]; no biases."""

    def __init__(self, dim: int, inter: int, alpha: float, limit: float):
        super().__init__()
        self.alpha, self.limit = alpha, limit
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu_oai(self.gate_proj(x), self.up_proj(x), self.alpha, self.limit))


# ============================================================================================
# Router, routed experts, shared expert, MoE block
# ============================================================================================

@kernel_twin
def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int,
          scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid router with an aux-free correction bias.

    p = sigmoid(x @ W^T)                        [T, E]  fp32 (x and W upcast)
    ids = topk(p + bias, k)                     [T, K]  int64, biased score descending, ties to the lower id
    w = p[ids] / sum(p[ids]) * scaling          [T, K]  fp32: the bias picks, never weights
    """
    p = torch.sigmoid(F.linear(x.float(), weight.float()))
    ids = torch.sort(p + bias.float(), dim=-1, descending=True, stable=True).indices[..., :top_k]
    w = p.gather(-1, ids)
    return w / w.sum(-1, keepdim=True) * scaling, ids


@kernel_twin
def routed_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   w1: Sequence[torch.Tensor], w2: Sequence[torch.Tensor], w3: Sequence[torch.Tensor],
                   alpha: float, limit: float) -> torch.Tensor:
    """sum_k w[t,k] * W2_e swiglu_oai(W1_e x_t, W3_e x_t) with e = ids[t,k].

    x [T, D] model dtype; ids [T, K]; weights [T, K] fp32; w1/w3 per expert [I, D] (gate/up),
    w2 [D, I] (down). Each expert runs only on its tokens; its output (model dtype) is weighted
    after the down projection and accumulated in fp32. Returns [T, D] fp32. An id outside [0, E)
    is a ValueError (a Python index would wrap a negative one round to the last expert).
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    experts = ids.unique().tolist()
    check_expert_ids(experts, len(w1))
    for e in experts:
        tok, slot = (ids == e).nonzero(as_tuple=True)
        xe = x[tok]
        ye = F.linear(swiglu_oai(F.linear(xe, w1[e]), F.linear(xe, w3[e]), alpha, limit), w2[e])
        out.index_add_(0, tok, ye.float() * weights[tok, slot, None])
    return out


def check_expert_ids(experts: list[int], E: int) -> None:
    """The routed experts' ids (ascending) must lie in [0, E)."""
    if experts and (experts[0] < 0 or experts[-1] >= E):
        raise ValueError(f"expert ids must be in [0, {E}) (num_local_experts), got {experts[0] if experts[0] < 0 else experts[-1]}")


class Expert(nn.Module):
    """Weights of one routed expert, named as the checkpoint: w1 gate, w3 up, w2 down."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)


class MoE(nn.Module):
    """out = sum_k w_k expert_{ids_k}(x) + shared(x); x [B, S, D] -> [B, S, D].

    The shared expert has no gate and no scale. Routed outputs accumulate in fp32, the shared
    output joins them in fp32 and the sum is rounded to the model dtype once. The router weight
    and correction bias stay fp32 whatever dtype the model is cast to (checkpoint: fp32 in vLLM
    and SGLang; bf16 top-k drifts).
    """

    def __init__(self, cfg: M3Config):
        super().__init__()
        self.top_k, self.scaling = cfg.num_experts_per_tok, cfg.routed_scaling_factor
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False, dtype=torch.float32)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_local_experts))
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.intermediate_size)
                                     for _ in range(cfg.num_local_experts))
        self.shared_experts = MLP(cfg.hidden_size, cfg.shared_intermediate_size * cfg.n_shared_experts,
                                  cfg.swiglu_alpha, cfg.swiglu_limit)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / to_empty(): the router follows fn's device but never its dtype, and is
        # moved from the fp32 originals so that a cast to bf16 and back loses nothing
        weight, bias = self.gate.weight.data, self.e_score_correction_bias
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=weight.device)).device
        move = lambda t: torch.empty_like(t, device=device) if t.is_meta and device.type != "meta" else t.to(device)
        self.gate.weight.data, self.e_score_correction_bias = move(weight).float(), move(bias).float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        w, ids = route(x_TD, self.gate.weight, self.e_score_correction_bias, self.top_k, self.scaling)
        routed = routed_experts(x_TD, ids, w, [e.w1.weight for e in self.experts],
                                [e.w2.weight for e in self.experts], [e.w3.weight for e in self.experts],
                                self.alpha, self.limit)
        return (routed + self.shared_experts(x_TD).float()).to(x.dtype).view_as(x)


# ============================================================================================
# Partial NeoX RoPE (+ the fused per-head q/k norm)
# ============================================================================================

def rope_angles(position_ids: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of pos * inv_freq, inv_freq[i] = theta^(-2i/rotary_dim), i < rotary_dim/2.

    position_ids [B, S] int -> cos, sin [B, S, rotary_dim/2] fp32 (angles formed in fp32).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32,
                                            device=position_ids.device) / rotary_dim)
    angles = position_ids.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def _rotate(x32: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotation of pairs (i, i + R/2) over the first R = 2 * cos.shape[-1] channels.
    x32 [..., H, Dh] fp32, cos/sin [..., R/2] (broadcast over heads); channels >= R pass through."""
    half = cos.shape[-1]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2, rest = x32[..., :half], x32[..., half:2 * half], x32[..., 2 * half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


@kernel_twin
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Partial NeoX RoPE in fp32, cast back once: for i < R/2, (x_i, x_{i+R/2}) becomes
    (x_i cos - x_{i+R/2} sin, x_{i+R/2} cos + x_i sin); channels >= R pass through.
    x [..., H, Dh], cos/sin [..., R/2] -> [..., H, Dh]."""
    return _rotate(x.float(), cos, sin).to(x.dtype)


@kernel_twin
def norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              eps: float) -> torch.Tensor:
    """Per-head Gemma RMSNorm then partial NeoX RoPE, fp32 throughout, rounded once.

    x [B, S, H, Dh]; weight [Dh] shared by every head; cos/sin [B, S, R/2] -> [B, S, H, Dh].
    """
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())
    return _rotate(y, cos, sin).to(x.dtype)


@dataclass
class Layout:
    """Where one forward call's tokens sit, shared by every layer of it: positions [B, S] (they
    drive RoPE only), their RoPE angles cos, sin [B, S, R/2] fp32, and each row's token span
    [start, end) among the slots when rows are padded (None: no pads; see token_layout). With
    indexer_kl a list (training with indexer_loss="kl"), each sparse attention appends its
    `indexer_kl` loss to it."""
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    spans: list[tuple[int, int]] | None = None
    indexer_kl: list[torch.Tensor] | None = None


# ============================================================================================
# Attention: dense causal GQA, lightning indexer, block-sparse attention
# ============================================================================================

def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_start: int = 0) -> torch.Tensor:
    """softmax(q k^T * scale + causal) v with GQA: query head j reads KV head j // (H / Hkv).
    M3 uses scale = Dh^-0.5. Query i sits at slot q_start + i and sees keys 0..q_start + i.

    q [B, S, H, Dh], k/v [B, Sk, Hkv, Dh] -> [B, S, H, Dh]; fp32 softmax and accumulation.
    SDPA's fused CPU/GPU kernels keep memory linear in S (a cache adds an [S, Sk] mask).
    """
    group = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2).float()                                         # [B, H, S, Dh]
    kt = k.transpose(1, 2).float().repeat_interleave(group, dim=1)         # [B, H, Sk, Dh]
    vt = v.transpose(1, 2).float().repeat_interleave(group, dim=1)
    if q_start == 0 and q.shape[1] == k.shape[1]:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    else:
        seen = torch.arange(k.shape[1], device=q.device)[None, :] <= \
            torch.arange(q_start, q_start + q.shape[1], device=q.device)[:, None]        # [S, Sk]
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=seen, scale=scale)
    return o.transpose(1, 2).to(q.dtype)


@kernel_twin
def index_block_scores(iq: torch.Tensor, ik: torch.Tensor, q_start: int, block_size: int) -> torch.Tensor:
    """Block scores of one query chunk: score[b,h,i,n] = max_{j in block n, j <= q_start+i} <iq[b,i,h], ik[b,j]>.

    iq [B, Sc, Hi, Di] (normed + roped), ik [B, Sk, Di] (one key head shared by all index heads);
    query i sits at slot q_start + i, key j at slot j, block n covers slots [n*bs, (n+1)*bs).
    Plain fp32 dot products (no scale, no ReLU, no head weights), masked token-causally *before*
    the max-pool. Only keys up to the chunk's last query are read, so blocks past it are absent:
    returns [B, Hi, Sc, ceil(min(Sk, q_start + Sc) / bs)] fp32, -inf where a block has no causal key.
    """
    Sc = iq.shape[1]
    kv_len = min(ik.shape[1], q_start + Sc)
    full = kv_len // block_size * block_size
    s = iq.float().transpose(1, 2) @ ik[:, None, :kv_len].float().transpose(-1, -2)   # [B, Hi, Sc, kv_len]
    # keys before q_start are in every query's past: only the chunk's own span needs the mask
    q_slot = torch.arange(q_start, q_start + Sc, device=iq.device)[:, None]
    future = torch.arange(q_start, kv_len, device=iq.device)[None, :] > q_slot
    s[..., q_start:].masked_fill_(future, float("-inf"))
    blocks = s[..., :full].unflatten(-1, (full // block_size, block_size)).amax(-1)   # whole blocks
    if full == kv_len:
        return blocks                                                            # [B, Hi, Sc, nb]
    return torch.cat([blocks, s[..., full:].amax(-1, keepdim=True)], dim=-1)     # + the partial last block


@kernel_twin
def select_blocks(block_scores: torch.Tensor, q_start: int, block_size: int, topk: int,
                  init_blocks: int, local_blocks: int) -> torch.Tensor:
    """Top-k key blocks per (index head, query), forced blocks inside the budget.

    block_scores [B, Hi, Sc, nb] from `index_block_scores`. Query i (slot q_start + i) lives in
    block c; its candidates are blocks 0..c. Blocks < init_blocks and blocks in
    (c - local_blocks, c] are forced; when they do not all fit, init blocks outrank local ones and
    nearer local blocks outrank farther ones. The rest go by score, ties to the lower block id.
    k = min(topk, c + 1).
    Returns int32 [B, Hi, Sc, topk]: the chosen ids sorted ascending, then -1 padding (our canonical
    form: transformers and MSA v1 order by score, so compare selections as sets).
    """
    B, Hi, Sc, nb = block_scores.shape
    dev = block_scores.device
    c = torch.arange(q_start, q_start + Sc, device=dev)[:, None] // block_size    # [Sc, 1]
    n = torch.arange(nb, device=dev)[None, :]                                     # [1, nb]
    causal = n <= c
    init, local = causal & (n < init_blocks), causal & (n > c - local_blocks)
    # forced blocks get fp64 keys far above any fp32 score, ordered init (lowest id first), then
    # local (nearest first, so the query's own block is the last forced block to be dropped)
    priority = torch.where(init, init_blocks + local_blocks - n, local_blocks - (c - n))     # >= 1 if forced
    fill = torch.where(init | local, 2.0 ** 200 * priority.double(), float("-inf"))          # [Sc, nb]
    key = torch.where(init | local | ~causal, fill, block_scores.double())                   # [B, Hi, Sc, nb]
    k = min(topk, nb)
    threshold = key.topk(k, dim=-1).values[..., -1:]                              # k-th largest
    chosen = key >= threshold
    over = chosen.sum(-1) > k
    if bool(over.any()):
        # rows whose ties straddle the k-th place: fill the tied places in block-id order
        key_o, thr_o = key[over], threshold[over]
        tied = key_o == thr_o
        room = k - (key_o > thr_o).sum(-1, keepdim=True)
        chosen[over] = (key_o > thr_o) | (tied & (tied.cumsum(-1) <= room))
    ids = chosen.nonzero()[:, -1].view(B, Hi, Sc, k)                              # ascending ids
    ids = ids.masked_fill(ids > c, -1)          # non-causal picks only fill rows with c + 1 < k
    return F.pad(ids, (0, topk - k), value=-1).to(torch.int32)


def lightning_indexer(iq: torch.Tensor, ik: torch.Tensor, block_size: int, topk: int,
                      init_blocks: int, local_blocks: int, q_start: int = 0,
                      query_chunk: int | None = None) -> torch.Tensor:
    """Block selection for every query: `index_block_scores` + `select_blocks` per query chunk.

    iq [B, S, Hi, Di], ik [B, Sk, Di] -> int32 [B, Hi, S, topk]. Chunking keeps the score
    buffer at [B, Hi, Sc, Sk] (cache-sized) instead of [B, Hi, S, Sk]; the chunk size never changes the result.
    """
    B, S, Hi, _ = iq.shape
    # fp32 scores per chunk: ~8 MB on a CPU (cache-sized), ~1 GB on a GPU (few launches); the same
    # chunks whichever kernels run (the Triton twin keeps no [Sc, Sk] scores of its own)
    budget = 1 << (21 if iq.device.type == "cpu" else 28)
    Sc = query_chunk or max(1, budget // (Hi * max(ik.shape[1], 1)))
    out = []
    # last chunk first: the score buffers shrink from chunk to chunk, so each fits in the memory the
    # previous one freed (growing ones take fresh pages from the OS every time: 2x slower at 16k)
    for s0 in reversed(range(0, S, Sc)):
        scores = index_block_scores(iq[:, s0:s0 + Sc], ik, q_start + s0, block_size)
        out.append(select_blocks(scores, q_start + s0, block_size, topk, init_blocks, local_blocks))
    return torch.cat(out[::-1], dim=2)


def check_block_ids(block_ids: torch.Tensor, nb: int) -> None:
    """Selections attend blocks 0..nb-1 and -1 (an empty slot), nothing else: an id past the keys
    would read another head's block here and nothing in the kernel. A block repeated in a row
    counts once per slot (its keys join the softmax twice), in both implementations."""
    if not block_ids.numel():
        return
    lo, hi = int(block_ids.min()), int(block_ids.max())
    if lo < -1 or hi >= nb:
        bad = lo if lo < -1 else hi
        raise ValueError(f"block_ids must be -1 (empty) or blocks in [0, {nb}) of the {nb} key blocks, got {bad}")


@kernel_twin
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_ids: torch.Tensor,
                     block_size: int, scale: float, q_start: int = 0,
                     query_chunk: int | None = None) -> torch.Tensor:
    """Block-sparse causal GQA: o_i = softmax_j(q_i k_j^T * scale) v_j over the keys j <= q_start + i
    whose block is in block_ids[b, kv_head, i] (M3: scale = Dh^-0.5).

    q [B, S, H, Dh]; k/v [B, Sk, Hkv, Dh]; block_ids int32 [B, Hkv, S, topk] (-1 = empty slot).
    -> [B, S, H, Dh]; fp32 scores, softmax and accumulation.

    The G = H / Hkv query heads of a KV head share its selection: each (query, KV head) is one
    [G, Dh] x [Dh, topk*bs] matmul against its own keys. K and V are first copied block-major
    ([B*Hkv*nb, bs*Dh], one contiguous tile per block), then each query chunk gathers its blocks
    as whole tiles (one index_select each for K and V) and runs batched matmuls. The mask is one
    additive row per (query, KV head), broadcast over the G heads: -inf for empty slots and for the
    keys of the query's own block that lie in its future. Memory grows linearly with S; no [S, S]
    mask or score matrix exists. (Gathering per query keeps the FLOPs at the selected blocks: a
    query block's union of scattered selections is nearly all of its past.)
    """
    B, S, H, Dh = q.shape
    Sk, Hkv, topk = k.shape[1], k.shape[2], block_ids.shape[-1]
    G, nb, K = H // Hkv, -(-Sk // block_size), topk * block_size
    check_block_ids(block_ids, nb)
    tiles = lambda x: F.pad(x.float(), (0, 0, 0, 0, 0, nb * block_size - Sk)).view(B, nb, block_size, Hkv, Dh) \
        .permute(0, 3, 1, 2, 4).reshape(B * Hkv * nb, block_size * Dh)                  # [B*Hkv*nb, bs*Dh]
    kt, vt = tiles(k), tiles(v)
    first = (torch.arange(B * Hkv, device=q.device) * nb).view(B, Hkv, 1, 1)          # row of each (b, h)'s block 0
    offs = torch.arange(block_size, device=q.device)
    # the gathered keys [B*Hkv*Sc, K, Dh] and the scores [B*Hkv*Sc, G, K] stay within ~2^19 fp32
    # (2 MB) on a CPU, so a chunk's matmuls run from cache (at S = 16k, 4x faster than chunks of
    # 8 MB); a GPU wants few, large launches instead (~2^26 fp32: at the released shapes 64 queries,
    # where 2 MB would be 1 query per launch and 300x slower than the Triton kernel)
    budget = 1 << (19 if q.device.type == "cpu" else 26)
    Sc = query_chunk or max(1, budget // (B * Hkv * max(G, Dh) * K))
    out = torch.empty_like(q)
    for s0 in range(0, S, Sc):
        ids = block_ids[:, :, s0:s0 + Sc].long()                                  # [B, Hkv, n, topk]
        n = ids.shape[2]
        safe = ids.clamp(min=0)
        rows = (safe + first).flatten()
        kg = kt.index_select(0, rows).view(-1, K, Dh)                             # [B*Hkv*n, K, Dh]
        vg = vt.index_select(0, rows).view(-1, K, Dh)
        slot = (safe[..., None] * block_size + offs).flatten(3)                   # [B, Hkv, n, K]
        q_slot = torch.arange(q_start + s0, q_start + s0 + n, device=q.device)[:, None]
        keep = (ids >= 0).repeat_interleave(block_size, dim=-1) & (slot <= q_slot)
        bias = torch.zeros(keep.shape, device=q.device).masked_fill_(~keep, float("-inf")).view(-1, 1, K)
        qc = q[:, s0:s0 + n].float().view(B, n, Hkv, G, Dh).transpose(1, 2).reshape(-1, G, Dh)   # [B*Hkv*n, G, Dh]
        scores = torch.bmm(qc, kg.transpose(1, 2)).mul_(scale).add_(bias)        # [B*Hkv*n, G, K]
        o = torch.bmm(scores.softmax(-1), vg).view(B, Hkv, n, G, Dh)
        out[:, s0:s0 + n] = o.transpose(1, 2).reshape(B, n, H, Dh).to(q.dtype)
    return out


def indexer_kl(q: torch.Tensor, k: torch.Tensor, iq: torch.Tensor, ik: torch.Tensor, block_ids: torch.Tensor,
               block_size: int, scale: float) -> torch.Tensor:
    """MSA's indexer distillation loss for one sparse layer (training; MiniMax-AI/MSA v1,
    `kl_full_reference`): mean over (b, index head h, query i) of KL(t || s), both over the keys
    j <= i in the blocks block_ids[b, h, i] selected:
      teacher t = the attention softmax_j(q_i k_j * scale), averaged over the G = H / Hi query heads
          of KV group h, detached (no gradient reaches the attention);
      student s = softmax_j(iq[b, i, h] . ik[b, j] * Di^-0.5), the indexer's token scores.
    Its gradient reaches iq and ik only (the selection itself has none), as MSA's (p_s - t) * scale.
    q [B, S, H, Dh], k [B, S, Hkv, Dh], iq [B, S, Hi, Di], ik [B, S, Di], block_ids int32
    [B, Hi, S, topk] -> [] fp32. O(S^2) memory: a reference, not a trainer.
    """
    B, S, H, _ = q.shape
    Hi, Di = iq.shape[2], iq.shape[3]
    slot = torch.arange(S, device=q.device)
    picked = (block_ids.long()[..., None] == (slot // block_size)).any(-2)        # [B, Hi, S, S]: key j chosen
    keep = picked & (slot[None, :] <= slot[:, None])
    kk = k.float().repeat_interleave(H // k.shape[2], dim=2)                    # [B, S, H, Dh]
    a = torch.einsum("bihd,bjhd->bhij", q.float(), kk) * scale
    a = a.masked_fill(~keep.repeat_interleave(H // Hi, dim=1), float("-inf")).softmax(-1)
    t = a.view(B, Hi, H // Hi, S, S).mean(2).detach()                           # [B, Hi, S, S]
    student = torch.einsum("bihd,bjd->bhij", iq.float(), ik.float()) * Di ** -0.5
    log_s = student.masked_fill(~keep, float("-inf")).log_softmax(-1).masked_fill(~keep, 0.0)
    log_t = t.masked_fill(~keep, 1.0).log()
    return (t * (log_t - log_s)).sum(-1).mean()


@dataclass
class LayerCache:
    """What one attention layer keeps between calls, in the model dtype: k, v [B, Sk, Hkv, Dh] and,
    in a sparse layer, the normed, roped index keys ik [B, Sk, Di], which the indexer ranks new
    queries against. Sk grows by every call's tokens; truncate() rolls back."""
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    ik: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def extend(self, **new: torch.Tensor) -> list[torch.Tensor]:
        """Append the new positions (dim 1) and return the whole of each."""
        for name, t in new.items():
            old = getattr(self, name)
            setattr(self, name, t if old is None else torch.cat([old, t], dim=1))
        return [getattr(self, name) for name in new]

    def truncate(self, length: int) -> None:
        for name in ("k", "v", "ik"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[:, :length])


class Attention(nn.Module):
    """q/k/v projections, per-head q/k Gemma norm + partial RoPE, causal GQA with scale
    head_dim^-0.5 (no other factor), o projection.

    Sparse layers add the lightning indexer (index_q/k_proj + index_q/k_norm, same RoPE table)
    and attend only to the selected key blocks. x [B, S, D] -> [B, S, D]; no biases.
    With a `cache`, the new positions follow the cached ones (queries at slots Sk_past..). With
    `spans` (padded rows), row b's tokens are the slots [start, end) of its whole history: each row
    attends and selects within its own tokens only, blocks anchored at its first token, as if the
    row ran alone; pad positions get a zero attention output.
    """

    def __init__(self, cfg: M3Config, sparse: bool):
        super().__init__()
        D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, Dh
        self.eps, self.scale, self.sparse = cfg.rms_norm_eps, Dh ** -0.5, sparse
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        self.q_norm = GemmaRMSNorm(Dh, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(Dh, cfg.rms_norm_eps)
        if sparse:
            self.n_index_heads, self.index_dim = cfg.sparse_num_index_heads, cfg.sparse_index_dim
            self.block_size, self.topk = cfg.sparse_block_size, cfg.sparse_topk_blocks
            self.init_blocks, self.local_blocks = cfg.sparse_init_block, cfg.sparse_local_block
            self.index_q_proj = nn.Linear(D, self.n_index_heads * self.index_dim, bias=False)
            self.index_k_proj = nn.Linear(D, self.index_dim, bias=False)
            self.index_q_norm = GemmaRMSNorm(self.index_dim, cfg.rms_norm_eps)
            self.index_k_norm = GemmaRMSNorm(self.index_dim, cfg.rms_norm_eps)

    def index_qk(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index queries [B, S, Hi, Di] and the single shared index key [B, S, Di], normed + roped."""
        B, S, _ = x.shape
        iq = norm_rope(self.index_q_proj(x).view(B, S, self.n_index_heads, self.index_dim),
                       self.index_q_norm.weight, cos, sin, self.eps)
        ik = norm_rope(self.index_k_proj(x).view(B, S, 1, self.index_dim),
                       self.index_k_norm.weight, cos, sin, self.eps)
        return iq, ik[:, :, 0]

    def attend(self, q, k, v, iq, ik, q_start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New queries at slots q_start.. against keys at slots 0..: the selected blocks (sparse
        layers, ranked against every index key) or all causal keys. -> ([B, S, H, Dh], the block ids
        [B, Hi, S, topk] or None)"""
        if self.sparse:
            ids = lightning_indexer(iq, ik, self.block_size, self.topk, self.init_blocks, self.local_blocks, q_start)
            return sparse_attention(q, k, v, ids, self.block_size, self.scale, q_start), ids
        return causal_attention(q, k, v, self.scale, q_start), None

    def forward(self, x: torch.Tensor, layout: Layout, cache: LayerCache | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        cos, sin, spans = layout.cos, layout.sin, layout.spans
        q = norm_rope(self.q_proj(x).view(B, S, self.n_heads, self.head_dim), self.q_norm.weight, cos, sin, self.eps)
        k = norm_rope(self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim), self.k_norm.weight, cos, sin, self.eps)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim)
        iq, ik = self.index_qk(x, cos, sin) if self.sparse else (None, None)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.extend(k=k, v=v)
            ik = cache.extend(ik=ik)[0] if self.sparse else None
        if spans is None:
            o, ids = self.attend(q, k, v, iq, ik, past)
            if self.sparse and layout.indexer_kl is not None:
                # the student from a detached input: the KL trains the indexer and nothing before it
                layout.indexer_kl.append(indexer_kl(q, k, *self.index_qk(x.detach(), cos, sin), ids,
                                                    self.block_size, self.scale))
        else:
            o = torch.zeros_like(q)
            for b, (start, end) in enumerate(spans):
                lo, hi = max(past, start), min(past + S, end)                     # this row's new tokens
                if hi > lo:
                    new, seen = slice(lo - past, hi - past), slice(start, hi)
                    o[b:b + 1, new] = self.attend(q[b:b + 1, new], k[b:b + 1, seen], v[b:b + 1, seen],
                                                  iq[b:b + 1, new] if self.sparse else None,
                                                  ik[b:b + 1, seen] if self.sparse else None, lo - start)[0]
        return self.o_proj(o.reshape(B, S, -1))


# ============================================================================================
# Decoder layer, text model
# ============================================================================================

class DecoderLayer(nn.Module):
    """h += attn(input_layernorm(h)); h += ffn(post_attention_layernorm(h)). [B, S, D] -> [B, S, D].
    The FFN is the dense MLP (`mlp`) or the MoE block (`block_sparse_moe`), as the checkpoint names them;
    the first residual add is fused into post_attention_layernorm (rms_norm's `residual`)."""

    def __init__(self, cfg: M3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, sparse=cfg.is_sparse(layer_idx))
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe(layer_idx):
            self.block_sparse_moe = MoE(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.dense_intermediate_size, cfg.swiglu_alpha, cfg.swiglu_limit)

    @property
    def ffn_module(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def forward(self, h: torch.Tensor, layout: Layout, cache: LayerCache | None = None) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(h), layout, cache)
        x, h = self.post_attention_layernorm(a, residual=h)
        return h + self.ffn_module(x)


@dataclass(frozen=True)
class MTPConfig:
    """How the MTP depths are built, chained and trained. The defaults are M3's as SPEC §3 states
    them (the structure and chaining of Automodel's M3 training code, which built the released
    weights); each other value is another implementation's convention, named at its field. The
    presets bundle those of vLLM's drafter, Step3p7 and NemotronV3. README's "MTP variants" table
    compares them."""
    pass_hidden: str = "post_norm"    # the h_k depth k+1 fuses: after the depth's final_layernorm (M3,
                                      # NemotronV3) or "pre_norm", the block output before it (Step3p7
                                      # training, vLLM's drafter from its second draft on)
    repeated_layer: bool = False      # True: one physical depth run num_mtp_modules times, weights tied
                                      # (NemotronV3 use_repeated_layer; vLLM's layers[step % n] with n = 1)
    head: str = "shared"              # logits = lm_head(final_layernorm(h_k)); "per_depth": the depth's own
                                      # `output` projection after its final_layernorm (Step3p7
                                      # transformer.shared_head.{norm, output})
    embed_source: str = "token_ids"   # depth k embeds embed_tokens(ids shifted by k); "inputs_embeds": the
                                      # model's input embeddings shifted by k, vision features included,
                                      # zeros past the end (Step3p7; NemotronV3 given embeddings)
    zero_position0: bool = False      # True: the embedding is zero where the position is 0, before enorm
                                      # (vLLM and RTP at inference; training never does)
    sublayers: str = "decoder_layer"  # one M3 decoder layer (`transformer_layer`); "attention_moe": an
                                      # attention sublayer then an FFN sublayer, each h + mixer(norm(h))
                                      # (NemotronV3 pattern "*E"): the same computation under other names
    loss_weight: float = 0.1          # lambda of mtp_loss = lambda / M * sum_k L_k (SPEC; Automodel's M3
                                      # output names none, its other models and Megatron default to 0.1)
    loss_norm: str = "per_depth"      # L_k = CE over depth k's own valid targets / their count (SPEC's
                                      # reading); "main_tokens": / the main loss's valid-target count
                                      # (Automodel's calculate_mtp_loss, for every model it trains;
                                      # DeepSeek-V3's 1/T)

    # presets of other implementations' conventions: Part II, "Presets"
    @classmethod
    def vllm_drafter(cls, **changes) -> "MTPConfig":
        return mtp_vllm_drafter(**changes)

    @classmethod
    def step3p7(cls, **changes) -> "MTPConfig":
        return mtp_step3p7(**changes)

    @classmethod
    def nemotron_v3(cls, **changes) -> "MTPConfig":
        return mtp_nemotron_v3(**changes)


def mtp_input_ids(input_ids: torch.Tensor, k: int) -> torch.Tensor:
    """The ids MTP depth k embeds: input_ids shifted left by k, the tail filled with id 0. [B, S] -> [B, S]."""
    return F.pad(input_ids[:, k:], (0, min(k, input_ids.shape[1])))


class MTPSublayer(nn.Module):
    """NemotronV3's MTP unit: h + mixer(norm(h)), [B, S, D] -> [B, S, D]; the mixer is M3's
    attention (given the layout and the cache) or its FFN. An attention sublayer then an FFN sublayer
    is a DecoderLayer: norm = input_layernorm / post_attention_layernorm, mixer = self_attn /
    block_sparse_moe (or mlp), and the residual adds round alike."""

    def __init__(self, cfg: M3Config, mixer: nn.Module):
        super().__init__()
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mixer = mixer

    def forward(self, h: torch.Tensor, *attention_args) -> torch.Tensor:
        return h + self.mixer(self.norm(h), *attention_args)


class MTPDepth(nn.Module):
    """One multi-token-prediction depth k (DeepSeek-V3 style, embedding first in the concat):

    x_k      = block(eh_proj(cat[enorm(e_k), hnorm(h_{k-1})]))    [B, S, 2D] -> [B, S, D]
    logits_k = head(final_layernorm(x_k))                          head: the shared lm_head, or the
                                                                   depth's own `output` (head="per_depth")
    block is a full decoder layer built like the last one (`transformer_layer`), or the same math as
    two MTPSublayers (sublayers="attention_moe"). e_k [B, S, D] is the embedding of the tokens k
    ahead (MTPConfig.embed_source); h_{k-1} [B, S, D] the main model's output after `norm` for
    k = 1, else final_layernorm(x_{k-1}) (pass_hidden="post_norm") or x_{k-1} ("pre_norm").
    forward returns x_k, before final_layernorm.
    """

    def __init__(self, cfg: M3Config):
        super().__init__()
        D, last = cfg.hidden_size, cfg.num_hidden_layers - 1
        self.enorm = GemmaRMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = GemmaRMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        if cfg.mtp.sublayers == "decoder_layer":
            self.transformer_layer = DecoderLayer(cfg, last)
        else:
            layer = DecoderLayer(cfg, last)          # built once for its attention and FFN modules
            self.sublayers = nn.ModuleList([MTPSublayer(cfg, layer.self_attn),
                                            MTPSublayer(cfg, layer.block_sparse_moe if cfg.is_moe(last) else layer.mlp)])
        self.final_layernorm = GemmaRMSNorm(D, cfg.rms_norm_eps)
        if cfg.mtp.head == "per_depth":
            self.output = nn.Linear(D, cfg.vocab_size, bias=False)

    @property
    def self_attn(self) -> "Attention":
        return self.transformer_layer.self_attn if hasattr(self, "transformer_layer") else self.sublayers[0].mixer

    @property
    def ffn_module(self) -> nn.Module:
        return self.transformer_layer.ffn_module if hasattr(self, "transformer_layer") else self.sublayers[1].mixer

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, layout: Layout,
                cache: LayerCache | None = None) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        if hasattr(self, "transformer_layer"):
            return self.transformer_layer(x, layout, cache)
        return self.sublayers[1](self.sublayers[0](x, layout, cache))

    def head(self, normed: torch.Tensor, lm_head: nn.Linear) -> torch.Tensor:
        """final_layernorm(x_k) [B, S, D] -> logits_k [B, S, V]."""
        return getattr(self, "output", lm_head)(normed)


class TextModel(nn.Module):
    """embed_tokens -> layers -> norm (no embedding scaling), plus the MTP depths.
    Runs on embeddings so the multimodal splice can happen before it: [B, S, D] -> [B, S, D]."""

    def __init__(self, cfg: M3Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.num_mtp_modules:
            self.mtp = nn.ModuleDict({"layers": nn.ModuleList(MTPDepth(cfg) for _ in range(cfg.mtp_physical_depths))})

    def layout(self, positions: torch.Tensor, spans: list[tuple[int, int]] | None = None) -> Layout:
        """The Layout of a call at positions [B, S] (its RoPE angles: rope_angles)."""
        return Layout(positions, *rope_angles(positions, self.cfg.rotary_dim, self.cfg.rope_theta), spans)

    def forward(self, h: torch.Tensor, layout: Layout, caches: list[LayerCache] | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h = check_finite(layer(h, layout, None if caches is None else caches[i]), f"layer {i} output")
        return self.norm(h)

    def mtp_depth(self, k: int) -> MTPDepth:
        """The module of depth k = 1..M: the one physical depth when repeated."""
        if not (isinstance(k, int) and 1 <= k <= self.cfg.num_mtp_modules):
            raise ValueError(f"MTP depth k must be an int in 1..{self.cfg.num_mtp_modules} (counted from 1), got {k!r}")
        return self.mtp["layers"][self.cfg.mtp_physical(k)]

    def mtp_embeddings(self, k: int, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                       spans: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """e_k [B, S, D]: slot i holds token i + k, embedded by embed_tokens (id 0 past the end of
        the row's tokens) or taken from inputs_embeds (zeros past the end), per
        MTPConfig.embed_source."""
        S, mcfg = input_ids.shape[1], self.cfg.mtp
        ends = torch.full((input_ids.shape[0], 1), S) if spans is None else torch.tensor([[end] for _, end in spans])
        beyond = torch.arange(S) + k >= ends                     # [B, S]: token i + k is past the row's end
        if mcfg.embed_source == "token_ids":
            emb = self.embed_tokens(mtp_input_ids(input_ids, k).masked_fill(beyond.to(input_ids.device), 0))
        else:
            emb = F.pad(inputs_embeds[:, k:], (0, 0, 0, min(k, S))).masked_fill(beyond[..., None].to(inputs_embeds.device), 0.0)
        return emb

    def mtp_step(self, k: int, h_prev: torch.Tensor, emb: torch.Tensor, layout: Layout,
                 cache: LayerCache | None = None):
        """Depth k over e_k and h_{k-1} at the layout's positions (e_k zeroed where the position is 0
        with MTPConfig.zero_position0): -> (final_layernorm(x_k), the head's input; h_k for depth k + 1)."""
        if self.cfg.mtp.zero_position0:
            emb = emb.masked_fill((layout.positions == 0)[..., None], 0.0)
        depth = self.mtp_depth(k)
        x = check_finite(depth(h_prev, emb, layout, cache), f"MTP depth {k} output")
        normed = depth.final_layernorm(x)
        return normed, (normed if self.cfg.mtp.pass_hidden == "post_norm" else x)


class LanguageModel(nn.Module):
    """`model` (the text model) + the untied `lm_head`; `language_model.` in the VL checkpoint."""

    def __init__(self, cfg: M3Config):
        super().__init__()
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def mtp_chain(self, h: torch.Tensor, shifted: list[torch.Tensor], layout: Layout) -> list[torch.Tensor]:
        """Depths k = 1..M chained from h_0 = h [B, S, D], the text model's output, over their
        embeddings shifted[k - 1] (TextModel.mtp_embeddings), at the main model's layout (its
        positions, not shifted, give RoPE and the position-0 rule). -> per depth its own head's logits [B, S, V]
        (head="per_depth") or final_layernorm(x_k) [B, S, D], the shared lm_head's input: the
        caller applies lm_head once, after the last depth, with the main logits."""
        text, out = self.model, []
        for k in range(1, self.model.cfg.num_mtp_modules + 1):
            normed, h = text.mtp_step(k, h, shifted[k - 1], layout)
            out.append(text.mtp_depth(k).head(normed, self.lm_head) if self.model.cfg.mtp.head == "per_depth"
                       else normed)
        return out


# ============================================================================================
# Vision tower: patch embedding, 3D RoPE, encoder layers
# ============================================================================================

@dataclass
class VisionConfig:
    """The CLIP-style vision tower (released values as defaults)."""
    hidden_size: int = 1280                # Dv
    intermediate_size: int = 5120          # MLP width (fc1 output)
    num_hidden_layers: int = 32            # encoder layers
    num_attention_heads: int = 16          # head_dim = Dv / heads; 3D RoPE uses 3 * d_axis of it
    num_channels: int = 3                  # C
    patch_size: int = 14                   # P
    temporal_patch_size: int = 2           # Tp: frames fused by the Conv3d into one patch
    spatial_merge_size: int = 2            # 2x2 patches merged into one text token
    vision_segment_max_frames: int = 4     # temporal groups per attention segment of a video
    rope_theta: float = 10000.0            # base of the 3D RoPE frequencies
    layer_norm_eps: float = 1e-5           # every LayerNorm of the tower

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:            # length of one pixel_values row, laid out (C, Tp, P, P)
        return self.num_channels * self.temporal_patch_size * self.patch_size ** 2


def video_segments(grid_thw: Sequence[Sequence[int]], max_frames: int) -> list[tuple[int, int, int]]:
    """Attention segments: each image is one; a video of t temporal groups is cut into pieces of
    at most `max_frames` groups (rows stay contiguous since t is the outermost patch loop)."""
    return [(min(max_frames, t - s), h, w) for t, h, w in grid_thw for s in range(0, t, max_frames)]


def vision_positions(segments: Sequence[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(t, row, col) of every patch, int64 [N, 3], in the order pixel_values lists them: t outermost,
    then 2x2 merge windows in raster order, then the 4 patches of a window; t restarts per segment."""
    pos = []
    for t, h, w in segments:
        # raster index of each patch: [h, w] -> [h/m, m, w/m, m] -> [h/m, w/m, m, m], so that
        # consecutive m*m patches form one window
        raster = torch.arange(h * w).reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten()
        hw = torch.stack([raster // w, raster % w], dim=-1).repeat(t, 1)            # [t*h*w, 2]
        pos.append(torch.cat([torch.arange(t).repeat_interleave(h * w)[:, None], hw], dim=-1))
    return torch.cat(pos)


def vision_rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE: angles [t | row | col] per patch, each axis with its own copy of the frequencies.

    d_axis = 2 * floor(floor(head_dim / 3) / 2) channels per axis, inv_freq[j] = theta^(-2j/d_axis);
    positions [N, 3] -> cos, sin [N, 3 * d_axis / 2] fp32 (pairs (i, i + 3*d_axis/2) rotate, the
    channels past 3 * d_axis pass through).
    """
    d_axis = 2 * ((head_dim // 3) // 2)
    inv_freq = 1.0 / theta ** (torch.arange(0, d_axis, 2, dtype=torch.float32, device=positions.device) / d_axis)
    angles = (positions.float()[:, :, None] * inv_freq).flatten(1)                # [N, 3 * d_axis/2]
    return angles.cos(), angles.sin()


def layer_norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    """y = (x - mean(x)) * rsqrt(var(x) + eps) * w + b over the last dim, computed in fp32 and cast
    back once. x [..., Dv] -> [..., Dv]."""
    return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps).to(x.dtype)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """x * Phi(x), the exact (erf) GELU in fp32, cast back once; the checkpoint says "gelu", not the
    tanh or quick variants. Elementwise: [...] -> [...]."""
    return F.gelu(x.float()).to(x.dtype)


class VisionAttention(nn.Module):
    """Bidirectional MHA with biases and 3D RoPE, full within each segment, never across:
    softmax(q k^T * head_dim^-0.5) v per segment, fp32 softmax.
    x [N, Dv], cos/sin [N, 3 * Ra / 2], lengths: rows per segment (sum N) -> [N, Dv]."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.scale = v.num_attention_heads, v.head_dim, v.head_dim ** -0.5
        self.q_proj = nn.Linear(v.hidden_size, v.hidden_size)
        self.k_proj = nn.Linear(v.hidden_size, v.hidden_size)
        self.v_proj = nn.Linear(v.hidden_size, v.hidden_size)
        self.out_proj = nn.Linear(v.hidden_size, v.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q = rope(self.q_proj(x).view(N, self.n_heads, self.head_dim), cos, sin)
        k = rope(self.k_proj(x).view(N, self.n_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(N, self.n_heads, self.head_dim)
        out = [F.scaled_dot_product_attention(qs.transpose(0, 1).float(), ks.transpose(0, 1).float(),
                                              vs.transpose(0, 1).float(), scale=self.scale).transpose(0, 1)
               for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
        return self.out_proj(torch.cat(out).reshape(N, -1).to(x.dtype))


class VisionMLP(nn.Module):
    """fc2(gelu(fc1(x))) with biases: [N, Dv] -> [N, Dv]."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """CLIP pre-norm block: x += attn(LN1(x)); x += fc2(gelu(fc1(LN2(x)))). [N, Dv] -> [N, Dv]."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.self_attn = VisionAttention(v)
        self.layer_norm2 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.mlp = VisionMLP(v)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.self_attn(layer_norm(x, self.layer_norm1), cos, sin, lengths)
        return x + self.mlp(layer_norm(x, self.layer_norm2))


class VisionTower(nn.Module):
    """pixel rows [N, C*Tp*P*P] laid out (C, Tp, P, P), grids (t, h, w) -> patch features [N, Dv].

    Conv3d patch embedding with kernel = stride = (Tp, P, P) and no bias (one matmul per row),
    `pre_layrnorm`, the encoder layers, no post-layernorm. The nesting (`vision_model.embeddings`,
    `vision_model.encoder.layers`) only mirrors the checkpoint keys.
    """

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.cfg = v
        patch = nn.Conv3d(v.num_channels, v.hidden_size, bias=False,
                          kernel_size=(v.temporal_patch_size, v.patch_size, v.patch_size))
        self.vision_model = nn.ModuleDict({
            "embeddings": nn.ModuleDict({"patch_embedding": patch}),
            "pre_layrnorm": nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps),   # sic, checkpoint spelling
            "encoder": nn.ModuleDict({"layers": nn.ModuleList(VisionEncoderLayer(v) for _ in range(v.num_hidden_layers))}),
        })

    def forward(self, pixel_values: torch.Tensor, grid_thw: Sequence[Sequence[int]]) -> torch.Tensor:
        vm, v = self.vision_model, self.cfg
        weight = vm["embeddings"]["patch_embedding"].weight
        x = F.linear(pixel_values.to(weight.dtype), weight.flatten(1))              # [N, Dv]
        x = layer_norm(x, vm["pre_layrnorm"])
        segments = video_segments(grid_thw, v.vision_segment_max_frames)
        positions = vision_positions(segments, v.spatial_merge_size).to(x.device)
        cos, sin = vision_rope_angles(positions, v.head_dim, v.rope_theta)
        lengths = [t * h * w for t, h, w in segments]
        for layer in vm["encoder"]["layers"]:
            x = layer(x, cos, sin, lengths)
        return x


# ============================================================================================
# Projector, patch merger, multimodal splice
# ============================================================================================

class Projector(nn.Module):
    """linear_2(gelu(linear_1(x))) with biases: `multi_modal_projector` (per patch, Dv -> D) and
    `patch_merge_mlp` (per 2x2 window of projected patches, 4D -> D)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden)
        self.linear_2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(gelu(self.linear_1(x)))


def splice(embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor, token_id: int,
           what: str) -> torch.Tensor:
    """Replace the embeddings at input_ids == token_id, in row-major (batch, position) order,
    by the feature rows. embeds [B, S, D], features [number of placeholders, D] -> [B, S, D]; other
    rows untouched."""
    mask = input_ids == token_id
    n = int(mask.sum())
    if n != features.shape[0]:
        raise ValueError(f"input_ids hold {n} {what} placeholder tokens (id {token_id}) but the vision "
                         f"tower produced {features.shape[0]} {what} feature rows; the counts must match")
    out = embeds.clone()
    out[mask] = features.to(embeds.dtype)
    return out


# ============================================================================================
# The full model and its losses
# ============================================================================================

@dataclass
class M3Output:
    logits: torch.Tensor                 # [B, S, V]
    mtp_logits: list[torch.Tensor]       # one [B, S, V] per MTP depth (none with a cache)
    loss: torch.Tensor | None = None     # lm_loss + mtp_loss (+ indexer_loss when asked for)
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    indexer_loss: torch.Tensor | None = None   # indexer_loss="kl": the sum of every sparse layer's indexer_kl
    hidden: torch.Tensor | None = None   # [B, S, D] the text model's output after the final norm
    inputs_embeds: torch.Tensor | None = None  # [B, S, D] the text model's input (media spliced in)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, shift: int,
                      mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) over valid i of CE(logits[:, i], labels[:, i + shift]), in fp32.

    Positions whose target falls past the end or is -100 are not valid, and with `mask` [B, S] (0 =
    pad) neither are pad positions. logits [B, S, V], labels [B, S] (labels = input ids, the shift
    happens here).
    """
    target = F.pad(labels[:, shift:], (0, min(shift, labels.shape[1])), value=-100)
    valid = target != -100
    if mask is not None:
        valid &= mask.bool()
    ce = F.cross_entropy(logits.float().flatten(0, 1), target.clamp(min=0).flatten(), reduction="none")
    return (ce * valid.flatten()).sum(), valid.sum()


def add_losses(out: M3Output, labels: torch.Tensor | None, mcfg: MTPConfig,
               mask: torch.Tensor | None = None) -> M3Output:
    """Fill lm_loss, mtp_loss and loss from the logits (nothing without labels; pads never count);
    see MiniMaxM3."""
    if labels is not None:
        if mask is not None:
            labels = labels.masked_fill(mask == 0, -100)
        main, n_main = cross_entropy_sum(out.logits, labels, 1, mask)
        out.lm_loss = out.loss = main / n_main.clamp(min=1)
        if out.mtp_logits:
            terms = [cross_entropy_sum(lg, labels, 1 + k, mask) for k, lg in enumerate(out.mtp_logits, start=1)]
            per_depth = [total / (count if mcfg.loss_norm == "per_depth" else n_main).clamp(min=1)
                         for total, count in terms]
            out.mtp_loss = mcfg.loss_weight / len(per_depth) * sum(per_depth)
            out.loss = out.lm_loss + out.mtp_loss
    return out


class MiniMaxM3(nn.Module):
    """Vision tower + projector + patch merger + text model + lm_head + MTP.

    forward(input_ids [B, S], pixel_values [N, C*Tp*P*P], image_grid_thw [n, 3], the same for
    videos, position_ids [B, S], labels [B, S], attention_mask [B, S], cache) -> M3Output. Position
    ids drive RoPE only (default: each row's tokens counted from 0, pads not counted); causality and
    sparse blocks follow each token's place among its row's tokens. attention_mask (1 token, 0 pad)
    pads rows on the left or right: a padded row's outputs equal the row run alone. With a `cache`
    (new_cache()), the tokens follow those of earlier calls and only their logits come back (no MTP
    logits: generate() runs the MTP depths as a drafter); attention_mask then covers this call's
    tokens, and position_ids, if used, must be given on every call (the cache keeps no positions).

    With labels (= the input ids; -100 ignored), CE_k(i) = CE(logits_k[:, i], labels[:, i + 1 + k])
    with logits_0 the main head and logits_k the MTP depth k = 1..M, summed over the valid positions
    (target inside the row and not -100), N_k of them:
        lm_loss = sum CE_0 / N_0;   L_k = sum CE_k / N_k (MTPConfig.loss_norm="main_tokens": / N_0)
        mtp_loss = lambda / M * sum_k L_k (lambda = MTPConfig.loss_weight, 0.1);   loss = lm_loss + mtp_loss
    The MTP depths follow config.mtp (MTPConfig: M3's conventions by default).
    """

    def __init__(self, cfg: M3Config):
        super().__init__()
        self.config = cfg
        self.drafter_only = False            # from_pretrained(drafter_only=True): only the drafter's weights are real
        self.language_model = LanguageModel(cfg)
        if cfg.vision is not None:
            v = cfg.vision
            self.vision_tower = VisionTower(v)
            self.multi_modal_projector = Projector(v.hidden_size, cfg.projector_hidden_size, cfg.hidden_size)
            self.patch_merge_mlp = Projector(cfg.hidden_size * v.spatial_merge_size ** 2,
                                             cfg.projector_hidden_size, cfg.hidden_size)

    def vision_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Tower -> projector (per patch) -> 4 consecutive rows concatenated -> patch merger.
        [N, C*Tp*P*P] -> [N / m^2, D]."""
        x = self.multi_modal_projector(self.vision_tower(pixel_values, grid_thw.tolist()))
        return self.patch_merge_mlp(x.reshape(-1, x.shape[-1] * self.config.vision.spatial_merge_size ** 2))

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None,
              pixel_values_videos=None, video_grid_thw=None) -> torch.Tensor:
        """Token embeddings with image features, then video features, spliced in. -> [B, S, D].
        The features are computed first (images, then videos), then the token embeddings."""
        cfg, features = self.config, []
        media = [("image", pixel_values, image_grid_thw, "pixel_values", "image_grid_thw", cfg.image_token_index),
                 ("video", pixel_values_videos, video_grid_thw, "pixel_values_videos", "video_grid_thw",
                  cfg.video_token_index)]
        for what, pixels, grid, pix_name, grid_name, token_id in media:
            if pixels is None and grid is None:
                n = int((input_ids == token_id).sum()) if cfg.vision is not None else 0
                if n:
                    raise ValueError(f"input_ids hold {n} {what} placeholder tokens (id {token_id}) but no "
                                     f"{pix_name} were given, so the vision tower produced 0 {what} feature rows")
                continue
            _check_media(cfg, pixels, grid, pix_name, grid_name)
            features.append((what, token_id, self.vision_features(pixels, grid)))
        h = self.language_model.model.embed_tokens(input_ids)
        for what, token_id, f in features:
            h = splice(h, input_ids, f, token_id, what)
        return h

    def forward(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, position_ids=None, labels=None,
                attention_mask=None, cache: "Cache | None" = None, inputs_embeds=None,
                indexer_loss: str | None = None) -> M3Output:
        """-> logits [B, S, V] (for the new tokens only when a cache is given), the MTP logits
        (none with a cache), the final hidden state and, with labels, the losses. inputs_embeds
        [B, S, D] replaces embed(): generate passes the token embeddings of generated tokens, which
        are text even where a model emits a media placeholder id. indexer_loss="kl" (training,
        one uncached, unpadded call) adds indexer_loss, the sum of every sparse attention's
        indexer_kl (MTP depths' included), to the output and to loss."""
        cfg = self.config
        if self.drafter_only:
            raise ValueError("this model holds only the MTP drafter's weights (from_pretrained drafter_only): "
                             "run mtp_pass / draft_logits on the target model's hidden states, or load the whole checkpoint")
        _check_ids(input_ids, labels, position_ids, cfg.vocab_size, attention_mask)
        mask, spans, positions = token_layout(input_ids, attention_mask, cache)
        text, lm_head = self.language_model.model, self.language_model.lm_head
        layout = text.layout(positions if position_ids is None else position_ids, spans)
        if indexer_loss is not None:
            _check_indexer_loss(cfg, indexer_loss, cache, spans)
            layout.indexer_kl = []
        # in the order of the pieces a streamed run holds one at a time (stream_forward): vision,
        # embeddings (the MTP depths' too), each layer, the norm, each MTP depth, then the head
        if inputs_embeds is not None:
            _check_embeds(inputs_embeds, input_ids, cfg.hidden_size, pixel_values, pixel_values_videos)
        else:
            inputs_embeds = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        M = cfg.num_mtp_modules if cache is None else 0           # a cached call runs no MTP depth
        shifted = [text.mtp_embeddings(k, input_ids, inputs_embeds, spans) for k in range(1, M + 1)]
        past = None if cache is None else cache.length
        try:
            h = text(check_finite(inputs_embeds, "embeddings"), layout, None if cache is None else cache.layers)
        except BaseException:                       # a failed call leaves the cache as it was
            if cache is not None:
                cache.truncate(past)
            raise
        if cache is not None:
            cache.mask = mask
        heads = self.language_model.mtp_chain(h, shifted, layout) if M else []
        own = cfg.mtp.head == "per_depth"
        out = M3Output(logits=lm_head(h), mtp_logits=[x if own else lm_head(x) for x in heads], hidden=h,
                       inputs_embeds=inputs_embeds)
        out = add_losses(out, labels, cfg.mtp, attention_mask)
        if layout.indexer_kl is not None:
            out.indexer_loss = sum(layout.indexer_kl)
            out.loss = None if out.loss is None else out.loss + out.indexer_loss
        return out

    def new_cache(self) -> "Cache":
        """An empty cache for forward(..., cache=) and generate (see the Decoding section)."""
        return Cache.empty(self.config)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> tuple[torch.Tensor, dict]:
        """Greedy decoding, optionally with MTP speculative decoding: see generate() below."""
        return generate(self, input_ids, max_new_tokens, **kwargs)


# ============================================================================================
# Decoding: the cache, padded batches, greedy generation, MTP speculative decoding
# ============================================================================================
# A serving engine runs M3 a few tokens at a time. The cache holds, per attention layer (and per
# MTP depth), the keys and values and, in sparse layers, the normed and roped index keys of every
# processed position; new queries sit after the cached positions, and a sparse layer ranks them
# against all cached index keys with the prefill rules (forced init and local blocks inside the
# top-k budget, anchored at the row's first token). Padded rows keep their pads in the cache;
# each row attends, selects and counts positions within its own tokens only.

@dataclass
class Cache:
    """Everything kept between forward calls: a LayerCache per decoder layer and per MTP depth,
    and the attention mask of every cached position, mask [B, Sk] (1 token, 0 pad)."""
    layers: list[LayerCache]
    mtp: list[LayerCache]
    mask: torch.Tensor | None = None

    @classmethod
    def empty(cls, cfg: M3Config) -> "Cache":
        return cls([LayerCache() for _ in range(cfg.num_hidden_layers)],
                   [LayerCache() for _ in range(cfg.mtp_physical_depths)])

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def truncate(self, length: int) -> None:
        """Roll the decoder layers and the mask back to their first `length` positions (the MTP
        depths' caches are the drafter's: generate rolls them back itself)."""
        if not isinstance(length, int) or not 0 <= length <= self.length:
            raise ValueError(f"truncate length must be an int in [0, {self.length}] (the cached positions), "
                             f"got {length!r}")
        for layer in self.layers:
            layer.truncate(length)
        self.mask = None if self.mask is None else self.mask[:, :length]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The cache as named tensors, what a prefill node hands a decode node: `mask` [B, Sk];
        `layers.{i}.k`, `.v` [B, Sk, Hkv, Dh] and, in sparse layers, `.index_keys` [B, Sk, Di] (the
        normed, roped index keys: without them a decode step has no history to rank); `mtp.{p}.*`
        likewise for each MTP depth that has run (the drafter's own lengths)."""
        if self.mask is None:
            raise ValueError("the cache is empty: run a forward with it first")
        out = {"mask": self.mask}
        for prefix, caches in (("layers", self.layers), ("mtp", self.mtp)):
            for i, layer in enumerate(caches):
                names = {"k": layer.k, "v": layer.v, "index_keys": layer.ik}
                out.update({f"{prefix}.{i}.{n}": t for n, t in names.items() if t is not None})
        return out

    @classmethod
    def from_tensors(cls, cfg: M3Config, tensors: dict[str, torch.Tensor]) -> "Cache":
        """The inverse of tensors(). Every decoder layer's k and v, and index_keys in its sparse
        layers, must be present, shaped for the config and as long as `mask`; an MTP depth's
        entries are all present or all absent (a depth that has not run). Anything else is a
        ValueError naming the tensor, never a cache that silently lacks part of the history."""
        mask = tensors.get("mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("cache tensors need `mask` [B, Sk] (1 token, 0 pad)")
        cache, kv, expected = cls.empty(cfg), [cfg.num_key_value_heads, cfg.head_dim], {"mask"}
        entries = [(f"layers.{i}", c, cfg.is_sparse(i)) for i, c in enumerate(cache.layers)] + \
                  [(f"mtp.{p}", c, cfg.is_sparse(cfg.num_hidden_layers - 1)) for p, c in enumerate(cache.mtp)]
        for name, layer, sparse in entries:
            want = {"k": kv, "v": kv, **({"index_keys": [cfg.sparse_index_dim]} if sparse else {})}
            expected |= {f"{name}.{n}" for n in want}
            got = {n: tensors[f"{name}.{n}"] for n in want if f"{name}.{n}" in tensors}
            if name.startswith("mtp") and not got:
                continue                                                  # a depth that has not run
            _check_cache_entry(name, want, got, mask.shape[0], mask.shape[1] if name.startswith("layers") else None)
            layer.k, layer.v, layer.ik = got["k"], got["v"], got.get("index_keys")
        unknown = sorted(set(tensors) - expected)
        if unknown:
            raise ValueError(f"cache tensors {unknown} belong to no layer of this config")
        cache.mask = mask
        return cache


def _check_cache_entry(name: str, want: dict[str, list[int]], got: dict, B: int, Sk: int | None) -> None:
    """One layer's cache tensors: all of `want` present, each [B, Sk, *want[n]] (Sk: the mask's for
    a decoder layer, the layer's own k length for an MTP depth)."""
    missing = [f"{name}.{n}" for n in want if n not in got]
    if missing:
        raise ValueError(f"cache tensors lack {', '.join(missing)}: {name} needs "
                         f"{', '.join(f'{name}.{n}' for n in want)}")
    k = got["k"]
    length = Sk if Sk is not None else (k.shape[1] if isinstance(k, torch.Tensor) and k.dim() > 1 else -1)
    for n, t in got.items():
        if not isinstance(t, torch.Tensor) or list(t.shape) != [B, length, *want[n]]:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"cache tensor {name}.{n} is {shape}, expected [{B}, {length}, "
                             f"{', '.join(map(str, want[n]))}] ([B, Sk, ...])")


def row_spans(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each row's tokens in a mask [B, Sk]; they must be one run (pads on the left
    and/or right only). A row of pads only (so far, in a chunked prefill) is the empty (Sk, Sk)."""
    spans = []
    for b, row in enumerate(mask.bool()):
        at = row.nonzero()[:, 0]
        if at.numel() == 0:
            spans.append((row.numel(), row.numel()))
            continue
        start, end = int(at[0]), int(at[-1]) + 1
        if end - start != at.numel():
            raise ValueError(f"attention_mask row {b} has pads between its tokens: pad rows on the left or the right "
                             f"only (and on the left to generate)")
        spans.append((start, end))
    return spans


def token_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None):
    """(the mask of the whole history [B, Sk], each row's token span or None when nothing is
    padded, the new tokens' default positions [B, S]: their place among the row's tokens). With a
    cache, attention_mask covers this call's tokens only: the cache keeps the earlier ones'."""
    new = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    if cache is not None and cache.mask is not None:
        if cache.mask.shape[0] != input_ids.shape[0]:
            raise ValueError(f"input_ids have {input_ids.shape[0]} rows but the cache holds {cache.mask.shape[0]}")
        new = torch.cat([cache.mask, new], dim=1)
    return new, (None if bool(new.all()) else row_spans(new)), token_positions(new, input_ids.shape[1])


def token_positions(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The positions of the last n slots of mask [B, Sk]: each one's place among its row's tokens
    (pads are not counted; their own positions are never used). -> [B, n]"""
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, -n:]


def mtp_pass(model: MiniMaxM3, layer: LayerCache, k: int, emb: torch.Tensor, h_prev: torch.Tensor,
             positions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP depth k (1..M) as a drafter runs it, over S new slots after those in its cache `layer`:
    slot p fuses emb[p] [B, S, D] with h_prev[p] at positions[p] (emb zeroed at position 0 with
    MTPConfig.zero_position0); `mask` [B, cached + S] marks the depth's tokens and pads.
    -> (final_layernorm(x_k), the hidden state passed on), each [B, S, D]."""
    text = model.language_model.model
    layout = text.layout(positions, None if bool(mask.all()) else row_spans(mask))
    return text.mtp_step(k, h_prev, emb, layout, layer)


def draft_logits(model: MiniMaxM3, k: int, normed: torch.Tensor) -> torch.Tensor:
    """Depth k's logits [B, S, V] from final_layernorm(x_k) [B, S, D]."""
    return model.language_model.model.mtp_depth(k).head(normed, model.language_model.lm_head)


def generate(model: MiniMaxM3, input_ids: torch.Tensor, max_new_tokens: int, pixel_values=None,
             image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, attention_mask=None,
             mtp: bool = False, draft_tokens: int | None = None, eos_token_id: int | None = None,
             draft_trace: list | None = None) -> tuple[torch.Tensor, dict]:
    """Greedy decoding: -> (tokens [B, S + max_new_tokens], stats), tokens in input_ids' dtype.
    Rows may be left-padded (attention_mask). After a row's eos_token_id its tokens are
    eos_token_id; generation stops once every row has one, and the rest is filled with it.

    With mtp=True each step drafts `draft_tokens` (default: the number of MTP depths) tokens with
    the MTP depths, as vLLM's drafter does for M3's one depth, then verifies them with one forward
    of the main model (`_speculative_step`). The depths follow config.mtp, as in the training
    forward: M3's conventions by default, vLLM's drafter with MTPConfig.vllm_drafter(). Greedy
    verification makes the tokens those of plain greedy decoding. stats: steps (forward calls
    after the prefill), drafted, accepted, acceptance (accepted / drafted). draft_trace, a list,
    gets per step a dict of drafts [B, n], draft_logits [B, n, V] and accepted a.
    """
    _check_generate(model.config, input_ids, max_new_tokens, mtp, draft_tokens, attention_mask)
    n_draft = draft_tokens or model.config.num_mtp_modules
    cache = model.new_cache()
    stats = {"steps": 0, "drafted": 0, "accepted": 0}
    with torch.no_grad():
        out = model(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                    attention_mask=attention_mask, cache=cache)
        new = [out.logits[:, -1].argmax(-1)]                                      # [B] each
        if mtp:
            embed = model.language_model.model.embed_tokens
            source = out.inputs_embeds if model.config.mtp.embed_source == "inputs_embeds" else embed(input_ids)
            drafter = _first_pass(model, cache, torch.cat([source[:, 1:], embed(new[-1][:, None])], 1), out.hidden)
        while len(new) < max_new_tokens and not _all_ended(new, eos_token_id):
            stats["steps"] += 1
            if not mtp:
                new.append(_step(model, new[-1][:, None], cache).logits[:, -1].argmax(-1))
                continue
            verified, drafter = _speculative_step(model, cache, new[-1], drafter, n_draft, stats, draft_trace)
            new += list(verified.unbind(1))
    tokens = torch.stack(new, 1)[:, :max_new_tokens].to(input_ids.dtype)
    if eos_token_id is not None:                 # after a row's first eos: eos, up to max_new_tokens
        tokens = F.pad(tokens, (0, max_new_tokens - tokens.shape[1]), value=eos_token_id)
        tokens = tokens.masked_fill((tokens == eos_token_id).cumsum(1) > 0, eos_token_id)
    stats["acceptance"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else None
    return torch.cat([input_ids, tokens], 1), stats


def _check_generate(cfg: M3Config, input_ids, max_new_tokens, mtp, draft_tokens, attention_mask) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if mtp and not cfg.num_mtp_modules:
        raise ValueError("mtp=True needs MTP depths, and this model has none")
    if draft_tokens is not None and (not mtp or not isinstance(draft_tokens, int) or draft_tokens < 1):
        raise ValueError(f"draft_tokens must be an int >= 1 and goes with mtp=True, got {draft_tokens!r} "
                         f"(mtp={mtp})")
    _check_ids(input_ids, None, None, cfg.vocab_size, attention_mask)
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        b = int((attention_mask[:, -1] == 0).nonzero()[0])
        raise ValueError(f"generate needs left padding: row {b}'s last prompt position is a pad")


def _speculative_step(model: MiniMaxM3, cache: Cache, newest: torch.Tensor, drafter: tuple, n: int, stats: dict,
                      trace: list | None) -> tuple[torch.Tensor, tuple]:
    """One step of MTP speculative decoding after the newest token [B]; drafter = (x, h), the
    first pass's last slot (`_first_pass`). -> (the verified tokens [B, a + 1], the next drafter).
      - drafts: `_draft` runs n drafts from the first pass's last slot.
      - verify: the main model takes [newest token, draft 1..n] in one forward; a row accepts the
        longest prefix of drafts equal to its own greedy predictions; all rows keep the shortest
        such prefix a, plus the main model's token after it.
      - rollback: the main cache keeps the verified slots, the first MTP depth drops to where its
        drafts began, other depths start empty; then the first pass over the verified slots."""
    drafts, logits = _draft(model, cache, *drafter, n)                    # [B, n], [B, n, V]
    past = cache.length
    check = _step(model, torch.cat([newest[:, None], drafts], 1), cache)
    preds = check.logits.argmax(-1)                                       # [B, n + 1]
    a = int((drafts == preds[:, :-1]).long().cumprod(-1).sum(-1).min())   # accepted by every row
    stats["drafted"] += n * drafts.shape[0]
    stats["accepted"] += a * drafts.shape[0]
    if trace is not None:
        trace.append({"drafts": drafts, "draft_logits": logits, "accepted": a})
    cache.truncate(past + a + 1)
    cache.mtp[0].truncate(past)
    for later in cache.mtp[1:]:
        later.truncate(0)
    verified = torch.cat([drafts[:, :a], preds[:, a:a + 1]], 1)
    embed = model.language_model.model.embed_tokens
    return verified, _first_pass(model, cache, embed(verified), check.hidden[:, :a + 1])


def _step(model: MiniMaxM3, ids: torch.Tensor, cache: Cache) -> M3Output:
    """The main model over generated tokens ids [B, n] after the cache, embedded as text."""
    return model(ids, cache=cache, inputs_embeds=model.language_model.model.embed_tokens(ids))


def _all_ended(new: list[torch.Tensor], eos_token_id: int | None) -> bool:
    return eos_token_id is not None and bool((torch.stack(new, 1) == eos_token_id).any(1).all())


def _first_pass(model: MiniMaxM3, cache: Cache, emb: torch.Tensor, hidden: torch.Tensor):
    """Depth 1 over the S slots the main model has just verified (the last S of cache.mask; the
    whole prompt at first), at their positions: slot p fuses emb[p], the embedding of the token at
    p + 1 (the newest sampled token at the last slot; embed_tokens of the ids, or with
    embed_source="inputs_embeds" the prompt's spliced embeddings), with hidden[p], the main
    model's post-norm state: the training alignment of depth 1. emb, hidden [B, S, D] -> the last
    slot's (final_layernorm(x_1), h_1), each [B, 1, D], whose logits give draft 1."""
    positions = token_positions(cache.mask, emb.shape[1])
    x, h = mtp_pass(model, cache.mtp[0], 1, emb, hidden, positions, cache.mask)
    return x[:, -1:], h[:, -1:]


def _draft(model: MiniMaxM3, cache: Cache, x: torch.Tensor, h: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n draft tokens [B, n] and their logits [B, n, V]: the first from the first pass's last slot
    (x: its final_layernorm output, h: the state passed on), draft j + 1 from one slot of
    depth j % M + 1 at the position after the row's verified tokens and j - 1 drafts, fed the previous
    draft's embedding and the state passed on. The first physical depth attends its cache of verified
    slots; other physical depths only the slots they ran this step."""
    cfg, embed = model.config, model.language_model.model.embed_tokens
    logits = [draft_logits(model, 1, x)[:, -1]]
    for j in range(1, n):
        k = j % cfg.num_mtp_modules + 1
        physical = cfg.mtp_physical(k)
        layer = cache.mtp[physical]
        history = cache.mask if physical == 0 else cache.mask[:, :0]
        mask = F.pad(history, (0, layer.length + 1 - history.shape[1]), value=1)
        position = token_positions(F.pad(cache.mask, (0, j), value=1), 1)     # [B, 1]
        x, h = mtp_pass(model, layer, k, embed(logits[-1].argmax(-1)[:, None]), h, position, mask)
        logits.append(draft_logits(model, k, x)[:, -1])
    logits = torch.stack(logits, 1)
    return logits.argmax(-1), logits


# ============================================================================================
# Part II: loading and running
# ============================================================================================
# Everything a run needs around the model: which kernels run the hot functions, the
# presets, the checks on inputs, config.json, checkpoint I/O with MXFP8 and the MTP layouts, the
# image/video processor, media files from disk, the streamed forward of a checkpoint larger than
# the device, the CLI.


# ============================================================================================
# Kernel flag: the torch functions are the specification; kernels.py holds their Triton twins
# ============================================================================================


def load_kernels():
    """kernels.py as a module (imported once, from beside this file). Triton runs on a CUDA device,
    or on the CPU under its interpreter (TRITON_INTERPRET=1, slow: for tests); with neither, or
    without the triton package, this is a ValueError, never a silent fallback to torch."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernels 'triton' need a CUDA device, or TRITON_INTERPRET=1 (set before the first "
                         "import) to run them on the CPU through Triton's interpreter, slowly")
    if "m3_kernels" not in sys.modules:
        import importlib.util
        spec = importlib.util.spec_from_file_location("m3_kernels", Path(__file__).resolve().parent / "kernels.py")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError as e:
            raise ValueError(f"kernels 'triton' need the triton package (requirements.txt): {e}") from e
        sys.modules["m3_kernels"] = module
    return sys.modules["m3_kernels"]


def set_kernels(name: str) -> None:
    """Route every function marked @kernel_twin through its Triton twin in kernels.py ("triton"),
    or keep the torch specification ("torch", the default)."""
    global _kernels
    if name not in ("torch", "triton"):
        raise ValueError(f"kernels must be 'torch' or 'triton', got {name!r}")
    _kernels = load_kernels() if name == "triton" else None


set_kernels(os.environ.get("M3_KERNELS", "torch"))


# ============================================================================================
# Presets: the released model, the tiny test model, other implementations' MTP conventions
# ============================================================================================

def minimax_m3_config() -> M3Config:
    """The released model: 3 dense full-attention layers, then 57 MoE + sparse layers."""
    layers = [0] * 3 + [1] * 57
    return M3Config(moe_layer_freq=layers, sparse_attention_freq=list(layers))


def tiny_config() -> M3Config:
    """Every feature on at CPU size: layer 0 dense + full attention, layers 1-2 MoE + sparse;
    blocks of 8 with top-4 (one init, one local) so the demo's 58-token prompt (8 blocks)
    drops blocks; a 2-layer vision tower whose videos are cut every 2 temporal groups; one MTP depth."""
    return M3Config(
        vocab_size=512, hidden_size=64, num_hidden_layers=3, max_position_embeddings=65536,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rotary_dim=8, rope_theta=10000.0,
        sparse_attention_freq=[0, 1, 1], sparse_index_dim=16, sparse_num_index_heads=2,
        sparse_topk_blocks=4, sparse_block_size=8, sparse_init_block=1, sparse_local_block=1,
        moe_layer_freq=[0, 1, 1], dense_intermediate_size=128, intermediate_size=32,
        shared_intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
        num_mtp_modules=1,
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, vision_segment_max_frames=2),
        image_token_index=500, video_token_index=501, vision_start_token_index=502,
        vision_end_token_index=503, projector_hidden_size=64)


VLLM_DRAFTER = {"pass_hidden": "pre_norm", "zero_position0": True}


def mtp_vllm_drafter(**changes) -> MTPConfig:
    """vLLM's M3 drafter (VLLM_DRAFTER): the embedding zeroed at position 0, pre-norm outputs passed
    on. (With M >= 2 vLLM runs depth 1 for every draft: add repeated_layer=True to match it.)"""
    return MTPConfig(**{**VLLM_DRAFTER, **changes})


def mtp_step3p7(**changes) -> MTPConfig:
    """Automodel's Step3p7 conventions on M3's modules: pre-norm outputs passed on, a head per
    depth, the rolled input embeddings, the loss over the main token count."""
    return MTPConfig(**{"pass_hidden": "pre_norm", "head": "per_depth", "embed_source": "inputs_embeds",
                  "loss_norm": "main_tokens", **changes})


def mtp_nemotron_v3(**changes) -> MTPConfig:
    """Automodel's NemotronV3 conventions on M3's modules: the "*E" sublayers, the loss over the
    main token count (its Ultra / Nano recipes add repeated_layer=True)."""
    return MTPConfig(**{"sublayers": "attention_moe", "loss_norm": "main_tokens", **changes})


# allowed values of MTPConfig's string options, the default (M3's) first
MTP_CHOICES = {"pass_hidden": ("post_norm", "pre_norm"), "head": ("shared", "per_depth"),
               "embed_source": ("token_ids", "inputs_embeds"), "sublayers": ("decoder_layer", "attention_moe"),
               "loss_norm": ("per_depth", "main_tokens")}


# ============================================================================================
# Input checks and random weights
# ============================================================================================
# What the model's forward and the loader call to reject bad input with a clear error

def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """t, after making sure it holds no NaN or Inf; otherwise a ValueError naming `what` and the
    first bad index, so a corrupt weight or an overflow is found where it appears."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        kind = "NaN" if bool(t[tuple(first)].isnan()) else "Inf"
        raise ValueError(f"{what} holds {kind} (first at index {first} of shape {list(t.shape)})")
    return t


def _check_ids(input_ids, labels, position_ids, vocab_size: int, attention_mask=None):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64 tensor [B, S], got "
                        f"{input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty [B, S] tensor, got shape {tuple(input_ids.shape)}")
    bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
    if bad.numel():
        raise ValueError(f"input_ids hold token id {int(bad[0])} outside [0, {vocab_size}) (vocab_size)")
    for name, t in (("labels", labels), ("position_ids", position_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor shaped like input_ids {tuple(input_ids.shape)}")
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
    if labels is not None:
        bad = labels[(labels != -100) & ((labels < 0) | (labels >= vocab_size))]
        if bad.numel():
            raise ValueError(f"labels hold {int(bad[0])}: allowed are -100 (ignore) or ids in [0, {vocab_size})")
    if position_ids is not None and bool((position_ids < 0).any()):
        raise ValueError("position_ids must be >= 0")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, "
                             f"got {got!r} (with a cache: this call's tokens only; the cache keeps the rest)")
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold 1 (token) and 0 (pad) only")


def _check_indexer_loss(cfg: M3Config, indexer_loss, cache, spans) -> None:
    if indexer_loss != "kl":
        raise ValueError(f"indexer_loss must be None or 'kl' (MSA's indexer distillation), got {indexer_loss!r}")
    if not any(cfg.sparse_attention_freq):
        raise ValueError("indexer_loss='kl' needs a sparse layer, and this config has none")
    if cache is not None or spans is not None:
        raise ValueError("indexer_loss='kl' is a training loss: one call without a cache or padded rows")


def _check_embeds(inputs_embeds, input_ids, hidden_size: int, pixel_values, pixel_values_videos):
    if pixel_values is not None or pixel_values_videos is not None:
        raise ValueError("pass either inputs_embeds or pixel values: media are spliced into embed()'s output only")
    want = (*input_ids.shape, hidden_size)
    if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
        raise TypeError(f"inputs_embeds must be a floating-point tensor {want}")
    if tuple(inputs_embeds.shape) != want:
        raise ValueError(f"inputs_embeds shape {tuple(inputs_embeds.shape)} must be [B, S, hidden_size] = {want}")


def _check_media(cfg: M3Config, pixels, grid, pix_name: str, grid_name: str):
    if cfg.vision is None:
        raise ValueError(f"{pix_name} given, but this is a text-only model (its config has no vision part)")
    if pixels is None or grid is None:
        missing, given = (pix_name, grid_name) if pixels is None else (grid_name, pix_name)
        raise ValueError(f"{given} given without {missing}: both are needed")
    v = cfg.vision
    if not isinstance(grid, torch.Tensor) or grid.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{grid_name} must be an integer tensor [n, 3] of (t, h, w)")
    if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
        raise TypeError(f"{pix_name} must be a floating-point tensor [N, {v.patch_dim}]")
    if grid.dim() != 2 or grid.shape[1] != 3 or grid.shape[0] == 0 or bool((grid < 1).any()):
        raise ValueError(f"{grid_name} must be [n, 3] positive (t, h, w) rows, got {grid.tolist()}")
    m = v.spatial_merge_size
    odd = [g for g in grid.tolist() if g[1] % m or g[2] % m]
    if odd:
        raise ValueError(f"{grid_name} rows {odd}: h and w must be multiples of spatial_merge_size {m}")
    rows = int(grid.prod(-1).sum())
    if pixels.dim() != 2 or pixels.shape != (rows, v.patch_dim):
        raise ValueError(f"{pix_name} has shape {tuple(pixels.shape)} but {grid_name} {grid.tolist()} needs "
                         f"sum(t*h*w) = {rows} rows of C*Tp*P*P = {v.patch_dim} values")
    check_finite(pixels, pix_name)


def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights for tests, demos and goldens (not a training init).

    Each tensor draws from its own generator seeded by (seed, its name), so models that share
    parameter names share their values. Matrices ~ N(0, 1/fan_in); embeddings ~ N(0, 1); norm
    offsets, biases and the router correction bias ~ N(0, 0.1).
    """
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            std = 1.0 if "embed_tokens" in name else (t[0].numel() ** -0.5 if t.dim() >= 2 else 0.1)
            t.copy_(torch.randn(t.shape, generator=g) * std)
    return model


# ============================================================================================
# config.json: reading and writing
# ============================================================================================
# Two spellings exist in the wild: the upstream checkpoint form (`text_config` with a nested
# `sparse_attention_config`, `moe_layer_freq`, `rope_theta`, `rotary_dim`; `vision_config` with
# `img_token_compression_config`) and the transformers form (`layer_types`, `mlp_layer_types`,
# flat `index_*` keys, `rope_parameters`). Both read into one M3Config; a key's meaning is given
# at the M3Config / VisionConfig field of the same name, or where the key is read below. Keys
# that would switch M3 to a variant it does not have are rejected where they are read; keys not
# read below are ignored. `hidden_act` of the text part is one: transformers writes "silu" for the
# same SwiGLU-OAI model, so its value says nothing.

def config_from_json(path: str | os.PathLike) -> M3Config:
    return config_from_dict(read_config_json(path))


def read_config_json(path: str | os.PathLike) -> dict:
    """config.json as a dict; an unreadable file or one that holds no JSON object is a ValueError."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read config {str(path)!r}: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"config {str(path)!r} must hold a JSON object, got {type(d).__name__}")
    return d


def config_from_dict(d: dict) -> M3Config:
    """Accept the upstream checkpoint form (`text_config.sparse_attention_config`,
    `moe_layer_freq`, `rope_theta`, `img_token_compression_config`, ...) and the transformers
    form (`layer_types`, `mlp_layer_types`, `index_*`, `rope_parameters`). A dict without
    `text_config` is a text-only config, unless it has `vision_config` or names a
    ...ForConditionalGeneration architecture (an error). The required keys (REQUIRED_* below)
    must all be present, or one ValueError lists those absent; absent optional scalars take the
    released model's values, absent layer lists and derived sizes follow their readers (no sparse
    layers, every layer MoE, rotary_dim = head_dim / 2, no MTP depth in the transformers form).
    `model_type` strings are never read (the checkpoint's text part says "minimax_m2")."""
    if not isinstance(d, dict):
        raise TypeError(f"config must be a dict, got {type(d).__name__}")
    architectures = d.get("architectures") if isinstance(d.get("architectures"), list) else []
    if "text_config" not in d and ("vision_config" in d or any(
            isinstance(a, str) and a.endswith("ForConditionalGeneration") for a in architectures)):
        raise ValueError("config key 'text_config' is missing: a vision-language config (it has vision_config "
                         "or a ...ForConditionalGeneration architecture) keeps the text model's keys there; "
                         "only a text-only config is flat")
    missing = _missing_keys(d)
    if missing:
        raise ValueError(f"config is missing required key{'s' * (len(missing) > 1)} {', '.join(missing)}: the "
                         f"model's dimensions have no default (a guess would only show up as mismatched tensors)")
    if "text_config" not in d:
        return M3Config(**_text_fields(d, "config"), vision=None)
    text = _sub(d, "text_config", "config")
    vision = _vision_fields(_sub(d, "vision_config", "config"), d)
    top = _Reader(d, "config")
    # placeholder and bracket ids: `*_token_index` upstream, `*_token_id` in transformers
    ids = {f"{name}_token_index": top.int(f"{name}_token_index", top.int(f"{name}_token_id", default))
           for name, default in [("image", 200025), ("video", 200026), ("vision_start", 200029), ("vision_end", 200030)]}
    return M3Config(**_text_fields(text, "text_config"), vision=vision, **ids,
                    projector_hidden_size=top.int("projector_hidden_size"))


def config_to_dict(c: M3Config) -> dict:
    """The upstream checkpoint form (what `save_pretrained` writes to config.json)."""
    text = _text_config_dict(c)
    if c.vision is None:
        return {"architectures": ["MiniMaxM3SparseForCausalLM"], **text}
    v = c.vision
    compression = {"image_token_compression_method": "patch_merge",
                   "spatial_merge_size": v.spatial_merge_size,
                   "temporal_patch_size": v.temporal_patch_size}
    vision = {
        "model_type": "clip_vision_model", "hidden_act": "gelu",
        "position_embedding_type": "rope", "rope_mode": "3d",
        **{f.name: getattr(v, f.name) for f in fields(v)
           if f.name not in ("spatial_merge_size", "temporal_patch_size")},
        "img_token_compression_config": compression,
    }
    return {"architectures": ["MiniMaxM3SparseForConditionalGeneration"],
            "model_type": "minimax_m3_vl", "text_config": text, "vision_config": vision,
            "image_token_index": c.image_token_index,
            "video_token_index": c.video_token_index,
            "vision_start_token_index": c.vision_start_token_index,
            "vision_end_token_index": c.vision_end_token_index,
            "projector_hidden_size": c.projector_hidden_size,
            "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
            "img_token_compression_config": compression}


def _text_config_dict(c: M3Config) -> dict:
    """The text part of config.json (a text-only checkpoint's whole config, less architectures)."""
    return {
        "model_type": "minimax_m3", "hidden_act": "swigluoai",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers, "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "rotary_dim": c.rotary_dim, "partial_rotary_factor": c.rotary_dim / c.head_dim,
        "rope_theta": c.rope_theta,
        "use_gemma_norm": True, "use_qk_norm": True, "qk_norm_type": "per_head",
        "attention_output_gate": False, "tie_word_embeddings": False,
        "moe_layer_freq": list(c.moe_layer_freq),
        "dense_intermediate_size": c.dense_intermediate_size,
        "intermediate_size": c.intermediate_size,
        "shared_intermediate_size": c.shared_intermediate_size,
        "n_shared_experts": c.n_shared_experts, "num_local_experts": c.num_local_experts,
        "num_experts_per_tok": c.num_experts_per_tok, "scoring_func": "sigmoid",
        "use_routing_bias": True, "routed_scaling_factor": c.routed_scaling_factor,
        "swiglu_alpha": c.swiglu_alpha, "swiglu_limit": c.swiglu_limit,
        "num_mtp_modules": c.num_mtp_modules,
        **({"mtp_config": {f.name: getattr(c.mtp, f.name) for f in fields(MTPConfig)
                           if getattr(c.mtp, f.name) != getattr(MTPConfig(), f.name)}} if c.mtp != MTPConfig() else {}),
        "sparse_attention_config": {
            "use_sparse_attention": any(c.sparse_attention_freq),
            "sparse_index_dim": c.sparse_index_dim,
            "sparse_num_index_heads": c.sparse_num_index_heads,
            "sparse_topk_blocks": c.sparse_topk_blocks,
            "sparse_block_size": c.sparse_block_size,
            "sparse_init_block": c.sparse_init_block,
            "sparse_local_block": c.sparse_local_block,
            "sparse_score_type": "max",
            "sparse_attention_freq": list(c.sparse_attention_freq),
            "sparse_disable_index_value": [int(f != 0) for f in c.sparse_attention_freq],
        },
    }


# Required keys. A guessed model dimension only shows up later as thousands of mismatched tensors,
# so every key a weight's shape depends on must be present: the text sizes, those of the layer
# kinds the config has (MoE, dense, sparse), the vision tower's and the projector's. The MoE top-k
# and the sparse top-k and block size too: vLLM reads them without a default. n_shared_experts
# sizes the shared expert and its readers disagree when it is absent (vLLM: none, transformers:
# one). Every other key keeps the released value as its default, because upstream readers default
# it too: rms_norm_eps, rope_theta, rotary_dim (head_dim / 2), swiglu_alpha / swiglu_limit,
# routed_scaling_factor (2.0 in transformers; vLLM's getattr gives 1.0), max_position_embeddings
# (informational), the sparse init / local blocks and score type (vLLM reads them with .get),
# num_mtp_modules and the placeholder ids; in vision_config num_channels 3 (CLIP's), the 2x2
# merge and 2-frame patches (Automodel, SGLang and vLLM fall back to 2 / 2), the segment length,
# rope_theta and layer_norm_eps. The sparse sizes are spelled per form (_SPARSE_KEYS).
REQUIRED_TEXT = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim")
REQUIRED_MOE = ("intermediate_size", "shared_intermediate_size", "n_shared_experts", "num_local_experts",
                "num_experts_per_tok")
REQUIRED_DENSE = ("dense_intermediate_size",)
REQUIRED_VISION = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")
REQUIRED_TOP = ("projector_hidden_size",)


def _absent(d: dict, where: str, keys) -> list[str]:
    """The paths of the keys that `d` lacks or holds as null."""
    return [f"{where}.{k}" for k in keys if d.get(k) is None]


def _missing_keys(d: dict) -> list[str]:
    """Every required key the config dict lacks, as a key path; the layer lists decide which
    per-kind sizes are needed."""
    if "text_config" not in d:
        return _missing_text(d, "config")
    vision = d.get("vision_config")
    missing = _missing_text(_sub(d, "text_config", "config"), "text_config")
    if vision is None:
        missing.append("config.vision_config")
    elif isinstance(vision, dict):                   # any other type is reported by _sub when it is read
        missing += _absent(vision, "config.vision_config", REQUIRED_VISION)
    return missing + _absent(d, "config", REQUIRED_TOP)


def _missing_text(d: dict, where: str) -> list[str]:
    """The text part's absent required keys: REQUIRED_TEXT and the sizes of the layer kinds it has
    (an MTP depth is built like the last layer, so it adds no kind)."""
    moe, sparse = _moe_freq(d, where), _sparse_freq(d, where)
    keys = REQUIRED_TEXT + (REQUIRED_MOE if moe is None or any(moe) else ()) + \
        (REQUIRED_DENSE if moe is not None and not all(moe) else ())
    missing = _absent(d, where, keys)
    if sparse is not None and any(sparse):
        level, path, column = _sparse_level(d, where)
        missing += _absent(level, path, [entry[column] for entry in _SPARSE_KEYS if entry[3] is None])
    return missing


class _Reader:
    """Typed look-ups in one level of a config dict; errors name the full key path."""

    def __init__(self, d: dict, where: str):
        self.d, self.where = d, where

    def _get(self, key, default, kinds, kind_name):
        if key not in self.d or self.d[key] is None:
            return default
        value = self.d[key]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise ValueError(f"config key '{self.where}.{key}' must be {kind_name}, got {value!r}")
        return value

    def int(self, key, default=None):
        return self._get(key, default, (int,), "an integer")

    def float(self, key, default=None):
        value = self._get(key, default, (int, float), "a number")
        return None if value is None else float(value)

    def bool(self, key, default=None):
        return self._get(key, default, (bool, int), "a boolean")

    def str(self, key, default=None):
        return self._get(key, default, (str,), "a string")

    def list(self, key, default=None):
        return self._get(key, default, (list,), "a list")

    def require(self, key, allowed):
        """Keys M3 fixes to one value: accept it (or absence), reject anything else."""
        if key in self.d and self.d[key] not in allowed:
            raise ValueError(f"config key '{self.where}.{key}' = {self.d[key]!r} is not supported; "
                             f"allowed: {allowed!r}")


def _sub(d: dict, key: str, where: str, default=None) -> dict:
    value = d.get(key, default)
    if not isinstance(value, dict):
        raise ValueError(f"config key '{where}.{key}' must be an object, got {value!r}")
    return value


def _text_fields(d: dict, where: str) -> dict:
    r = _Reader(d, where)
    # switches between model variants: only M3's value is accepted. use_gemma_norm: RMSNorm scales
    # by (1 + w); use_qk_norm / qk_norm_type: one q and one k norm of head_dim, shared by the heads;
    # attention_output_gate: a sigmoid gate on the attention output (absent in M3);
    # tie_word_embeddings: lm_head shares embed_tokens; scoring_func / use_routing_bias: the
    # router's sigmoid and its correction bias; rope_scaling: M3 has no RoPE scaling (null)
    for key, allowed in [("use_gemma_norm", [True]), ("use_qk_norm", [True]),
                         ("qk_norm_type", ["per_head"]), ("attention_output_gate", [False]),
                         ("tie_word_embeddings", [False]), ("scoring_func", ["sigmoid"]),
                         ("use_routing_bias", [True]), ("rope_scaling", [None])]:
        r.require(key, allowed)
    out = _scalars(r, M3Config, [
        "vocab_size", "hidden_size", "num_hidden_layers", "rms_norm_eps", "max_position_embeddings",
        "num_attention_heads", "num_key_value_heads", "head_dim", "dense_intermediate_size", "intermediate_size",
        "shared_intermediate_size", "n_shared_experts", "num_local_experts", "num_experts_per_tok",
        "routed_scaling_factor", "swiglu_alpha", "swiglu_limit"])
    # transformers ignores MTP and its form says nothing of it: no depths unless stated
    out["num_mtp_modules"] = r.int("num_mtp_modules", 0 if "layer_types" in d else 1)
    out["mtp"] = _mtp_fields(_sub(d, "mtp_config", where, {}), f"{where}.mtp_config")
    out.update(_rope_fields(d, where, out["head_dim"]))
    out.update(_sparse_fields(d, where))
    out["moe_layer_freq"] = _moe_freq(d, where)
    return out


def _moe_freq(d: dict, where: str) -> list | None:
    """Which layers are MoE: transformers' "sparse"/"dense" name per layer, or upstream 0/1 flags
    (None: no list, every layer MoE)."""
    r = _Reader(d, where)
    layer_kinds = r.list("mlp_layer_types")
    if layer_kinds is None:
        return r.list("moe_layer_freq")
    _check_members(layer_kinds, ("sparse", "dense"), f"{where}.mlp_layer_types")
    return [int(k == "sparse") for k in layer_kinds]


def _mtp_fields(d: dict, where: str) -> MTPConfig:
    """`mtp_config`: the MTPConfig fields that differ from M3's (the reference's own key; upstream
    configs never hold it). An unknown field is an error, not a silent M3 default."""
    unknown = sorted(set(d) - {f.name for f in fields(MTPConfig)})
    if unknown:
        raise ValueError(f"config key '{where}' has unknown fields {unknown}; allowed: "
                         f"{[f.name for f in fields(MTPConfig)]}")
    r, default = _Reader(d, where), MTPConfig()
    read = {bool: r.bool, float: r.float, str: r.str}         # the types of MTPConfig's fields
    return MTPConfig(**{f.name: read[type(getattr(default, f.name))](f.name, getattr(default, f.name))
                        for f in fields(MTPConfig)})


def _rope_fields(d: dict, where: str, head_dim: int) -> dict:
    """rope_theta and rotary_dim, top-level (upstream) or in `rope_parameters` (transformers), where
    `partial_rotary_factor` = rotary_dim / head_dim; only the plain ("default") RoPE exists in M3."""
    r = _Reader(d, where)
    params = d.get("rope_parameters") or {}
    p = _Reader(params, f"{where}.rope_parameters")
    p.require("rope_type", ["default"])
    theta = r.float("rope_theta", p.float("rope_theta", 5e6))
    factor = p.float("partial_rotary_factor", r.float("partial_rotary_factor"))
    rotary_dim = r.int("rotary_dim")
    if rotary_dim is None:
        rotary_dim = int(head_dim * (0.5 if factor is None else factor))
    elif factor is not None and int(head_dim * factor) != rotary_dim:
        raise ValueError(f"config keys '{where}.rotary_dim' ({rotary_dim}) and partial_rotary_factor "
                         f"({factor}) disagree: head_dim {head_dim} x factor must equal rotary_dim")
    return dict(rope_theta=theta, rotary_dim=rotary_dim)


# field, key in the upstream `sparse_attention_config`, flat transformers key, default (None:
# required when a layer is sparse; the released value stands in otherwise)
_SPARSE_KEYS = [("sparse_index_dim", "sparse_index_dim", "index_head_dim", None),
                ("sparse_num_index_heads", "sparse_num_index_heads", "index_n_heads", None),
                ("sparse_topk_blocks", "sparse_topk_blocks", "index_topk_blocks", None),
                ("sparse_block_size", "sparse_block_size", "index_block_size", None),
                ("sparse_init_block", "sparse_init_block", None, 0),     # transformers has no init blocks
                ("sparse_local_block", "sparse_local_block", "index_local_blocks", 1)]   # vLLM reads 0


def _sparse_level(d: dict, where: str) -> tuple[dict, str, int]:
    """Where the sparse sizes are: (the dict, its key path, the _SPARSE_KEYS column spelling them)."""
    if d.get("sparse_attention_config") is None:
        return d, where, 2
    return _sub(d, "sparse_attention_config", where), f"{where}.sparse_attention_config", 1


def _sparse_fields(d: dict, where: str) -> dict:
    """Sparse keys from `sparse_attention_config` (upstream) or flat `index_*` (transformers)."""
    level, path, column = _sparse_level(d, where)
    r = _Reader(level, path)
    out = dict(sparse_attention_freq=_sparse_freq(d, where))
    for entry in _SPARSE_KEYS:
        name, key, default = entry[0], entry[column], entry[3]
        if default is None:                        # required, absent only where no layer is sparse
            default = getattr(M3Config, name)
        out[name] = default if key is None else r.int(key, default)
    return out


def _sparse_freq(d: dict, where: str) -> list | None:
    """Which layers are sparse (None: no list, no sparse layer). `layer_types` names each layer
    "minimax_m3_sparse" or "full_attention"; upstream, `use_sparse_attention` false turns every
    layer dense; `sparse_score_type` is how a block's score pools its keys' scores (M3: "max");
    `sparse_disable_index_value[i]` = 1 means layer i's indexer only selects blocks (no index
    value / output projections: true of every M3 layer)."""
    if d.get("sparse_attention_config") is None:
        layer_types = _Reader(d, where).list("layer_types")
        if layer_types is None:
            return None
        _check_members(layer_types, ("minimax_m3_sparse", "full_attention"), f"{where}.layer_types")
        return [int(t == "minimax_m3_sparse") for t in layer_types]
    sw = f"{where}.sparse_attention_config"
    s = _Reader(_sub(d, "sparse_attention_config", where), sw)
    s.require("sparse_score_type", ["max"])
    freq = s.list("sparse_attention_freq")
    if not s.bool("use_sparse_attention", True):
        freq = [0] * len(freq) if freq is not None else None
    disable_value = s.list("sparse_disable_index_value")
    if freq is not None and disable_value is not None:
        if len(disable_value) != len(freq):
            raise ValueError(f"config key '{sw}.sparse_disable_index_value' has {len(disable_value)} "
                             f"entries but sparse_attention_freq has {len(freq)}")
        bad = [i for i, (f, dv) in enumerate(zip(freq, disable_value)) if f and not dv]
        if bad:
            raise ValueError(f"config key '{sw}.sparse_disable_index_value' is 0 on sparse layers "
                             f"{bad}: the index value branch is not part of M3; allowed: 1")
    return freq


def _vision_fields(v: dict, top: dict) -> VisionConfig:
    """Vision keys; activations must be exact GELU, the projector/merger must have biases, the
    positions 3D RoPE (`position_embedding_type` "rope", `rope_mode` "3d") and the compression the
    2x2 patch merge. `img_token_compression_config` (in vision_config or top level) holds the merge
    and temporal patch sizes; `rope_parameters.rope_theta` is the transformers spelling of rope_theta."""
    r = _Reader(v, "config.vision_config")
    r.require("hidden_act", ["gelu"])
    r.require("position_embedding_type", ["rope"])
    r.require("rope_mode", ["3d"])
    _Reader(top, "config").require("projector_hidden_act", ["gelu"])
    _Reader(top, "config").require("multimodal_projector_bias", [True])
    _Reader(top, "config").require("patch_merge_bias", [True])
    compression = v.get("img_token_compression_config") or top.get("img_token_compression_config") or {}
    c = _Reader(compression, "config.vision_config.img_token_compression_config")
    c.require("image_token_compression_method", ["patch_merge"])
    params = _Reader(v.get("rope_parameters") or {}, "config.vision_config.rope_parameters")
    return VisionConfig(
        **_scalars(r, VisionConfig, ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "num_channels", "patch_size", "vision_segment_max_frames", "layer_norm_eps"]),
        temporal_patch_size=c.int("temporal_patch_size", r.int("temporal_patch_size", 2)),
        spatial_merge_size=c.int("spatial_merge_size", r.int("spatial_merge_size", 2)),
        rope_theta=r.float("rope_theta", params.float("rope_theta", 10000.0)))


def _scalars(r: _Reader, cls, names: list[str]) -> dict:
    """Scalar keys spelled as the dataclass fields; absent keys take the field defaults (a required
    key is absent here only where the config's layer kinds do not use it)."""
    spec = {f.name: f for f in fields(cls)}
    return {n: (r.float if spec[n].type == "float" else r.int)(n, spec[n].default) for n in names}


def _check_members(values: list, allowed: tuple, key: str):
    bad = [x for x in values if x not in allowed]
    if bad:
        raise ValueError(f"config key '{key}' holds {bad!r}; allowed values: {list(allowed)}")


def _need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"config key '{key}': {msg}")


def validate_config(c: M3Config):
    """Reject configs the math below cannot run, naming the key and what is allowed (the MTP options
    and the vision part: _validate_mtp, _validate_vision)."""
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "dense_intermediate_size", "intermediate_size",
                 "shared_intermediate_size", "n_shared_experts", "num_local_experts",
                 "num_experts_per_tok", "sparse_index_dim", "sparse_num_index_heads",
                 "sparse_topk_blocks", "sparse_block_size"):
        _need(getattr(c, name) >= 1, name, f"must be >= 1, got {getattr(c, name)}")
    for name in ("sparse_init_block", "sparse_local_block", "num_mtp_modules"):
        _need(getattr(c, name) >= 0, name, f"must be >= 0, got {getattr(c, name)}")
    _validate_mtp(c.mtp)
    for name in ("moe_layer_freq", "sparse_attention_freq"):
        n = len(getattr(c, name))
        _need(n == c.num_hidden_layers, name,
              f"has {n} entries but num_hidden_layers is {c.num_hidden_layers}; allowed: one per layer")
    _need(c.num_attention_heads % c.num_key_value_heads == 0, "num_attention_heads",
          f"{c.num_attention_heads} is not divisible by num_key_value_heads {c.num_key_value_heads}")
    _need(c.rotary_dim % 2 == 0 and 0 < c.rotary_dim <= c.head_dim, "rotary_dim",
          f"must be even and in (0, head_dim={c.head_dim}], got {c.rotary_dim}")
    _need(c.num_experts_per_tok <= c.num_local_experts, "num_experts_per_tok",
          f"{c.num_experts_per_tok} exceeds num_local_experts {c.num_local_experts}")
    if any(c.sparse_attention_freq):
        _need(c.sparse_num_index_heads == c.num_key_value_heads, "sparse_num_index_heads",
              f"must equal num_key_value_heads ({c.num_key_value_heads}): index head h selects the "
              f"key blocks of KV head h; got {c.sparse_num_index_heads}")
        _need(c.rotary_dim <= c.sparse_index_dim, "sparse_index_dim",
              f"must be >= rotary_dim ({c.rotary_dim}): the index q/k share the attention RoPE")
    if c.vision is not None:
        _validate_vision(c)


def _validate_mtp(m: MTPConfig) -> None:
    _need(isinstance(m, MTPConfig), "mtp_config", f"must be an MTPConfig, got {type(m).__name__}")
    for name, allowed in MTP_CHOICES.items():
        _need(getattr(m, name) in allowed, f"mtp_config.{name}",
              f"allowed: {', '.join(map(repr, allowed))}; got {getattr(m, name)!r}")
    for name in ("repeated_layer", "zero_position0"):
        _need(isinstance(getattr(m, name), bool), f"mtp_config.{name}", f"must be true or false, got "
              f"{getattr(m, name)!r}")
    _need(isinstance(m.loss_weight, (int, float)) and not isinstance(m.loss_weight, bool)
          and m.loss_weight >= 0, "mtp_config.loss_weight", f"must be a number >= 0, got {m.loss_weight!r}")


def _validate_vision(c: M3Config) -> None:
    v = c.vision
    _need(c.projector_hidden_size >= 1, "projector_hidden_size", f"must be >= 1, got {c.projector_hidden_size}")
    for name in ("image_token_index", "video_token_index"):
        _need(0 <= getattr(c, name) < c.vocab_size, name,
              f"{getattr(c, name)} is outside the vocabulary [0, {c.vocab_size})")
    _need(c.image_token_index != c.video_token_index, "video_token_index", "must differ from image_token_index")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_channels", "patch_size", "temporal_patch_size", "spatial_merge_size",
                 "vision_segment_max_frames"):
        _need(getattr(v, name) >= 1, f"vision_config.{name}", f"must be >= 1, got {getattr(v, name)}")
    _need(v.hidden_size % v.num_attention_heads == 0, "vision_config.num_attention_heads",
          f"hidden_size {v.hidden_size} is not divisible by {v.num_attention_heads} heads")
    _need(v.head_dim >= 6, "vision_config.num_attention_heads",
          f"head_dim {v.head_dim} leaves no channels for the 3-axis RoPE (needs >= 6)")


# ============================================================================================
# Checkpoint I/O
# ============================================================================================

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# keys some checkpoints ship that hold no weight of the model: RoPE tables (recomputed from the
# config), the vision post-layernorm (shipped by some exports, never applied)
IGNORED_KEYS = re.compile(r"(\.rotary_emb\.inv_freq$|^vision_tower\.vision_model\.post_layernorm\.)")
SCALE_SUFFIX = "_scale_inv"      # MXFP8: <key> float8_e4m3 + <key>_scale_inv uint8 E8M0
MX_BLOCK = 32                    # input columns sharing one E8M0 scale

# Where each implementation keeps MTP depth p (P the physical depths, N = num_hidden_layers), all
# mapped onto the same MTPDepth modules:
#   m3           language_model.model.mtp.layers.{p}.{enorm, hnorm, eh_proj, transformer_layer.*,
#                final_layernorm}                                              (M3, SPEC §4)
#   nemotron_v3  language_model.mtp.layers.{2p + s}.*: sublayer s = 0 holds enorm, hnorm, eh_proj and
#                the attention as norm + mixer.*; s = 1 the FFN as norm + mixer.* and final_layernorm
#   step3p7      language_model.model.layers.{N + p}.*: enorm, hnorm, eh_proj, the decoder layer's keys
#                directly, final_layernorm as transformer.shared_head.norm and a per-depth head's
#                `output` as transformer.shared_head.output
# A text-only checkpoint drops `language_model.`; the drafter alone (vLLM's standalone MTP
# checkpoint, architectures ["MiniMaxM3MTP"]) holds embed_tokens, lm_head and the depths.
# layout: (pattern of its MTP keys, index -> physical depth or None)
MTP_LAYOUTS = {
    "m3": (re.compile(r"^(?:language_model\.)?model\.mtp\.layers\.(\d+)\."), lambda i, N: i),
    "nemotron_v3": (re.compile(r"^(?:language_model\.)?mtp\.layers\.(\d+)\."), lambda i, N: i // 2),
    "step3p7": (re.compile(r"^(?:language_model\.)?model\.layers\.(\d+)\."), lambda i, N: i - N if i >= N else None),
}
# names no decoder layer has: every physical MTP depth holds them, in every layout
MTP_ONLY = re.compile(r"\.(enorm|hnorm|eh_proj|final_layernorm|transformer\.shared_head\.\w+)\.weight$")
# module names inside a depth built with sublayers -> M3's decoder-layer names ({ffn}: block_sparse_moe or mlp)
SUBLAYER_NAMES = [("sublayers.0.norm.", "transformer_layer.input_layernorm."),
                  ("sublayers.0.mixer.", "transformer_layer.self_attn."),
                  ("sublayers.1.norm.", "transformer_layer.post_attention_layernorm."),
                  ("sublayers.1.mixer.", "transformer_layer.{ffn}.")]
# M3's names inside a depth -> (sublayer, name) in NemotronV3's layout; the last entry matches the rest
NEMOTRON_NAMES = [("transformer_layer.input_layernorm.", 0, "norm."), ("transformer_layer.self_attn.", 0, "mixer."),
                  ("transformer_layer.post_attention_layernorm.", 1, "norm."),
                  ("transformer_layer.block_sparse_moe.", 1, "mixer."), ("transformer_layer.mlp.", 1, "mixer."),
                  ("final_layernorm.", 1, "final_layernorm."), ("output.", 1, "output."), ("", 0, "")]
STEP3P7_NAMES = [("transformer_layer.", ""), ("final_layernorm.", "transformer.shared_head.norm."),
                 ("output.", "transformer.shared_head.output."), ("", "")]
DRAFTER_MODULES = ("language_model.model.embed_tokens.", "language_model.lm_head.", "language_model.model.mtp.")


def _rename(name: str, table) -> tuple:
    """(the rest of the table's first matching entry, name with that prefix replaced)."""
    prefix, *rest = next(entry for entry in table if name.startswith(entry[0]))
    return tuple(rest[:-1]), rest[-1] + name[len(prefix):]


def checkpoint_key(model_key: str, cfg: M3Config, layout: str = "m3") -> str:
    """Module key -> checkpoint key: MTP depths as `layout` stores them; text-only checkpoints drop
    the `language_model.` prefix."""
    m = re.match(r"language_model\.model\.mtp\.layers\.(\d+)\.(.*)", model_key)
    if m is not None:
        p, N = int(m.group(1)), cfg.num_hidden_layers
        ffn = "block_sparse_moe" if cfg.is_moe(N - 1) else "mlp"
        local = _rename(m.group(2), [(a, b.format(ffn=ffn)) for a, b in SUBLAYER_NAMES] + [("", "")])[1]
        if layout == "nemotron_v3":
            (s,), name = _rename(local, NEMOTRON_NAMES)
            model_key = f"language_model.mtp.layers.{2 * p + s}.{name}"
        elif layout == "step3p7":
            model_key = f"language_model.model.layers.{N + p}.{_rename(local, STEP3P7_NAMES)[1]}"
        else:
            model_key = f"language_model.model.mtp.layers.{p}.{local}"
    return model_key.removeprefix("language_model.") if cfg.vision is None else model_key


def mtp_depth_of(key: str, layout: str, num_hidden_layers: int) -> int | None:
    """The physical MTP depth a checkpoint key of `layout` belongs to, or None."""
    pattern, depth = MTP_LAYOUTS[layout]
    m = pattern.match(key)
    return None if m is None else depth(int(m.group(1)), num_hidden_layers)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 code s (uint8) -> 2^(s - 127) as fp32, exactly: for s >= 1 it is the fp32 whose exponent
    field is s; s = 0 is the subnormal 2^-127. s = 255 is NaN in the OCP MX spec: callers reject it."""
    s = scale.to(torch.int32)
    return torch.where(s > 0, s << 23, torch.full_like(s, 1 << 22)).view(torch.float32)


def mx_scale_shape(shape: Sequence[int]) -> list[int]:
    """The E8M0 scale shape of an MXFP8 weight: [O, ceil(I / 32)], I the product of the dims after
    the first (a conv kernel counts as a row of C*T*P*P inputs); [ceil(I / 32)] for a vector."""
    if len(shape) <= 1:
        return [-(-shape[0] // MX_BLOCK)] if shape else []
    inputs = 1
    for d in shape[1:]:
        inputs *= d
    return [shape[0], -(-inputs // MX_BLOCK)]


def dequant_mxfp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w[o, i] = e4m3(weight[o, i]) * 2^(scale[o, i // 32] - 127), in fp32.

    weight float8_e4m3fn [O, I] (or [O, ...], read as rows of I); scale uint8 E8M0
    mx_scale_shape(weight.shape) -> fp32 of weight's shape. Exact: a 4-bit significand times a
    power of two, except where it overflows fp32 (448 * 2^127 = Inf; loading reports it by key).
    """
    rows = weight.reshape(weight.shape[0], -1) if weight.dim() > 1 else weight
    factor = e8m0_to_float(scale).repeat_interleave(MX_BLOCK, dim=-1)[..., :rows.shape[-1]]
    return (rows.float() * factor).reshape(weight.shape)


class Checkpoint:
    """A safetensors checkpoint (model.safetensors, or shards + model.safetensors.index.json),
    read one tensor at a time through memory maps. `tensor(key)` returns a weight as stored or,
    for MXFP8, dequantised to fp32; every weight is checked to be finite. `reads` lists the keys
    read and `bytes_read` their stored size (scales included). `mtp_layout` is the MTP_LAYOUTS
    entry its MTP keys follow; `drafter` is true for vLLM's standalone MTP checkpoint."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        raw = read_config_json(self.path / "config.json")
        self.config = config_from_dict(raw)
        self.drafter = "MiniMaxM3MTP" in (raw.get("architectures") or [])
        self._handles: dict[Path, object] = {}
        self.files = self._locate()
        self.mtp_layout = self._mtp_layout()
        self.reads: list[str] = []
        self.bytes_read = 0

    def _mtp_layout(self) -> str:
        """Found from the keys only MTP depths have (MTP_ONLY), so trunk layers beyond
        num_hidden_layers never pass for Step3p7 depths."""
        N = self.config.num_hidden_layers
        found = sorted({layout for layout in MTP_LAYOUTS for k in self.files
                        if MTP_ONLY.search(k) and mtp_depth_of(k, layout, N) is not None})
        if len(found) > 1:
            raise ValueError(f"checkpoint {str(self.path)!r} holds MTP keys of the layouts {found}: one layout per "
                             f"checkpoint")
        return found[0] if found else "m3"

    def _locate(self) -> dict[str, Path]:
        """checkpoint key -> the file holding it (single file or sharded index)."""
        index, single = self.path / INDEX_FILE, self.path / SINGLE_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"cannot read {index}: {e}") from e
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{index}: weight_map must map each key to a file name")
            return {k: self.path / f for k, f in weight_map.items()}
        if single.exists():
            return {k: single for k in self.handle(single).keys()}
        raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(self.path)!r}")

    def handle(self, file: Path):
        """The open (memory-mapped) safetensors file; a missing or unreadable one is a ValueError."""
        from safetensors import safe_open
        if file not in self._handles:
            if not file.exists():
                raise ValueError(f"checkpoint file {file} is missing" +
                                 (f" (listed in {INDEX_FILE})" if file.name != SINGLE_FILE else ""))
            try:
                self._handles[file] = safe_open(file, framework="pt")
            except Exception as e:             # safetensors raises its own error types
                raise ValueError(f"cannot read checkpoint file {file}: {e} (truncated or not safetensors?)") from e
        return self._handles[file]

    def stored(self, key: str) -> tuple[str, list[int]]:
        """(safetensors dtype, shape) of a key as stored, from the file header."""
        sl = self.handle(self.files[key]).get_slice(key)
        return sl.get_dtype(), list(sl.get_shape())

    def _read(self, key: str) -> torch.Tensor:
        t = self.handle(self.files[key]).get_tensor(key)
        self.reads.append(key)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def raw(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight at `key` as stored (on the CPU), with its E8M0 scales (uint8) if it is MXFP8."""
        scale = self._read(key + SCALE_SUFFIX).view(torch.uint8) if key + SCALE_SUFFIX in self.files else None
        return self._read(key), scale                                  # U8 or F8_E8M0 scales: the same bits

    def tensor(self, key: str, device: str | torch.device = "cpu",
               raw: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """The weight at `key` on `device` (read, or the `raw` pair already read): its stored bytes
        copied there and, for MXFP8, dequantised there to fp32; anything else as stored."""
        t, scale = self.raw(key) if raw is None else raw
        t = t.to(device)
        if scale is not None:
            if bool((scale == 255).any()):
                raise ValueError(f"checkpoint key {key + SCALE_SUFFIX} holds the E8M0 code 255, which is NaN")
            t = dequant_mxfp8(t, scale.to(device))
        return t

    def mtp_depth(self, key: str) -> int | None:
        return mtp_depth_of(key, self.mtp_layout, self.config.num_hidden_layers)

    def mtp_depths(self) -> int:
        """How many physical MTP depths the checkpoint ships (numbered 0, 1, ... without gaps)."""
        shipped = sorted({d for k in self.files if MTP_ONLY.search(k) and (d := self.mtp_depth(k)) is not None})
        if shipped != list(range(len(shipped))):
            raise ValueError(f"checkpoint {str(self.path)!r} ships MTP depths {shipped} ({self.mtp_layout} layout): "
                             f"they must be 0..n-1")
        return len(shipped)

    def problems(self, expected: dict[str, torch.Tensor], skip) -> list[str]:
        """Every mismatch between the checkpoint and the model's tensors `expected` (checkpoint key ->
        meta tensor), from the file headers alone; keys where skip(key) is true are not the model's."""
        problems = [f"missing: {k}" for k in expected if k not in self.files]
        by_file: dict[Path, set[str]] = {}
        for key, file in self.files.items():
            by_file.setdefault(file, set()).add(key)
        present, unread = set(), set()          # keys found in their file; keys of unreadable files
        for file, indexed in sorted(by_file.items()):
            try:
                stored = set(self.handle(file).keys())
            except ValueError as e:
                problems.append(str(e))
                unread |= indexed
                continue
            problems += [f"missing: {k} (indexed in {file.name} but absent there)" for k in sorted(indexed - stored)]
            present |= indexed & stored
        exists = present | unread               # an unreadable file is reported once, not key by key
        for key in sorted(present):
            if key.endswith(SCALE_SUFFIX):
                if key.removesuffix(SCALE_SUFFIX) not in exists:
                    problems.append(f"scale without its weight: {key}")
            elif key in expected:
                problems += self._format_problems(key, list(expected[key].shape), present, exists)
            elif not skip(key):
                problems.append(f"unexpected: {key}")
        return problems

    def _format_problems(self, key: str, shape: list[int], present: set[str], exists: set[str]) -> list[str]:
        """The stored format of one weight against the shape the model needs (scales in `exists`
        but not `present` sit in an unreadable file, already reported)."""
        dtype, stored_shape = self.stored(key)
        scale = key + SCALE_SUFFIX
        if scale in exists and scale not in present:
            return [] if stored_shape == shape else [f"mis-shaped: {key} is {stored_shape}, the config needs {shape}"]
        if scale not in present:
            if dtype.startswith("F8"):
                return [f"fp8 weight without a scale: {key} ({dtype}) has no {scale}"]
            if dtype not in ("F32", "BF16", "F16"):
                return [f"unsupported dtype: {key} is {dtype}; floats or MXFP8 are supported"]
        else:
            scale_dtype, scale_shape = self.stored(scale)
            if dtype == "U8":
                return [f"MXFP4 (4-bit weights packed in uint8) is not supported: {key}"]
            if dtype != "F8_E4M3":
                return [f"unsupported quantised format: {key} is {dtype} with a scale; MXFP8 stores F8_E4M3"]
            if scale_dtype not in ("U8", "F8_E8M0"):
                return [f"fp8 with {scale_dtype} block scales is not MXFP8 (uint8 E8M0 per 32 columns): {scale}"]
            want = mx_scale_shape(stored_shape)
            if scale_shape != want:
                return [f"mis-shaped scale: {scale} is {scale_shape}, its weight {stored_shape} needs {want}"]
        if stored_shape != shape:
            return [f"mis-shaped: {key} is {stored_shape}, the config needs {shape}"]
        return []


def load_meta_model(ckpt: Checkpoint, dtype: torch.dtype, mtp_depths: int | None = None,
                    mtp: MTPConfig | None = None, drafter_only: bool | None = None) -> MiniMaxM3:
    """The model of a checkpoint on the meta device (no storage), after checking every tensor's
    name, shape and format against it (one ValueError lists every problem). The MTP depths built are
    those the checkpoint ships, or exactly `mtp_depths` (an error if fewer are shipped); with
    repeated_layer, num_mtp_modules (or mtp_depths) runs of its one physical depth. `mtp` replaces
    config.json's MTP options. drafter_only (default: a standalone MTP checkpoint) checks only the
    drafter's tensors: embed_tokens, lm_head and the MTP depths."""
    if mtp_depths is not None and (not isinstance(mtp_depths, int) or isinstance(mtp_depths, bool)):
        raise TypeError(f"mtp_depths must be an int or None, got {mtp_depths!r}")
    if mtp is not None and not isinstance(mtp, MTPConfig):
        raise TypeError(f"mtp must be an MTPConfig or None, got {type(mtp).__name__}")
    cfg, shipped = (ckpt.config if mtp is None else replace(ckpt.config, mtp=mtp)), ckpt.mtp_depths()
    drafter_only = ckpt.drafter if drafter_only is None else drafter_only
    repeated = cfg.mtp.repeated_layer
    if mtp_depths is None:
        if cfg.num_mtp_modules > shipped and not repeated:
            print(f"config.json declares {cfg.num_mtp_modules} MTP depths and the checkpoint ships {shipped}: "
                  f"building {shipped}", file=sys.stderr)
        mtp_depths = (cfg.num_mtp_modules if shipped else 0) if repeated else shipped
    physical = min(mtp_depths, 1) if repeated else mtp_depths
    if not 0 <= physical <= shipped:
        raise ValueError(f"mtp_depths={mtp_depths} asked for, but checkpoint {str(ckpt.path)!r} ships {shipped} "
                         f"MTP depth(s)")
    with torch.device("meta"):
        model = MiniMaxM3(replace(cfg, num_mtp_modules=mtp_depths)).to(dtype)
    model.drafter_only = drafter_only
    expected = {checkpoint_key(k, cfg, ckpt.mtp_layout): t for k, t in model.state_dict(keep_vars=True).items()
                if not drafter_only or k.startswith(DRAFTER_MODULES)}

    def not_built(key: str) -> bool:     # no weight of the model, a shipped MTP depth not asked for, a drafter's trunk
        depth = ckpt.mtp_depth(key)
        return bool(IGNORED_KEYS.search(key)) or (depth is not None and physical <= depth < shipped) or \
            (drafter_only and depth is None)
    problems = ckpt.problems(expected, not_built)
    if any(k.startswith(("model.language_model.", "model.vision_tower.")) for k in ckpt.files):
        problems.insert(0, "hint: the keys are in transformers' layout (model.language_model.*); this reader "
                           "takes the upstream layout (language_model.model.*, see README)")
    heads = sum(p.endswith("output.weight") and ckpt.mtp_depth(p.split(" ")[1]) is not None for p in problems)
    if heads:
        other = "shared" if cfg.mtp.head == "per_depth" else "per_depth"
        problems.insert(0, f"hint: per-depth MTP heads (`output`) are {'missing' if other == 'shared' else 'present'}: "
                           f"load with mtp=dataclasses.replace(config.mtp, head={other!r})")
    if problems:
        source = "its config.json" + (" with the MTP options passed as mtp=" if mtp is not None else "")
        raise ValueError(f"checkpoint {str(ckpt.path)!r} does not match {source} ({len(problems)} "
                         f"problem{'s' * (len(problems) != 1)}):\n  " + "\n  ".join(problems))
    return model


def put_tensor(model: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Replace parameter or buffer `name` of `model` (meta or real) by `value`; returns the old one."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        old = module._buffers[attr]
        module._buffers[attr] = value
    return old


def load_tensor(model: MiniMaxM3, ckpt: Checkpoint, name: str, device, raw=None, check: bool = True) -> torch.Tensor:
    """Fill one meta parameter/buffer of `model` from the checkpoint (or from `raw`, its stored
    pair already read: Checkpoint.raw), cast to the dtype the model gave it (the router stays
    fp32), after checking that it is finite in that dtype (a stored NaN, an MXFP8 overflow, or a
    value beyond float16's range; check=False only for bytes that passed it before). Returns the
    meta tensor it replaced."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    dtype = (module._parameters[attr] if attr in module._parameters else module._buffers[attr]).dtype
    key = checkpoint_key(name, model.config, ckpt.mtp_layout)
    value = ckpt.tensor(key, device, raw).to(dtype)
    if check:
        check_finite(value, f"checkpoint key {key} (as {str(dtype).removeprefix('torch.')})")
    return put_tensor(model, name, value)


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", mtp_depths: int | None = None,
                    mtp: MTPConfig | None = None, drafter_only: bool | None = None) -> MiniMaxM3:
    """Build the model from config.json + safetensors, reading one tensor at a time.

    The module is built on the meta device and every checkpoint tensor's name, shape and format
    is checked first (`load_meta_model`), and so is the free memory of `device` (`check_memory`);
    then each tensor is read, dequantised if MXFP8, checked to be finite and cast to `dtype` on
    `device` (router weight and bias: fp32). The MTP depths may be stored in any MTP_LAYOUTS layout
    (found from the keys); `mtp` replaces config.json's MTP options. With drafter_only (default: a
    standalone MTP checkpoint) only embed_tokens, lm_head and the MTP depths are read, the rest
    stays on the meta device, and the model serves generate's drafter functions (mtp_pass,
    draft_logits) but not forward.
    """
    ckpt = Checkpoint(path)
    model = load_meta_model(ckpt, dtype, mtp_depths, mtp, drafter_only)
    check_memory(model, dtype, torch.device(device), ckpt.path)
    with torch.no_grad():
        for name in loaded_names(model):
            load_tensor(model, ckpt, name, device)
    return model.eval()


def loaded_names(model: MiniMaxM3) -> list[str]:
    """The tensors a load reads into the meta model: all, or a drafter's only."""
    return [n for n in model.state_dict() if not model.drafter_only or n.startswith(DRAFTER_MODULES)]


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`: CUDA's free memory; for the CPU the host's
    MemAvailable (page cache that can be dropped included), or the free pages where /proc/meminfo
    is missing; None where it cannot be told (then nothing is checked)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    with contextlib.suppress(OSError):
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if found:
            return int(found.group(1)) * 1024
    with contextlib.suppress(ValueError, OSError):          # a name this OS does not know
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_memory(model: MiniMaxM3, dtype: torch.dtype, device: torch.device, path: Path) -> None:
    """Refuse a whole-model load whose weights (the meta model's tensors in their dtypes, the router
    in fp32) exceed the free memory of `device`, before any tensor is read: a load that runs out
    fails only after reading much of the checkpoint, or swaps the host to a halt."""
    state = model.state_dict()
    need = sum(state[n].numel() * state[n].element_size() for n in loaded_names(model))
    free = free_memory(device)
    if free is not None and need > free:
        raise ValueError(f"checkpoint {str(path)!r} needs {_size(need)} for its weights in "
                         f"{str(dtype).removeprefix('torch.')} on {device}, and {_size(free)} is free there: "
                         f"run it streamed instead, one layer resident at a time (python m3_reference.py run "
                         f"--checkpoint {path} ..., or stream_forward)")


def check_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> int:
    """`check`: every weight of a checkpoint read once, shard by shard, one tensor at a time.

    Names, shapes and formats are checked against config.json from the headers first
    (`load_meta_model`); then each weight is read as from_pretrained reads it (MXFP8 dequantised, an
    E8M0 code 255 refused, cast to `dtype` with the router in fp32, found finite) and dropped. `run`
    reads only the experts the prompt routes to, so a NaN in another expert passes it; this finds
    it. Prints one line per shard (tensors and bytes read, problems, then each bad key) and a
    total; returns 0 when every weight is good, else 1. An unusable checkpoint (config.json missing
    or invalid, no weights file) is a ValueError."""
    ckpt = Checkpoint(path)
    try:
        model = load_meta_model(ckpt, dtype)
    except ValueError as e:                  # names, shapes, formats, unreadable files: one list
        print(e)
        print(f"FAILED: {str(ckpt.path)!r} does not match its config; no tensor read")
        return 1
    names = {checkpoint_key(n, model.config, ckpt.mtp_layout): n for n in loaded_names(model)}
    by_file: dict[Path, list[str]] = {}
    for key in sorted(names):
        by_file.setdefault(ckpt.files[key], []).append(key)
    bad: list[str] = []
    files = sorted(set(ckpt.files.values()))
    with torch.no_grad():
        for file in files:
            reads, read_bytes, before = len(ckpt.reads), ckpt.bytes_read, len(bad)
            for key in by_file.get(file, []):
                try:          # load_tensor returns the meta tensor it replaced: putting it back drops the weight
                    put_tensor(model, names[key], load_tensor(model, ckpt, names[key], "cpu"))
                except ValueError as e:
                    bad.append(str(e))
            found = len(bad) - before
            print(f"{file.name}: {len(ckpt.reads) - reads} tensors, {_size(ckpt.bytes_read - read_bytes)} read, "
                  f"{found} problem{'s' * (found != 1)}", flush=True)
            for problem in bad[before:]:
                print(f"  {problem}")
    print(f"{'FAILED' if bad else 'OK'}: {len(names)} weights in {len(files)} files, "
          f"{_size(ckpt.bytes_read)} read; " + (f"{len(bad)} bad" if bad else "every one finite"))
    return int(bool(bad))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size must be a positive int of bytes or like '500MB' / '2GB', got {size!r}")
    return int(float(m.group(1)) * {"B": 1, "KB": 2 ** 10, "MB": 2 ** 20, "GB": 2 ** 30}[m.group(2)])


def _write_atomic(target: Path, write) -> None:
    """write(tmp_path) into a temp file beside target, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def save_pretrained(model: MiniMaxM3, path: str | os.PathLike, max_shard_size: int | str | None = None,
                    mtp_layout: str = "m3", drafter_only: bool = False) -> None:
    """Write config.json (upstream form) and the weights in the upstream key layout, the MTP depths
    in `mtp_layout` (MTP_LAYOUTS). drafter_only: vLLM's standalone MTP checkpoint, text-only keys
    (model.embed_tokens, lm_head, the depths) and architectures ["MiniMaxM3MTP"].

    One model.safetensors, or shards model-0000i-of-0000n.safetensors of at most max_shard_size
    bytes each (a tensor larger than that gets a shard of its own) plus model.safetensors.index.json.
    Every file is written to a temp file and renamed; files of an earlier save that the new one
    does not use are removed.
    """
    from safetensors.torch import save_file
    if mtp_layout not in MTP_LAYOUTS:
        raise ValueError(f"mtp_layout must be one of {list(MTP_LAYOUTS)}, got {mtp_layout!r}")
    if drafter_only and not model.config.num_mtp_modules:
        raise ValueError("drafter_only=True needs MTP depths, and this model has none")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = replace(model.config, vision=None) if drafter_only else model.config
    state = {checkpoint_key(k, cfg, mtp_layout): t.detach().contiguous().cpu() for k, t in model.state_dict().items()
             if not drafter_only or k.startswith(DRAFTER_MODULES)}
    config = cfg.to_dict() | ({"architectures": ["MiniMaxM3MTP"], "model_type": "minimax_m3_mtp"} if drafter_only else {})
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    _write_atomic(path / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    for name, shard in zip(names, shards):
        _write_atomic(path / name, lambda p, shard=shard: save_file(shard, p, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        _write_atomic(path / INDEX_FILE, lambda p: Path(p).write_text(json.dumps(index, indent=2)))
    stale = [p for p in path.glob("model*.safetensors*") if p.name not in names and
             (p.name != INDEX_FILE or len(shards) == 1)]
    for p in stale:
        p.unlink()


# ============================================================================================
# Preprocessing: images and videos to patch rows, prompts to placeholder runs
# ============================================================================================
# The released processor (checkpoint remote code, vendored by vLLM; transformers' processor is the
# same algorithm): smart_resize to multiples of 28 within a pixel budget, antialiased bicubic
# resize of the uint8 pixels, rescale by 1/255 and CLIP normalisation fused into one step, frames
# padded to the temporal patch size, patches cut in 2x2 merge-window order. The prompt carries one
# placeholder per image or video, which the processor expands.

@dataclass
class ProcessorConfig:
    """The released processor's settings (preprocessor_config.json upstream, not config.json)."""
    image_min_pixels: int = 4 * 28 * 28           # 3,136: area bounds of a resized image
    image_max_pixels: int = 672 * 672             # 451,584: at most 24 x 24 = 576 tokens
    video_min_pixels: int = 4 * 28 * 28           # the same, per video frame
    video_max_pixels: int = 768 * 28 * 28         # 602,112
    max_aspect_ratio: float = 200.0               # longer / shorter side, rejected above
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                 max_ratio: float = 200.0) -> tuple[int, int]:
    """The resized (height, width): multiples of `factor` (patch size x merge size = 28), near the
    original aspect ratio, area within [min_pixels, max_pixels].

    Each side rounds to the nearest multiple (Python round: half to even), at least one factor; an
    area above the maximum scales both sides by beta = sqrt(h*w / max) and floors them, an area
    below the minimum scales by sqrt(min / (h*w)) and ceils them. (transformers' copy omits the
    one-factor floor in the first step: the two differ only for a side of 14 pixels or less, which
    rounds to 0 there: 14 / 28 = 0.5 rounds to even.)
    """
    if min(height, width) < 1:
        raise ValueError(f"size {height}x{width}: both sides must be at least 1 pixel")
    if max(height, width) / min(height, width) > max_ratio:
        raise ValueError(f"size {height}x{width}: aspect ratio {max(height, width) / min(height, width):.1f} "
                         f"is above the processor's limit {max_ratio:g}")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    if min(h, w) < factor:                   # only custom bounds reach this: the release would crash
        raise ValueError(f"size {height}x{width}: max_pixels {max_pixels} leaves a side under {factor} pixels")
    return h, w


def resize_uint8(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 frames [F, C, H, W] -> [F, C, height, width] uint8.

    This is torch's native uint8 CPU kernel, which torchvision runs for the released processor on
    a CPU (where transformers and vLLM run it): each separable pass rounds and clamps to uint8. On
    a GPU torchvision resizes in float32 and rounds once; on noise the two differ by up to ~20 of
    255 levels in about a quarter of the pixels, so the processor's output depends on its device.
    An unchanged size is no resize at all.
    """
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return F.interpolate(frames.cpu(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)


def normalize_pixels(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - 255 mean) / (255 std) per channel in fp32: the 1/255 rescale folded into the CLIP mean
    and std as the released processor does (mean and std are fp32, multiplied by 255 in fp32),
    then one subtraction and one division. frames uint8 [F, C, H, W] -> fp32 [F, C, H, W]."""
    m = (torch.tensor(mean, dtype=torch.float32) * 255.0).view(-1, 1, 1)
    s = (torch.tensor(std, dtype=torch.float32) * 255.0).view(-1, 1, 1)
    return (frames.to(torch.float32) - m) / s


def patchify(frames: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, list[int]]:
    """Normalised frames [F, C, H, W] -> pixel rows [t*h*w, C*Tp*P*P] and the grid [t, h, w].

    The last frame repeats until F is a multiple of Tp (an image is one frame); frames Tp*g ..
    Tp*g + Tp-1 form temporal group g. Rows run t outermost, then the 2x2 merge windows in raster
    order, then the m*m patches of a window; each row is laid out (C, Tp, P, P).
    """
    pad = -frames.shape[0] % temporal
    frames = torch.cat([frames, frames[-1:].expand(pad, *frames.shape[1:])]) if pad else frames
    Fr, C, H, W = frames.shape
    t, h, w = Fr // temporal, H // patch, W // patch
    x = frames.reshape(t, temporal, C, h // merge, merge, patch, w // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)                 # [t, h/m, w/m, m, m, C, Tp, P, P]
    return x.reshape(t * h * w, C * temporal * patch * patch), [t, h, w]


def resized_frames(array, cfg: M3Config, video: bool, proc: ProcessorConfig = ProcessorConfig()) -> torch.Tensor:
    """A uint8 RGB array, [H, W, 3] for an image or [F, H, W, 3] for video frames, as uint8 frames
    [F, 3, h, w] after smart_resize (image or video bounds) and the uint8 bicubic resize."""
    import numpy as np
    if cfg.vision is None:
        raise ValueError("images and videos need a vision config: this is a text-only model")
    # a contiguous CPU copy: arrays may be read-only or have negative strides; the processor runs on the CPU
    t = array.cpu() if isinstance(array, torch.Tensor) else torch.from_numpy(np.array(array, copy=True))
    what, want = ("frames", "[F, H, W, 3]") if video else ("image", "[H, W, 3]")
    if t.dtype != torch.uint8:
        raise TypeError(f"{what} must be a uint8 array {want} (RGB, 0..255), got {t.dtype}")
    if t.dim() != (4 if video else 3) or t.shape[-1] != 3 or t.numel() == 0:
        raise ValueError(f"{what} must be a non-empty RGB array {want}, got shape {list(t.shape)}")
    frames = (t if video else t[None]).permute(0, 3, 1, 2)
    v = cfg.vision
    bounds = (proc.video_min_pixels, proc.video_max_pixels) if video else (proc.image_min_pixels, proc.image_max_pixels)
    size = smart_resize(*frames.shape[-2:], v.patch_size * v.spatial_merge_size, *bounds, proc.max_aspect_ratio)
    return resize_uint8(frames, *size)


def pixel_rows(frames: torch.Tensor, cfg: M3Config, proc: ProcessorConfig = ProcessorConfig()) -> tuple[torch.Tensor, list[int]]:
    """Resized uint8 frames [F, 3, h, w] -> normalised patch rows and the grid [t, h, w]."""
    v = cfg.vision
    return patchify(normalize_pixels(frames, proc.image_mean, proc.image_std), v.patch_size, v.temporal_patch_size,
                    v.spatial_merge_size)


def preprocess_image(image, cfg: M3Config, proc: ProcessorConfig = ProcessorConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [H, W, 3] -> (pixel_values [h*w, C*Tp*P*P] fp32, grid_thw [1, 3] int64): smart_resize
    with the image bounds, uint8 bicubic resize, fused rescale + normalisation, patch rows."""
    rows, grid = pixel_rows(resized_frames(image, cfg, video=False, proc=proc), cfg, proc)
    return rows, torch.tensor([grid])


def preprocess_video(frames, cfg: M3Config, fps: float | None = None, frame_indices: Sequence[int] | None = None,
                     proc: ProcessorConfig = ProcessorConfig()) -> tuple[torch.Tensor, torch.Tensor, list[float] | None]:
    """uint8 [F, H, W, 3] (frames already sampled) -> (pixel_values [t*h*w, C*Tp*P*P], grid_thw [1, 3],
    timestamps). Each frame as an image, with the video bounds; the last frame repeats to a multiple
    of Tp. With the source `fps`, group g's timestamp is frame_indices[min(Tp*g, F-1)] / fps seconds
    (frame_indices: the frames' indices in the source, default 0..F-1); without it, None."""
    video = resized_frames(frames, cfg, video=True, proc=proc)
    if frame_indices is not None and len(frame_indices) != video.shape[0]:
        raise ValueError(f"frame_indices has {len(frame_indices)} entries for {video.shape[0]} frames")
    if fps is not None and not 0 < fps < float("inf"):
        raise ValueError(f"fps must be a finite number > 0, got {fps}")
    rows, grid = pixel_rows(video, cfg, proc)
    return rows, torch.tensor([grid]), video_timestamps(video.shape[0], grid[0], cfg, fps, frame_indices)


def video_timestamps(num_frames: int, groups: int, cfg: M3Config, fps: float | None,
                     frame_indices: Sequence[int] | None = None) -> list[float] | None:
    """Seconds of each temporal group's first frame: frame_indices[min(Tp*g, F-1)] / fps (None without fps)."""
    if fps is None:
        return None
    indices = list(range(num_frames)) if frame_indices is None else list(frame_indices)
    return [indices[min(g * cfg.vision.temporal_patch_size, len(indices) - 1)] / fps for g in range(groups)]


IMAGE_TEXT, VIDEO_TEXT = "]<]image[>[", "]<]video[>["                     # the placeholders, as text
START_TEXT, END_TEXT = "]<]start of image[>[", "]<]end of image[>["        # images and video groups alike


def timestamp_text(seconds: float) -> str:
    """The text before a video group, tokenised like any text: "]<]{seconds:.1f} seconds[>["."""
    return f"]<]{seconds:.1f} seconds[>["


def expand_placeholders(pieces: list, image, video, image_grids: list, video_grids: list, stamps: list,
                        start, end, merge: int) -> list:
    """The released processor's expansion, on text pieces or token ids alike: each `image` -> start +
    t*h*w / m^2 x image + end; each `video`, per temporal group g, -> stamps[v][g] + start + h*w / m^2
    x video + end (videos use the image start / end too). The grids are (t, h, w) rows in placeholder
    order; stamps[v][g] holds the pieces of video v's group g timestamp (none when unknown)."""
    grids, videos, out = {image: iter(image_grids), video: iter(video_grids)}, iter(stamps), []
    for piece in pieces:
        if piece not in grids:
            out.append(piece)
        elif piece == image:
            t, h, w = next(grids[image])
            out += [start, *[image] * (t * h * w // merge ** 2), end]
        else:
            (t, h, w), stamp = next(grids[video]), next(videos)
            for g in range(t):
                out += [*stamp[g], start, *[video] * (h * w // merge ** 2), end]
    return out


def expand_prompt_text(text: str, image_grid_thw=None, video_grid_thw=None,
                       timestamps: Sequence[Sequence[float] | None] | None = None, merge: int = 2) -> str:
    """The expansion on the text before tokenisation: IMAGE_TEXT / VIDEO_TEXT the placeholders,
    START_TEXT / END_TEXT the brackets, timestamp_text(seconds) before each video group when its
    timestamps are known. Tokenising the result as one string gives the processor's ids;
    expand_prompt on ids (as vLLM does) can differ from it where byte-level BPE merges the text
    before a timestamp with it (a space before the placeholder)."""
    counts = {IMAGE_TEXT: text.count(IMAGE_TEXT), VIDEO_TEXT: text.count(VIDEO_TEXT)}
    grids = {IMAGE_TEXT: [] if image_grid_thw is None else torch.as_tensor(image_grid_thw).reshape(-1, 3).tolist(),
             VIDEO_TEXT: [] if video_grid_thw is None else torch.as_tensor(video_grid_thw).reshape(-1, 3).tolist()}
    for marker, rows in grids.items():
        if counts[marker] != len(rows):
            raise ValueError(f"the prompt holds {counts[marker]} {marker} placeholders but {len(rows)} grids were "
                             f"given for them; the counts must match")
    seconds = timestamps if timestamps is not None else [None] * len(grids[VIDEO_TEXT])
    stamps = [[[timestamp_text(x)] for x in secs] if secs else [[]] * t for secs, (t, _, _) in
              zip(seconds, grids[VIDEO_TEXT])]
    pieces = re.split(f"({re.escape(IMAGE_TEXT)}|{re.escape(VIDEO_TEXT)})", text)
    return "".join(expand_placeholders(pieces, IMAGE_TEXT, VIDEO_TEXT, grids[IMAGE_TEXT], grids[VIDEO_TEXT], stamps,
                                       START_TEXT, END_TEXT, merge))


def _placeholder_grids(ids: torch.Tensor, grid, token: int, what: str) -> list:
    """The (t, h, w) rows of `grid` [n, 3], one per placeholder `token` in ids."""
    rows = [] if grid is None else torch.as_tensor(grid).reshape(-1, 3).tolist()
    if grid is not None and (torch.as_tensor(grid).dim() != 2 or any(min(r) < 1 for r in rows)):
        raise ValueError(f"{what}_grid_thw must be [n, 3] rows of positive (t, h, w), got {torch.as_tensor(grid).tolist()}")
    n = int((ids == token).sum())
    if n != len(rows):
        raise ValueError(f"input_ids hold {n} {what} placeholders (id {token}) but {len(rows)} {what} grids "
                         f"were given; the counts must match")
    return rows


def expand_prompt(input_ids, image_grid_thw=None, video_grid_thw=None,
                  timestamp_ids: Sequence[Sequence[Sequence[int]]] | None = None, *, cfg: M3Config) -> torch.Tensor:
    """The expansion on token ids (expand_placeholders with the config's placeholder and bracket
    ids; timestamp_ids[video][g]: the ids of group g's timestamp text, if given).

    input_ids [S] or [1, S] int; grids [n, 3] in placeholder order -> the same rank, longer.
    """
    if cfg.vision is None:
        raise ValueError("expand_prompt needs a vision config: this is a text-only model")
    ids = torch.as_tensor(input_ids)
    if ids.dim() not in (1, 2) or (ids.dim() == 2 and ids.shape[0] != 1):
        raise ValueError(f"input_ids must be [S] or [1, S], got shape {list(ids.shape)}")
    start, end = cfg.vision_start_token_index, cfg.vision_end_token_index
    for name, i in (("vision_start_token_index", start), ("vision_end_token_index", end)):
        if not 0 <= i < cfg.vocab_size:        # configs without these keys get the released ids
            raise ValueError(f"config {name} = {i} is outside the vocabulary [0, {cfg.vocab_size}); set it in config.json")
    images = _placeholder_grids(ids, image_grid_thw, cfg.image_token_index, "image")
    videos = _placeholder_grids(ids, video_grid_thw, cfg.video_token_index, "video")
    if timestamp_ids is None:
        timestamp_ids = [[[]] * t for t, _, _ in videos]
    if len(timestamp_ids) != len(videos):
        raise ValueError(f"timestamp_ids has {len(timestamp_ids)} entries, one per video is needed")
    for v, (stamps, (t, _, _)) in enumerate(zip(timestamp_ids, videos)):
        if len(stamps) != t:
            raise ValueError(f"timestamp_ids[{v}] has {len(stamps)} entries for {t} temporal groups")
    bad = [i for video in timestamp_ids for group in video for i in group
           if not 0 <= i < cfg.vocab_size or i in (cfg.image_token_index, cfg.video_token_index)]
    if bad:
        raise ValueError(f"timestamp_ids hold {bad[:3]}: ids must be text tokens in [0, {cfg.vocab_size}), "
                         f"not placeholders")
    out = expand_placeholders(ids.flatten().tolist(), cfg.image_token_index, cfg.video_token_index, images, videos,
                              timestamp_ids, start, end, cfg.vision.spatial_merge_size)
    return torch.tensor(out, dtype=torch.int64).reshape((1, -1) if ids.dim() == 2 else (-1,))


# ============================================================================================
# Media files: images and videos from disk into forward inputs
# ============================================================================================
# What `demo`, `run` and `generate` do with --image / --video: decode the files (Pillow, PyAV),
# sample a video's frames as the engines do, preprocess them as above and expand the prompt.

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_image(path: str | os.PathLike) -> "np.ndarray":
    """An image file as uint8 RGB [H, W, 3] (Pillow decodes): turned upright by its EXIF orientation
    (as transformers' image loader does), then converted as the processor converts a PIL image:
    transparency composited over white, any other mode converted to RGB."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def next_sampled_frame(prev: int | None, source_fps: float, target_fps: float = 1.0) -> int:
    """The engines' sampling (vLLM's MiniMax M3 video backend; not the processor's): frame 0, then the
    first frame at least 1/target_fps - 1e-4 s after the last kept one (frame i sits at i / source_fps)."""
    if prev is None:
        return 0
    return max(math.ceil((prev / source_fps + 1 / target_fps - 1e-4) * source_fps), prev + 1)


def sample_frame_indices(num_frames: int, source_fps: float, target_fps: float = 1.0) -> list[int]:
    """The kept frames of a video of num_frames: next_sampled_frame from frame 0 while inside the
    video, then the last frame too when it is more than 1e-4 s after the last kept one."""
    keep = [0]
    while (i := next_sampled_frame(keep[-1], source_fps, target_fps)) < num_frames:
        keep.append(i)
    return keep + [num_frames - 1] * keeps_last_frame(num_frames - 1, keep[-1], source_fps)


def keeps_last_frame(last: int, kept: int, source_fps: float) -> bool:
    """Whether a video's last frame joins the sampled ones: it is not the last kept one and lies more
    than 1e-4 s after it."""
    return last != kept and (last - kept) / source_fps > 1e-4


def load_video(path: str | os.PathLike, fps: float | None) -> tuple["np.ndarray", float | None, list[int] | None]:
    """(frames uint8 [F, H, W, 3], source fps, frame indices): a folder of image files (in natural
    name order) or a .npy array, taken whole with `fps` as given; a video file decoded by PyAV (when
    it is installed) and sampled at 1 fps while decoding, with the stream's fps and the kept indices."""
    import numpy as np
    p = Path(path)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"--video {p} is an image file; give it as --image, or a folder of frames as --video")
    if p.is_dir():
        natural = lambda f: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", f.name)]   # frame2 before frame10
        files = sorted((f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES), key=natural)
        frames = [load_image(f) for f in files]
        if not frames or len({f.shape for f in frames}) != 1:
            raise ValueError(f"--video {p}: needs image files of one size, found {sorted({f.shape for f in frames})}")
        return np.stack(frames), fps, None
    if p.suffix == ".npy":
        try:
            return np.load(p), fps, None
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read --video {p}: {e}") from e
    try:
        import av
    except ImportError:
        raise ValueError(f"--video {p}: decoding a video file needs PyAV (pip install av); or give a folder of "
                         f"frames or a .npy array [F, H, W, 3]") from None
    if fps is not None:
        raise ValueError(f"--video {p}: --video-fps is for frame folders and .npy arrays; a video file's fps "
                         f"comes from its stream")
    kept, indices = [], []
    try:                                     # keep only the sampled frames (and the latest one) while decoding
        with av.open(str(p)) as container:
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate)
            for i, frame in enumerate(container.decode(stream)):
                last = (i, frame.to_ndarray(format="rgb24"))
                if i == next_sampled_frame(indices[-1] if indices else None, source_fps):
                    indices.append(i)
                    kept.append(last[1])
    except (av.error.FFmpegError, IndexError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"cannot decode --video {p}: {e}") from e
    if not kept:
        raise ValueError(f"--video {p}: no frames decoded")
    if keeps_last_frame(last[0], indices[-1], source_fps):
        indices.append(last[0])
        kept.append(last[1])
    return np.stack(kept), source_fps, indices


def add_media(inputs: dict, images: Sequence[str], videos: Sequence[str], video_fps: float | None,
              cfg: M3Config, encode=None, text: str | None = None) -> dict:
    """Forward inputs for a prompt and image / video files: their pixel rows and grids, and the
    prompt expanded. A text prompt (`text`, with `encode`: text -> ids) is expanded as text and then
    tokenised, as the released processor does; token ids (inputs["input_ids"]) are expanded at the
    id level, the timestamps tokenised by `encode` (left out, with a note, without it)."""
    if text is not None:
        inputs = {"input_ids": None}
    if not images and not videos:
        if video_fps is not None:
            raise ValueError("--video-fps given without --video")
        return inputs if text is None else {"input_ids": torch.tensor([encode(text)])}
    if cfg.vision is None:
        raise ValueError("--image / --video given, but the model is text-only")
    if any(k in inputs for k in ("pixel_values", "pixel_values_videos")):
        raise ValueError("the prompt file already holds media; give --image / --video with token ids or text")
    pre_images = [preprocess_image(load_image(p), cfg) for p in images]
    pre_videos = [preprocess_video(frames, cfg, fps, indices) for frames, fps, indices in
                  (load_video(p, video_fps) for p in videos)]
    image_grids = [g[0].tolist() for _, g in pre_images] or None
    video_grids = [g[0].tolist() for _, g, _ in pre_videos] or None
    if text is not None:
        expanded = expand_prompt_text(text, image_grids, video_grids, [s for _, _, s in pre_videos],
                                      cfg.vision.spatial_merge_size)
        out = {"input_ids": torch.tensor([encode(expanded)])}
    else:
        if encode is None and any(stamps for _, _, stamps in pre_videos):
            print("note: video timestamps left out (writing them needs tokenizer.json and the tokenizers package)",
                  file=sys.stderr)
        stamp_ids = [[encode(timestamp_text(s)) for s in stamps] if stamps and encode else [[]] * int(grid[0, 0])
                     for _, grid, stamps in pre_videos]
        out = dict(inputs, input_ids=expand_prompt(inputs["input_ids"], image_grids, video_grids, stamp_ids, cfg=cfg))
    if pre_images:
        out.update(pixel_values=torch.cat([r for r, _ in pre_images]), image_grid_thw=torch.cat([g for _, g in pre_images]))
    if pre_videos:
        out.update(pixel_values_videos=torch.cat([r for r, _, _ in pre_videos]),
                   video_grid_thw=torch.cat([g for _, g, _ in pre_videos]))
    return out


# ============================================================================================
# Streamed and offloaded runs: a checkpoint larger than the device
# ============================================================================================
# The released model (434.5B parameters with its vision tower and MTP depth, 421 GiB in MXFP8)
# fits no single GPU. stream_forward builds
# it on the meta device and makes one piece real at a time from the memory-mapped shards: the
# embeddings (with the vision tower, projector and merger when there is media), each decoder layer,
# the final norm, each MTP depth, the head. An MoE layer routes first (its router is part of the
# piece) and then reads only the experts some token chose. The math is the modules' own forward,
# so the result equals the in-memory model's bit for bit. For decoding, load_offloaded keeps
# everything but the routed experts resident and reads those on demand into an LRU cache
# (ExpertCache), again around the modules' own forward.

@dataclass
class StreamRun:
    """What stream_forward returns."""
    output: M3Output
    tensors: dict[str, torch.Tensor]   # golden names: every intermediate with trace=True, else the results
    peak_param_bytes: int              # most parameter bytes resident at once
    largest_piece_bytes: int           # the largest piece of this run, every expert counted
    reads: list[str]                   # checkpoint keys read, in order (scales included)
    bytes_read: int


def chosen_experts(moe: MoE, x: torch.Tensor) -> list[int]:
    """The experts the MoE's router chooses for some token of x [..., D], ascending: what a run
    that holds experts on demand must make real before the MoE's own forward routes again."""
    _, ids = route(x.reshape(-1, x.shape[-1]), moe.gate.weight, moe.e_score_correction_bias, moe.top_k, moe.scaling)
    return ids.unique().tolist()


class _Pieces:
    """Holds one piece of the meta model's weights at a time while the model's own forward runs: a
    forward pre-hook on each piece (`pieces`) reads its tensors when the forward enters it, after
    freeing the piece before; an MoE layer's routed experts are read once its router has chosen
    them. Counts the bytes resident and prints a line per piece."""

    def __init__(self, model: MiniMaxM3, ckpt: Checkpoint, device, progress: bool):
        self.model, self.ckpt, self.device, self.progress = model, ckpt, device, progress
        names, labelled = {m: n for n, m in model.named_modules()}, pieces(model)
        sizes = {n: t.numel() * t.element_size() for n, t in model.state_dict().items()}   # once: ~24k names
        self.tensors = {m: [n for n in sizes if n.startswith(names[m] + ".")] for _, m in labelled}
        self.largest = max(sum(sizes[n] for n in ns) for ns in self.tensors.values())
        self.meta: dict[str, torch.Tensor] = {}    # the meta tensors the resident ones replaced
        self.live = self.peak = 0
        self.current: nn.Module | None = None
        self.handles = [m.register_forward_pre_hook(lambda m, args, label=label: self.enter(label, m))
                        for label, m in labelled]
        self.handles += [m.register_forward_pre_hook(self.route_then_load(n + "."))
                         for n, m in model.named_modules() if isinstance(m, MoE)]

    def load(self, names: list[str]) -> None:
        for name in names:
            old = self.meta[name] = load_tensor(self.model, self.ckpt, name, self.device)
            self.live += old.numel() * old.element_size()
        self.peak = max(self.peak, self.live)

    def enter(self, label: str, module: nn.Module) -> None:
        """The forward enters a piece: free the resident one (unless it is this one), read this one
        without its routed experts."""
        if module is self.current:
            return
        self.free()
        self.current, self.label, self.experts = module, label, ""
        self.t0, self.read0 = time.perf_counter(), self.ckpt.bytes_read
        self.load([n for n in self.tensors[module] if ".experts." not in n])

    def route_then_load(self, prefix: str):
        """A forward pre-hook for the MoE at `prefix`: route its input, then read the chosen experts."""
        def hook(moe: MoE, args):
            chosen = chosen_experts(moe, args[0])
            self.load([f"{prefix}experts.{e}.{w}.weight" for e in chosen for w in ("w1", "w2", "w3")])
            self.experts = f" {len(chosen)}/{len(moe.experts)} experts"
        return hook

    def free(self) -> None:
        """Put the resident piece back on the meta device and print its line."""
        for name, old in self.meta.items():
            put_tensor(self.model, name, old)
        self.meta, self.live = {}, 0
        if self.current is not None and self.progress:
            device_peak = (f", device peak {_size(torch.cuda.max_memory_allocated(self.device))}"
                           if torch.device(self.device).type == "cuda" else "")
            print(f"{self.label}{self.experts}  read {_size(self.ckpt.bytes_read - self.read0)}  "
                  f"{time.perf_counter() - self.t0:.1f} s  peak params {_size(self.peak)}{device_peak}",
                  file=sys.stderr, flush=True)
        self.current = None

    def close(self) -> None:
        self.free()
        for handle in self.handles:
            handle.remove()


def pieces(model: MiniMaxM3) -> list[tuple[str, nn.Module]]:
    """The pieces of a streamed run, in the order the forward enters them, with their progress
    labels: the vision modules, the embeddings, each layer, the norm, each MTP depth, the head."""
    cfg, text = model.config, model.language_model.model
    vision = [("vision tower", model.vision_tower), ("projector", model.multi_modal_projector),
              ("patch merger", model.patch_merge_mlp)] if cfg.vision is not None else []
    L, P = cfg.num_hidden_layers, cfg.mtp_physical_depths
    kind = lambda i: f"{'moe' if cfg.is_moe(i) else 'dense'}+{'sparse' if cfg.is_sparse(i) else 'full'}"
    return (vision + [("embeddings", text.embed_tokens)]
            + [(f"layer {i}/{L} {kind(i)}", layer) for i, layer in enumerate(text.layers)] + [("norm", text.norm)]
            + [(f"MTP depth {p + 1}/{P}", depth) for p, depth in enumerate(text.mtp["layers"] if P else [])]
            + [("lm_head", model.language_model.lm_head)])


STREAM_INPUTS = ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                 "position_ids", "labels", "attention_mask")


def stream_forward(path: str | os.PathLike, inputs: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", trace: bool = False, mtp_depths: int | None = None,
                   progress: bool = False, mtp: MTPConfig | None = None) -> StreamRun:
    """MiniMaxM3.forward of the checkpoint at `path` on `inputs` (its keyword arguments,
    STREAM_INPUTS), holding one piece's parameters at a time on `device` (`_Pieces`).

    Checks the whole checkpoint against its config first (`load_meta_model`), so a missing, truncated
    or mis-shaped file fails before any compute; a non-finite weight or layer output stops the run
    with the name of the key or layer. Returns the outputs, the golden-named tensors (every
    intermediate with trace=True), and the run's peak parameter bytes and reads.
    """
    ckpt = Checkpoint(path)
    model = load_meta_model(ckpt, dtype, mtp_depths, mtp, drafter_only=False)
    unknown = set(inputs) - set(STREAM_INPUTS)
    if unknown:
        raise ValueError(f"inputs has keys {sorted(unknown)}; allowed are MiniMaxM3.forward's arguments "
                         f"{list(STREAM_INPUTS)}")
    inputs = {k: v.to(device) for k, v in inputs.items() if v is not None}
    media = [m for m, key in (("image", "pixel_values"), ("video", "pixel_values_videos")) if key in inputs]
    from golden.generate import Tracer, named_outputs      # the golden names of what the run produced
    tracer = Tracer(model, media) if trace else None
    resident = _Pieces(model, ckpt, device, progress)
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        resident.close()
        if tracer is not None:
            tracer.close()
    return StreamRun(out, named_outputs(tracer.out if trace else {}, out), resident.peak, resident.largest,
                     ckpt.reads, ckpt.bytes_read)


class ExpertCache:
    """The routed experts of an offloaded model (load_offloaded). Before each MoE forward a pre-hook
    routes its input and makes the chosen experts real: from the device LRU when cached there, else
    from the host LRU (stored bytes, pinned) or the checkpoint, copied to the device and dequantised
    there. After the forward, least recently used experts go back to the meta device until the
    device LRU holds at most `capacity` bytes (the experts of the running layer stay while it runs,
    even beyond it). `stats` counts experts by where they came from and the bytes read from disk."""

    def __init__(self, model: MiniMaxM3, ckpt: Checkpoint, device, capacity: int, host_capacity: int,
                 progress: bool = False):
        from collections import OrderedDict
        self.model, self.ckpt, self.device = model, ckpt, torch.device(device)
        self.capacity, self.host_capacity = capacity, host_capacity
        self.progress, self.prefilling, self.t0, self.done = progress, False, time.perf_counter(), 0
        self.lru: OrderedDict[str, tuple[int, dict[str, torch.Tensor]]] = OrderedDict()   # prefix -> (bytes, meta)
        self.host: OrderedDict[str, tuple[int, dict[str, tuple]]] = OrderedDict()         # prefix -> (bytes, raw)
        self.stats = {"disk": 0, "host": 0, "device": 0, "bytes_read": 0}
        moes = [(n + ".", m) for n, m in model.named_modules() if isinstance(m, MoE)]
        self.layers = sum(".mtp." not in p for p, _ in moes)          # a prefill runs no MTP depth
        self.handles = [m.register_forward_pre_hook(lambda m, args, p=p: self.route(p, m, args[0])) for p, m in moes]
        self.handles += [m.register_forward_hook(lambda *_: self.trim()) for _, m in moes]

    def route(self, prefix: str, moe: MoE, x: torch.Tensor) -> None:
        for e in chosen_experts(moe, x):
            self.fetch(f"{prefix}experts.{e}.")

    def fetch(self, expert: str) -> None:
        """Make one expert's w1, w2, w3 real on the device, counting where they came from."""
        if expert in self.lru:
            self.lru.move_to_end(expert)
            self.stats["device"] += 1
            return
        names = [f"{expert}{w}.weight" for w in ("w1", "w2", "w3")]
        if expert in self.host:
            self.host.move_to_end(expert)
            raw, where = self.host[expert][1], "host"
        else:
            before = self.ckpt.bytes_read
            raw = {n: self.ckpt.raw(checkpoint_key(n, self.model.config, self.ckpt.mtp_layout)) for n in names}
            self.stats["bytes_read"] += self.ckpt.bytes_read - before
            where = "disk"
        # the finiteness check reads back from the device: bytes from the host cache passed it on
        # their way in from disk, so only those are checked (and kept on the host once they have)
        meta = {n: load_tensor(self.model, self.ckpt, n, self.device, raw[n], check=where == "disk") for n in names}
        if where == "disk":
            self.keep_on_host(expert, raw)
        self.lru[expert] = (sum(t.numel() * t.element_size() for t in meta.values()), meta)
        self.stats[where] += 1

    def keep_on_host(self, expert: str, raw: dict[str, tuple]) -> None:
        size = sum(t.numel() * t.element_size() for pair in raw.values() for t in pair if t is not None)
        if size > self.host_capacity:
            return
        pin = (lambda t: t.pin_memory()) if self.device.type == "cuda" else (lambda t: t)
        self.host[expert] = (size, {n: tuple(None if t is None else pin(t) for t in pair) for n, pair in raw.items()})
        while sum(b for b, _ in self.host.values()) > self.host_capacity:
            self.host.popitem(last=False)

    def trim(self) -> None:
        """After a MoE forward: evict least recently used experts down to `capacity` bytes (and, in
        a prefill with progress on, print the layer's line)."""
        if self.progress and self.prefilling:
            self.done += 1
            elapsed = time.perf_counter() - self.t0
            print(f"prefill MoE layer {self.done}/{self.layers}: elapsed {elapsed:.1f} s, ETA "
                  f"{elapsed / self.done * (self.layers - self.done):.1f} s{self.summary()}", file=sys.stderr, flush=True)
        for expert in list(self.lru):
            if sum(b for b, _ in self.lru.values()) <= self.capacity:
                break
            for name, meta in self.lru.pop(expert)[1].items():
                put_tensor(self.model, name, meta)

    def summary(self) -> str:
        """Experts so far by source, bytes read from disk and the hit rate of the caches."""
        s = self.stats
        hits = (s["device"] + s["host"]) / max(1, s["device"] + s["host"] + s["disk"])
        return (f"; experts from disk {s['disk']}, host {s['host']}, device {s['device']} (hit rate {hits:.1%}), "
                f"read {_size(s['bytes_read'])}")

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def load_offloaded(path: str | os.PathLike, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                   expert_cache_gib: float = 40.0, host_cache_gib: float | None = None,
                   mtp_depths: int | None = None, mtp: MTPConfig | None = None, kv_tokens: int = 0,
                   progress: bool = False) -> MiniMaxM3:
    """The checkpoint's model with every weight but the routed experts resident on `device` (as
    from_pretrained loads them) and the routed experts read on demand through an ExpertCache of
    `expert_cache_gib` on the device, over an optional host-RAM cache of `host_cache_gib`. It is
    the same module: forward, new_cache and generate run unchanged and give the in-memory model's
    results bit for bit; only where the expert weights live differs. model.expert_cache has stats.
    The plan (resident weights, expert cache, a running layer's routed experts beyond it, one
    expert's fp32 dequantisation, the Cache of `kv_tokens` tokens over all rows) is checked against
    the device's free memory before any tensor is read, and printed with progress; activations
    are not in it."""
    ckpt = Checkpoint(path)
    model = load_meta_model(ckpt, dtype, mtp_depths, mtp, drafter_only=False)
    device = torch.device(device)
    resident = [n for n in loaded_names(model) if ".experts." not in n]
    capacity, host = (int(g * 2 ** 30) for g in (expert_cache_gib, host_cache_gib or 0))
    state = model.state_dict()
    cfg, size = model.config, torch.empty(0, dtype=dtype).element_size()
    expert = 3 * cfg.hidden_size * cfg.intermediate_size
    # a layer keeps its routed experts while it runs, beyond the cache (the prefill's: up to all
    # of them), and one expert is dequantised through fp32
    running = min(cfg.num_local_experts, cfg.num_experts_per_tok * max(kv_tokens, 1)) * expert * size
    plan = {"resident weights": sum(state[n].numel() * state[n].element_size() for n in resident),
            "expert cache": capacity, "a running layer's experts": running, "dequantisation": expert * 4,
            f"KV + index-key cache of {kv_tokens} tokens": kv_tokens * cache_bytes_per_token(cfg, dtype)}
    if progress:
        print(f"memory plan on {device}: " + ", ".join(f"{k} {_size(v)}" for k, v in plan.items())
              + (f"; host cache {_size(host)}" if host else ""), file=sys.stderr, flush=True)
    free = free_memory(device)
    if free is not None and sum(plan.values()) > free:
        raise ValueError(f"checkpoint {str(ckpt.path)!r} needs {_size(sum(plan.values()))} on {device} ("
                         + ", ".join(f"{k} {_size(v)}" for k, v in plan.items()) + f") and {_size(free)} is free "
                         f"there: lower expert_cache_gib or the length")
    with torch.no_grad():
        for name in resident:
            load_tensor(model, ckpt, name, device)
    model.expert_cache = ExpertCache(model, ckpt, device, capacity, host, progress)
    return model.eval()


def cache_bytes_per_token(cfg: M3Config, dtype: torch.dtype) -> int:
    """Bytes a Cache holds per token (one row): k and v of every layer and MTP depth, plus the index
    keys of the sparse ones, in the model dtype."""
    size = torch.empty(0, dtype=dtype).element_size()
    kv, index = 2 * cfg.num_key_value_heads * cfg.head_dim, cfg.sparse_index_dim
    layers = [cfg.is_sparse(i) for i in range(cfg.num_hidden_layers)]
    layers += [cfg.is_sparse(cfg.num_hidden_layers - 1)] * cfg.mtp_physical_depths
    return sum(kv + (index if sparse else 0) for sparse in layers) * size


# ============================================================================================
# CLI: demo, run, check, generate (golden, verify and bench delegate to golden/generate.py)
# ============================================================================================

def demo_inputs(cfg: M3Config, seed: int = 0, image_grids=((1, 4, 4), (1, 6, 8)), video_hw=(4, 4)) -> dict:
    """Text, two images of different grids and a video one temporal group longer than a segment,
    batch of 1, labels = the input ids."""
    g = torch.Generator().manual_seed(seed)
    v = cfg.vision
    image_grid = torch.tensor(image_grids)
    video_grid = torch.tensor([[v.vision_segment_max_frames + 1, *video_hw]])
    merge = v.spatial_merge_size ** 2

    def text(n):
        return torch.randint(0, min(cfg.image_token_index, cfg.video_token_index), (n,), generator=g)
    pieces = [text(8)]
    for t, h, w in image_grid.tolist():
        pieces += [torch.full((t * h * w // merge,), cfg.image_token_index), text(5)]
    t, h, w = video_grid[0].tolist()
    pieces += [torch.full((t * h * w // merge,), cfg.video_token_index), text(12)]
    ids = torch.cat(pieces)[None]
    return dict(input_ids=ids,
                pixel_values=torch.randn(int(image_grid.prod(-1).sum()), v.patch_dim, generator=g),
                image_grid_thw=image_grid,
                pixel_values_videos=torch.randn(int(video_grid.prod(-1).sum()), v.patch_dim, generator=g),
                video_grid_thw=video_grid, labels=ids.clone())


def demo(images: Sequence[str] = (), videos: Sequence[str] = (), video_fps: float | None = None) -> None:
    """The tiny preset with random weights on the demo inputs, or on text around the given image
    and video files (preprocessed as the released processor does)."""
    cfg = M3Config.tiny()
    t0 = time.perf_counter()
    model = init_random_(MiniMaxM3(cfg), seed=0).eval()
    t1 = time.perf_counter()
    if images or videos:
        g = torch.Generator().manual_seed(0)
        text = lambda n: torch.randint(0, cfg.image_token_index, (n,), generator=g).tolist()
        ids = text(8) + [x for _ in images for x in [cfg.image_token_index] + text(3)] + \
            [x for _ in videos for x in [cfg.video_token_index] + text(3)]
        inputs = add_media({"input_ids": torch.tensor([ids])}, images, videos, video_fps, cfg, encode=None)
        inputs["labels"] = inputs["input_ids"].clone()
    else:
        inputs = demo_inputs(cfg)
    with torch.no_grad():
        out = model(**inputs)
    t2 = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"MiniMax M3 reference demo: tiny preset, random weights, {n_params:,} parameters, torch {torch.__version__}, "
          f"{'torch' if _kernels is None else 'triton'} kernels")
    for name, t in inputs.items():
        print(f"  {name:<20} {str(list(t.shape)):<14} {str(t.dtype).removeprefix('torch.')}")
    if "video_grid_thw" in inputs:
        print(f"  video grids {inputs['video_grid_thw'].tolist()} are cut into segments "
              f"{video_segments(inputs['video_grid_thw'].tolist(), cfg.vision.vision_segment_max_frames)}")
    print(f"  logits {list(out.logits.shape)}  mtp_logits {[list(x.shape) for x in out.mtp_logits]}")
    probs = out.logits[0, -1].float().softmax(-1)
    top = probs.topk(5)
    print("  top next tokens: " + ", ".join(f"{i} ({p:.3f})" for p, i in zip(top.values.tolist(), top.indices.tolist())))
    for k, lg in enumerate(out.mtp_logits, start=1):
        print(f"  MTP depth {k}: logits mean {lg.mean():+.4f} std {lg.std():.4f}, "
              f"token at +{k + 1} from the last position: {int(lg[0, -1].argmax())}")
    print(f"  loss {out.loss:.4f} = lm {out.lm_loss:.4f} + mtp {out.mtp_loss:.4f}")
    print(f"  timings: build {1e3 * (t1 - t0):.0f} ms, forward {1e3 * (t2 - t1):.0f} ms")


def _size(n: int) -> str:
    return next(f"{n / 2 ** e:.2f} {unit}" for e, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B"))
                if n >= 2 ** e or e == 0)


def load_tokenizer(directory: str | os.PathLike, required: bool):
    """text -> token ids from the checkpoint's tokenizer.json (the tokenizers package, optional), no
    special tokens added and no chat template; None when absent and not required."""
    path = Path(directory) / "tokenizer.json"
    try:
        from tokenizers import Tokenizer
    except ImportError:
        if required:
            raise ValueError("--prompt needs the tokenizers package (pip install tokenizers); or give --prompt-ids") from None
        return None
    if not path.exists():
        if required:
            raise ValueError(f"--prompt needs {path}; or give --prompt-ids")
        return None
    tokenizer = Tokenizer.from_file(str(path))
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def read_prompt(prompt_ids: str | None, prompt_file: str | None) -> dict[str, torch.Tensor]:
    """The inputs of `run` given as token ids "1,2,3", or a file: a .safetensors of MiniMaxM3.forward's
    inputs (a golden case's inputs.safetensors layout, media included) or a text file of token ids
    separated by commas or whitespace."""
    if prompt_file is not None and prompt_file.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(prompt_file)
        except Exception as e:                  # safetensors raises its own error types
            raise ValueError(f"cannot read --prompt-file {prompt_file}: {e}") from e
    try:
        text = prompt_ids if prompt_file is None else Path(prompt_file).read_text()
        ids = [int(t) for t in re.split(r"[,\s]+", text.strip()) if t]
        if not ids:
            raise ValueError("it holds none")
        return {"input_ids": torch.tensor([ids])}
    except (OSError, ValueError, RuntimeError) as e:       # RuntimeError: an id beyond int64
        raise ValueError(f"the prompt must be token ids (int64) separated by commas or whitespace: {e}") from e


def run_checkpoint(args) -> None:
    """`run`: the streamed forward of a checkpoint on one prompt, its top next tokens and totals."""
    from safetensors.torch import save_file
    encode = load_tokenizer(args.checkpoint, required=args.prompt is not None)
    inputs = {} if args.prompt is not None else read_prompt(args.prompt_ids, args.prompt_file)
    inputs = add_media(inputs, args.image or (), args.video or (), args.video_fps,
                       M3Config.from_json(Path(args.checkpoint) / "config.json"), encode, args.prompt)
    if inputs["input_ids"].numel() == 0:
        raise ValueError("--prompt encodes to no tokens")
    device = _device(args.device)
    target = _save_target(args.save_outputs)
    t0 = time.perf_counter()
    r = stream_forward(args.checkpoint, inputs, dtype=getattr(torch, args.dtype), device=device,
                       trace=args.trace, mtp_depths=args.mtp_depths, progress=True)
    seconds = time.perf_counter() - t0
    probs = r.output.logits[0, -1].float().softmax(-1)
    top = probs.topk(min(5, probs.numel()))
    print(f"top next tokens after position {inputs['input_ids'].shape[1] - 1}: "
          + ", ".join(f"{i} ({p:.3f})" for p, i in zip(top.values.tolist(), top.indices.tolist())))
    for k, lg in enumerate(r.output.mtp_logits, start=1):
        print(f"MTP depth {k}: token at +{k + 1}: {int(lg[0, -1].argmax())}")
    if r.output.loss is not None:
        print(f"loss {float(r.output.loss):.4f}")
    print(f"total {seconds:.1f} s, read {_size(r.bytes_read)} in {len(r.reads)} tensors, peak parameters "
          f"{_size(r.peak_param_bytes)} (largest piece {_size(r.largest_piece_bytes)})")
    if target is not None:
        # clones: safetensors refuses tensors that share memory (loss is lm_loss without MTP)
        tensors = {k: t.detach().cpu().clone().contiguous() for k, t in {**inputs, **r.tensors}.items()}
        _write_atomic(target, lambda p: save_file(tensors, p))
        print(f"saved {len(tensors)} tensors (inputs and golden names) to {target}")


def _save_target(name: str | None) -> Path | None:
    """--save-outputs as a path whose directory exists; checked before the run, not after it."""
    target = Path(name) if name else None
    if target is not None:
        if target.is_dir():
            raise ValueError(f"--save-outputs {target} is a directory; give a file name")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--save-outputs {target}: cannot create its directory: {e}") from e
    return target


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build sees no CUDA device")
    return device


GENERATE_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                   "video_grid_thw")


def generate_cli(args) -> None:
    """`generate`: greedy (or MTP speculative) decoding of the tiny preset with random weights on
    its demo prompt (text, two images, a video), or of --checkpoint, loaded whole or with its
    routed experts offloaded (--offload-experts); prints the new tokens of each row, the steps and
    the MTP acceptance, and with --save-outputs writes every main-model call's logits."""
    device, dtype = _device(args.device), getattr(torch, args.dtype)
    target = _save_target(args.save_outputs)
    cfg, encode = _generate_config(args)
    inputs = _generate_inputs(args, cfg, encode, device, dtype)
    drafts = (args.draft_tokens or cfg.num_mtp_modules) if args.mtp else 0     # verified with the newest token
    length = inputs["input_ids"].shape[1] + args.max_new_tokens + drafts + 1
    t0 = time.perf_counter()
    model = _generate_model(args, cfg, device, dtype, inputs["input_ids"].shape[0] * length)
    log = GenerateLog(model, inputs, args.max_new_tokens, target is not None, args.trace)
    t1 = time.perf_counter()
    try:
        tokens, stats = generate(model, max_new_tokens=args.max_new_tokens, mtp=args.mtp,
                                 draft_tokens=args.draft_tokens, eos_token_id=args.eos_token_id, **inputs)
    finally:
        log.close()
    S = inputs["input_ids"].shape[1]
    print(f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'tiny preset, random weights'}: loaded in "
          f"{t1 - t0:.1f} s; prompt {tuple(inputs['input_ids'].shape)}, {args.max_new_tokens} new tokens in "
          f"{time.perf_counter() - t1:.2f} s")
    for b, row in enumerate(tokens[:, S:].tolist()):
        print(f"row {b}: {' '.join(map(str, row))}")
    rate = "n/a (no drafts)" if stats["acceptance"] is None else f"{stats['acceptance']:.3f}"
    print(f"steps {stats['steps']} (forward calls after the prefill), drafted {stats['drafted']}, "
          f"accepted {stats['accepted']}, acceptance {rate}")
    if target is not None:
        log.save(target, tokens[:, S:])


def _generate_config(args) -> tuple[M3Config, object]:
    """The model config of `generate` (config.json or the tiny preset, --vllm-drafter applied) and
    the tokenizer for --prompt (None without one)."""
    if args.checkpoint:
        cfg = M3Config.from_json(Path(args.checkpoint) / "config.json")
        encode = load_tokenizer(args.checkpoint, required=args.prompt is not None)
    else:
        cfg, encode = M3Config.tiny(), None
        if args.prompt is not None:
            raise ValueError("--prompt needs --checkpoint (its tokenizer.json); the tiny preset takes --prompt-ids")
        if args.offload_experts:
            raise ValueError("--offload-experts needs --checkpoint: experts are offloaded to its safetensors")
    for flag, needs, given in (("--vllm-drafter", "--mtp", args.mtp), ("--trace", "--save-outputs", args.save_outputs),
                               ("--expert-cache-gib", "--offload-experts", args.offload_experts),
                               ("--host-cache-gib", "--offload-experts", args.offload_experts)):
        if getattr(args, flag[2:].replace("-", "_")) not in (None, False) and not given:
            raise ValueError(f"{flag} goes with {needs}")
    if args.vllm_drafter:              # vLLM's drafter conventions on the model's own MTP structure
        cfg = replace(cfg, mtp=replace(cfg.mtp, **VLLM_DRAFTER))
    return cfg, encode


def _generate_inputs(args, cfg: M3Config, encode, device, dtype) -> dict[str, torch.Tensor]:
    given = args.prompt_ids is not None or args.prompt_file is not None
    inputs = ({} if args.prompt is not None else read_prompt(args.prompt_ids, args.prompt_file) if given
              else {k: v for k, v in demo_inputs(cfg).items() if k != "labels"})
    inputs = add_media(inputs, args.image or (), args.video or (), args.video_fps, cfg, encode, args.prompt)
    ignored = sorted(set(inputs) - set(GENERATE_INPUTS))
    if ignored:
        print(f"not generate inputs, ignored: {', '.join(ignored)}")
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
            for k, v in inputs.items() if k in GENERATE_INPUTS}


def _generate_model(args, cfg: M3Config, device, dtype, cached_tokens: int) -> MiniMaxM3:
    if args.offload_experts:
        cache = 40.0 if args.expert_cache_gib is None else args.expert_cache_gib
        return load_offloaded(args.checkpoint, device, dtype, cache, args.host_cache_gib, mtp=cfg.mtp,
                              kv_tokens=cached_tokens, progress=True)
    if args.checkpoint:
        return from_pretrained(args.checkpoint, dtype, device, mtp=cfg.mtp)
    return init_random_(MiniMaxM3(cfg), seed=0).to(device, dtype).eval()


class GenerateLog:
    """What `generate` reports while it runs: a forward hook on the model sees every main-model
    call (the prefill, then each step; the MTP drafter's depths run outside it), prints a line per
    call (tokens so far, tokens/s, an offloaded model's experts by source, bytes read, cache hit
    rate, elapsed, ETA) and, when `keep` (--save-outputs), keeps each call's logits on the host as
    `step.{s}.logits` with its q_start (with --trace, the prefill's named intermediates too, as
    `step.0.*`); without it no logits leave the device."""

    def __init__(self, model: MiniMaxM3, inputs: dict, max_new_tokens: int, keep: bool, trace: bool):
        self.model, self.inputs, self.total, self.keep, self.calls = model, inputs, max_new_tokens, keep, 0
        self.prompt, self.tensors, self.t0 = inputs["input_ids"].shape[1], {}, time.perf_counter()
        self.experts = getattr(model, "expert_cache", None)
        if self.experts is not None:
            self.experts.prefilling = True
        media = [m for m, key in (("image", "pixel_values"), ("video", "pixel_values_videos")) if key in inputs]
        if trace:
            from golden.generate import Tracer              # the golden names of the intermediates
        self.tracer = Tracer(model, media, "step.0.") if trace else None
        self.handle = model.register_forward_hook(self.call, with_kwargs=True)

    def call(self, model, args, kwargs, out: M3Output) -> None:
        s, cache = self.calls, kwargs["cache"]
        self.calls += 1
        if self.keep:
            self.tensors[f"step.{s}.q_start"] = torch.tensor([cache.length - out.logits.shape[1]])
            self.tensors[f"step.{s}.logits"] = out.logits.detach().cpu()
        if self.tracer is not None:
            self.tensors.update({k: t.cpu() for k, t in self.tracer.out.items()})
            self.tracer.close()
            self.tracer = None
        if self.experts is not None:
            self.experts.prefilling = False
        done, elapsed = min(cache.length - self.prompt + 1, self.total), time.perf_counter() - self.t0
        rate = done / elapsed if elapsed else float("inf")
        print(f"call {s}: {done}/{self.total} tokens, {rate:.2f} tokens/s, elapsed {elapsed:.1f} s, ETA "
              f"{max(self.total - done, 0) / rate if rate else 0:.1f} s{self.experts.summary() if self.experts else ''}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        self.handle.remove()
        if self.tracer is not None:
            self.tracer.close()

    def save(self, target: Path, generated: torch.Tensor) -> None:
        """The prompt, `generated` and the recorded calls, in golden names (verify.py --reference)."""
        from safetensors.torch import save_file
        tensors = {**{k: v.detach().cpu() for k, v in self.inputs.items()}, **self.tensors,
                   "generated": generated.cpu()}
        _write_atomic(target, lambda p: save_file({k: t.contiguous() for k, t in tensors.items()}, p))
        print(f"saved {len(tensors)} tensors (the prompt, generated, each call's logits) to {target}")


def _prompt_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    prompt = p.add_mutually_exclusive_group(required=required)
    prompt.add_argument("--prompt-ids", help="token ids, e.g. 1,2,3")
    prompt.add_argument("--prompt-file", help="a .safetensors of forward inputs (media too), or a text file of ids")
    prompt.add_argument("--prompt", help="text, tokenised by the checkpoint's tokenizer.json (needs the tokenizers "
                                         "package; no chat template): write ]<]image[>[ / ]<]video[>[ per file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.kernels:
        _or_exit(set_kernels, args.kernels)
    if args.command in ("golden", "verify", "bench"):
        from golden import generate                 # the oracle's machinery, beside golden/verify.py
        sys.exit(generate.cli(args))
    elif args.command == "check":
        sys.exit(_or_exit(check_checkpoint, args.checkpoint, getattr(torch, args.dtype)))
    elif args.command in ("run", "generate"):
        _or_exit(run_checkpoint if args.command == "run" else generate_cli, args)
    else:
        _or_exit(demo, *((args.image or (), args.video or (), args.video_fps) if args.command == "demo" else ()))


def _parser() -> argparse.ArgumentParser:
    """The CLI: demo (default), bench, golden, verify, run, check, generate."""
    parser = argparse.ArgumentParser(description="MiniMax M3 reference")
    parser.add_argument("--kernels", choices=["torch", "triton"],
                        help="run the hot functions through kernels.py (needs a GPU or TRITON_INTERPRET=1); "
                             "default: $M3_KERNELS or torch")
    sub = parser.add_subparsers(dest="command")
    media = argparse.ArgumentParser(add_help=False)
    media.add_argument("--image", action="append", help="an image file (repeatable), for a placeholder each")
    media.add_argument("--video", action="append", help="a folder of frames, a .npy [F, H, W, 3], or a video "
                                                        "file (PyAV) sampled at 1 fps (repeatable)")
    media.add_argument("--video-fps", type=float, help="the source fps of --video frames given as a folder or "
                                                       ".npy (for the timestamps)")
    sub.add_parser("demo", parents=[media], help="forward of the tiny preset on text, two images and a video "
                                                 "(default), or on --image / --video files")
    b = sub.add_parser("bench", help="long-sequence sparse attention benchmark")
    b.add_argument("--one", nargs=3, metavar=("IMPL", "S", "CKPT"), help=argparse.SUPPRESS)
    b.add_argument("--offload", metavar="DIR", help="instead: offloaded decoding of a release-shaped slice (MXFP8, "
                                                    "written to DIR if absent) on the CPU: tokens/s, GiB read, hit rate")
    b.add_argument("--layers", type=int, default=1, help="with --offload: MoE layers in the slice")
    b.add_argument("--experts", type=int, default=128, help="with --offload: routed experts per layer")
    g = sub.add_parser("golden", help="regenerate every golden case from fixed seeds")
    g.add_argument("--out", default="golden", help="golden directory (replaced only when all cases succeed)")
    v = sub.add_parser("verify", help="re-run the reference on the golden cases and compare (another "
                                      "implementation's outputs: golden/verify.py)")
    v.add_argument("root", help="golden directory")
    v.add_argument("--case", action="append", help="verify only this case (repeat for several)")
    r = sub.add_parser("run", parents=[media], help="streamed forward of a checkpoint, one layer resident at a time "
                                                    "(the released model on one GPU)")
    r.add_argument("--checkpoint", required=True, help="directory with config.json and the safetensors")
    _prompt_arguments(r, required=True)
    r.add_argument("--mtp-depths", type=int, help="MTP depths to run (default: those the checkpoint ships)")
    r.add_argument("--save-outputs", help="write the inputs and outputs under the golden names (.safetensors)")
    r.add_argument("--trace", action="store_true", help="with --save-outputs: every golden intermediate too")
    c = sub.add_parser("check", help="read every tensor of a checkpoint once: names, shapes, formats and "
                                     "finiteness (exit 0 good, 1 a bad weight, 2 unusable input)")
    c.add_argument("--checkpoint", required=True, help="directory with config.json and the safetensors")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the dtype whose range the weights must fit, as from_pretrained would cast them")
    d = sub.add_parser("generate", parents=[media], help="greedy / MTP speculative decoding of the tiny preset "
                                                         "(random weights) or of a checkpoint, loaded whole or with "
                                                         "its routed experts offloaded")
    _generate_arguments(d)
    return parser


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="directory with config.json and the safetensors (default: the tiny preset "
                                        "on its demo prompt); loaded whole on --device unless --offload-experts")
    _prompt_arguments(p, required=False)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--mtp", action="store_true", help="MTP speculative decoding, with the model's MTP conventions "
                                                     "(M3's training ones unless config.json's mtp_config says otherwise)")
    p.add_argument("--vllm-drafter", action="store_true", help="with --mtp: draft as vLLM does (embedding zeroed at "
                                                              "position 0, pre-norm outputs passed on)")
    p.add_argument("--draft-tokens", type=int, help="drafts per step with --mtp (default: the MTP depths)")
    p.add_argument("--eos-token-id", type=int, help="stop a row at this token")
    p.add_argument("--offload-experts", action="store_true", help="with --checkpoint: every weight but the routed "
                   "experts on --device, the experts read on demand into an LRU cache (load_offloaded)")
    p.add_argument("--expert-cache-gib", type=float, help="with --offload-experts: the device's expert cache "
                                                          "(default 40)")
    p.add_argument("--host-cache-gib", type=float, help="with --offload-experts: a host-RAM cache of the experts' "
                                                        "stored bytes between disk and device")
    p.add_argument("--save-outputs", help="write the prompt, the generated tokens and every main-model call's "
                                          "logits (golden names, .safetensors)")
    p.add_argument("--trace", action="store_true", help="with --save-outputs: the prefill's named intermediates too")


def _or_exit(command, *args):
    """Run a CLI command: bad input (ValueError, TypeError) prints `error: ...` and exits with 2."""
    try:
        return command(*args)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # one module, not two: golden/generate.py imports this file by name, and its hooks test the
    # classes of the models this script builds
    sys.modules.setdefault("m3_reference", sys.modules[__name__])
    main()
