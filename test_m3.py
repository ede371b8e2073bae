"""Tests for m3_reference.py, in the file's order: config, components, model, checkpoint I/O,
then parity with transformers (an independent implementation; skipped where it is absent).

Tolerances come from the dtype: fp32 end-to-end through a few tiny layers accumulates rounding of
order 1e-6 (eps_fp32 = 1.2e-7 times O(10) operations deep), so 1e-4 on logits leaves two orders of
margin while any real math difference (a wrong sign, clamp or mask) is O(0.1) or more.
"""
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import m3_reference as m3

FP32_LOGITS_TOL = 1e-4        # see module docstring
FP32_OP_TOL = 1e-5            # a single fp32 op chain (attention, one layer)


def tiny(**overrides) -> m3.M3Config:
    return replace(m3.M3Config.tiny(), **overrides)


def model_of(cfg: m3.M3Config, seed: int = 0) -> m3.MiniMaxM3:
    return m3.init_random_(m3.MiniMaxM3(cfg), seed).eval()


def upstream_config(layers=(0, 1, 1), sparse=(0, 1, 1), heads=4, kv_heads=2, head_dim=16, rotary_dim=8,
                    topk=2, block=8, local=1, init=0, mtp=0, vision=True, max_frames=4) -> dict:
    """A tiny config written by hand in the upstream checkpoint form."""
    text = {
        "model_type": "minimax_m2", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": len(layers),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rotary_dim": rotary_dim, "partial_rotary_factor": rotary_dim / head_dim, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6, "hidden_act": "swigluoai", "use_gemma_norm": True,
        "intermediate_size": 32, "dense_intermediate_size": 96, "shared_intermediate_size": 32,
        "num_local_experts": 6, "num_experts_per_tok": 2, "routed_scaling_factor": 2.0,
        "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "moe_layer_freq": list(layers), "num_mtp_modules": mtp,
        "sparse_attention_config": {
            "use_sparse_attention": True, "sparse_index_dim": 16, "sparse_num_index_heads": kv_heads,
            "sparse_topk_blocks": topk, "sparse_block_size": block, "sparse_init_block": init,
            "sparse_local_block": local, "sparse_score_type": "max",
            "sparse_attention_freq": list(sparse), "sparse_disable_index_value": list(sparse)},
    }
    if not vision:
        return text
    return {"architectures": ["MiniMaxM3SparseForConditionalGeneration"], "text_config": text,
            "vision_config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "patch_size": 14, "hidden_act": "gelu",
                              "vision_segment_max_frames": max_frames, "rope_theta": 10000.0,
                              "img_token_compression_config": {"spatial_merge_size": 2, "temporal_patch_size": 2}},
            "image_token_index": 290, "video_token_index": 291, "projector_hidden_size": 64}


def gemma_norm(x, w, eps=1e-6):
    """The Gemma RMSNorm formula written out, in fp64 for an independent check."""
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1 + w.double())


# ============================================================================================
# Config
# ============================================================================================

def test_presets_validate_and_have_the_promised_structure():
    t = m3.M3Config.tiny()
    assert [t.is_moe(i) for i in range(3)] == [False, True, True]
    assert [t.is_sparse(i) for i in range(3)] == [False, True, True]
    assert t.sparse_topk_blocks < 64 // t.sparse_block_size      # a 64-token prompt drops blocks
    assert t.vision.num_hidden_layers == 2 and t.num_mtp_modules == 1
    r = m3.M3Config.minimax_m3()
    assert (r.hidden_size, r.num_hidden_layers, r.num_local_experts, r.vocab_size) == (6144, 60, 128, 200064)
    assert sum(r.moe_layer_freq) == 57 and r.sparse_attention_freq == r.moe_layer_freq


def test_upstream_and_transformers_forms_give_the_same_config():
    up = upstream_config()
    text = up["text_config"]
    hf = {"text_config": {**{k: v for k, v in text.items() if k not in ("sparse_attention_config", "moe_layer_freq",
                                                                         "rope_theta", "partial_rotary_factor")},
                          "layer_types": ["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"],
                          "mlp_layer_types": ["dense", "sparse", "sparse"], "index_n_heads": 2,
                          "index_head_dim": 16, "index_block_size": 8, "index_topk_blocks": 2,
                          "index_local_blocks": 1,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.5}},
          "vision_config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "spatial_merge_size": 2, "temporal_patch_size": 2,
                            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}},
          "image_token_id": 290, "video_token_id": 291, "projector_hidden_size": 64}
    assert m3.M3Config.from_dict(up) == m3.M3Config.from_dict(hf)


def test_to_dict_round_trips_both_model_kinds():
    for cfg in (m3.M3Config.tiny(), m3.M3Config.minimax_m3(), replace(m3.M3Config.tiny(), vision=None)):
        assert m3.M3Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_decisions_for_missing_lists():
    text = upstream_config(vision=False)
    del text["moe_layer_freq"]
    del text["sparse_attention_config"]["sparse_attention_freq"]
    del text["sparse_attention_config"]["sparse_disable_index_value"]
    del text["sparse_attention_config"]["sparse_local_block"]
    cfg = m3.M3Config.from_dict(text)
    assert cfg.moe_layer_freq == [1, 1, 1] and cfg.sparse_attention_freq == [0, 0, 0]
    assert cfg.sparse_local_block == 1 and cfg.vision is None
    text = upstream_config(vision=False)
    text["sparse_attention_config"]["use_sparse_attention"] = False
    assert m3.M3Config.from_dict(text).sparse_attention_freq == [0, 0, 0]


@pytest.mark.parametrize("edit, key, allowed", [
    (lambda t: t["sparse_attention_config"].update(sparse_score_type="lse"), "sparse_score_type", "'max'"),
    (lambda t: t.update(attention_output_gate=True), "attention_output_gate", "False"),
    (lambda t: t["sparse_attention_config"].update(sparse_disable_index_value=[0, 0, 1]),
     "sparse_disable_index_value", "allowed: 1"),
    (lambda t: t.update(moe_layer_freq=[0, 1]), "moe_layer_freq", "one per layer"),
    (lambda t: t["sparse_attention_config"].update(sparse_attention_freq=[0, 1, 1, 1],
                                                   sparse_disable_index_value=[0, 1, 1, 1]),
     "sparse_attention_freq", "one per layer"),
    (lambda t: t.update(num_attention_heads=5), "num_attention_heads", "not divisible"),
    (lambda t: t["sparse_attention_config"].update(sparse_num_index_heads=1), "sparse_num_index_heads",
     "must equal num_key_value_heads"),
    (lambda t: t.update(hidden_size="big"), "hidden_size", "an integer"),
    (lambda t: t.update(use_gemma_norm=False), "use_gemma_norm", "True"),
    (lambda t: t.update(rotary_dim=12), "rotary_dim", "partial_rotary_factor"),
])
def test_invalid_config_names_the_key_and_the_allowed_values(edit, key, allowed):
    d = upstream_config()
    edit(d["text_config"])
    with pytest.raises(ValueError) as e:
        m3.M3Config.from_dict(d)
    assert key in str(e.value) and allowed in str(e.value)


def test_unreadable_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read config"):
        m3.M3Config.from_json(tmp_path / "config.json")
    with pytest.raises(ValueError, match="cannot read config"):
        m3.from_pretrained(tmp_path / "nowhere")


# ============================================================================================
# Components
# ============================================================================================

def test_rms_norm_is_the_gemma_formula_in_fp32():
    x, w = torch.randn(3, 5, 32), torch.randn(32)
    torch.testing.assert_close(m3.rms_norm(x, w, 1e-6), gemma_norm(x, w).float(), rtol=FP32_OP_TOL, atol=FP32_OP_TOL)
    xb = x.bfloat16()
    assert m3.rms_norm(xb, w, 1e-6).dtype == torch.bfloat16
    assert torch.equal(m3.rms_norm(xb, w, 1e-6), gemma_norm(xb.float(), w).float().bfloat16())


def test_swiglu_oai_clamps_gate_above_and_up_both_sides():
    g = torch.tensor([-20.0, -1.0, 0.5, 9.0, 1e30])
    u = torch.tensor([-9.0, 0.0, 1.0, 9.0, -1e30])
    out = m3.swiglu_oai(g, u, 1.702, 7.0)
    gc, uc = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
    torch.testing.assert_close(out, gc * torch.sigmoid(1.702 * gc) * (uc + 1))
    assert torch.isfinite(out).all()


def test_router_bias_selects_but_never_weights():
    x, W = torch.randn(10, 16), torch.randn(8, 16)
    bias = torch.zeros(8)
    bias[3] = 100.0                    # expert 3 always chosen, but weighted by its unbiased score
    w, ids = m3.route(x, W, bias, 2, 2.0)
    assert (ids == 3).any(-1).all()
    p = torch.sigmoid(x @ W.T)
    torch.testing.assert_close(w, p.gather(-1, ids) / p.gather(-1, ids).sum(-1, keepdim=True) * 2.0)
    torch.testing.assert_close(w.sum(-1), torch.full((10,), 2.0))


def test_routed_experts_equal_a_loop_over_tokens():
    T, D, I, E, K = 9, 8, 6, 5, 2
    x = torch.randn(T, D)
    w1, w2, w3 = torch.randn(E, I, D), torch.randn(E, D, I), torch.randn(E, I, D)
    weights, ids = m3.route(x, torch.randn(E, D), torch.zeros(E), K, 2.0)
    out = m3.routed_experts(x, ids, weights, w1, w2, w3, 1.702, 7.0)
    for t in range(T):
        ref = sum(weights[t, k] * (w2[e] @ m3.swiglu_oai(w1[e] @ x[t], w3[e] @ x[t], 1.702, 7.0))
                  for k, e in enumerate(ids[t].tolist()))
        torch.testing.assert_close(out[t], ref, rtol=FP32_OP_TOL, atol=FP32_OP_TOL)


def test_router_weight_stays_fp32_when_the_model_is_cast():
    model = model_of(tiny())
    gate = model.language_model.model.layers[1].block_sparse_moe.gate.weight.clone()
    model = model.to(torch.bfloat16)
    moe = model.language_model.model.layers[1].block_sparse_moe
    assert moe.gate.weight.dtype == torch.float32 and moe.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(moe.gate.weight, gate)                       # not rounded through bf16
    assert moe.experts[0].w1.weight.dtype == torch.bfloat16


def test_partial_rope_rotates_pairs_i_and_i_plus_half():
    pos = torch.tensor([[0, 1, 5]])
    cos, sin = m3.rope_angles(pos, 8, 10000.0)
    x = torch.randn(1, 3, 2, 16)
    y = m3.rope(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])                    # pass-through channels
    for i in range(4):
        a = pos[0, :, None] * 10000.0 ** (-2 * i / 8)
        torch.testing.assert_close(y[0, :, :, i], x[0, :, :, i] * a.cos() - x[0, :, :, i + 4] * a.sin())
        torch.testing.assert_close(y[0, :, :, i + 4], x[0, :, :, i + 4] * a.cos() + x[0, :, :, i] * a.sin())


def test_indexer_selection_rules():
    """Forced init + local blocks inside the budget, ties to the lower id, ascending, -1 tail."""
    S, bs = 40, 4                                                  # 10 blocks, the last one full
    iq = torch.zeros(1, S, 1, 8)
    ik = torch.zeros(1, S, 8)                                      # every score ties at 0
    ids = m3.lightning_indexer(iq, ik, bs, topk=4, init_blocks=1, local_blocks=2)
    assert ids.dtype == torch.int32 and ids.shape == (1, 1, S, 4)
    assert ids[0, 0, 0].tolist() == [0, -1, -1, -1]               # block 0: one candidate
    assert ids[0, 0, 5].tolist() == [0, 1, -1, -1]                 # block 1: two candidates
    assert ids[0, 0, 39].tolist() == [0, 1, 8, 9]                  # init 0, local 8-9, tie -> 1
    ik[0, 20] = 1.0                                                # block 5 now scores 1 > 0
    iq[...] = 1.0
    assert m3.lightning_indexer(iq, ik, bs, 4, 1, 2)[0, 0, 39].tolist() == [0, 5, 8, 9]
    # more forced than fit: init outranks local
    assert m3.lightning_indexer(iq, ik, bs, 2, 2, 2)[0, 0, 39].tolist() == [0, 1]


def test_index_scores_are_causal_before_the_max_pool():
    iq = torch.ones(1, 6, 1, 2)
    ik = torch.tensor([[[1.0, 0], [2, 0], [3, 0], [9, 0], [5, 0], [6, 0]]])
    s = m3.index_block_scores(iq, ik, 0, 4)                      # blocks [0..3], [4..5]
    assert s[0, 0, :, 0].tolist() == [1, 2, 3, 9, 9, 9]           # key 3 (score 9) unseen before slot 3
    assert s[0, 0, :4, 1].tolist() == [float("-inf")] * 4 and s[0, 0, 4:, 1].tolist() == [5, 6]


def _qkv(B=2, S=37, H=4, Hkv=2, Dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, Dh, generator=g), torch.randn(B, S, Hkv, Dh, generator=g),
            torch.randn(B, S, Hkv, Dh, generator=g))


def test_sparse_attention_equals_dense_causal_when_topk_covers_every_block():
    q, k, v = _qkv()
    ids = m3.lightning_indexer(torch.randn(2, 37, 2, 8), torch.randn(2, 37, 8), 4, topk=10, init_blocks=0,
                               local_blocks=1)
    assert (ids >= 0).sum(-1).max() == 10
    torch.testing.assert_close(m3.sparse_attention(q, k, v, ids, 4, 8 ** -0.5),
                               m3.causal_attention(q, k, v, 8 ** -0.5), rtol=FP32_OP_TOL, atol=FP32_OP_TOL)


def test_sparse_attention_equals_a_dense_masked_brute_force():
    q, k, v = _qkv()
    B, S, H, Dh = q.shape
    ids = m3.lightning_indexer(torch.randn(B, S, 2, 8), torch.randn(B, S, 8), 4, topk=3, init_blocks=1,
                               local_blocks=1)
    assert ((ids >= 0).sum(-1) < (torch.arange(S) // 4 + 1)).any()     # some blocks really dropped
    allowed = torch.zeros(B, 2, S, S, dtype=torch.bool)
    for b, h, i in torch.cartesian_prod(torch.arange(B), torch.arange(2), torch.arange(S)).tolist():
        for n in ids[b, h, i].tolist():
            if n >= 0:
                allowed[b, h, i, n * 4:min(n * 4 + 4, i + 1)] = True
    mask = allowed.repeat_interleave(2, dim=1)                          # query head j -> KV head j // 2
    kt, vt = k.transpose(1, 2).repeat_interleave(2, 1), v.transpose(1, 2).repeat_interleave(2, 1)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, attn_mask=mask, scale=8 ** -0.5)
    torch.testing.assert_close(m3.sparse_attention(q, k, v, ids, 4, 8 ** -0.5), ref.transpose(1, 2),
                               rtol=FP32_OP_TOL, atol=FP32_OP_TOL)


def test_chunked_long_sequence_path_equals_unchunked():
    q, k, v = _qkv(S=301)
    iq, ik = torch.randn(2, 301, 2, 8), torch.randn(2, 301, 8)
    whole = m3.lightning_indexer(iq, ik, 8, 4, 1, 1, query_chunk=301)
    out = m3.sparse_attention(q, k, v, whole, 8, 0.3, query_chunk=301)
    for chunk in (1, 7, 64):
        assert torch.equal(m3.lightning_indexer(iq, ik, 8, 4, 1, 1, query_chunk=chunk), whole)
        torch.testing.assert_close(m3.sparse_attention(q, k, v, whole, 8, 0.3, query_chunk=chunk), out,
                                   rtol=FP32_OP_TOL, atol=FP32_OP_TOL)


def test_video_longer_than_a_segment_equals_its_segments_run_separately():
    cfg = tiny()
    model = model_of(cfg)
    tower = model.vision_tower
    grid = [[5, 4, 4]]                                            # max_frames 2 -> segments 2, 2, 1
    pixels = torch.randn(80, cfg.vision.patch_dim)
    whole = tower(pixels, grid)
    parts = [tower(p, [[t, 4, 4]]) for p, t in zip(pixels.split([32, 32, 16]), (2, 2, 1))]
    torch.testing.assert_close(whole, torch.cat(parts), rtol=FP32_OP_TOL, atol=FP32_OP_TOL)


def test_vision_positions_follow_the_merge_window_order():
    pos = m3.vision_positions([(2, 2, 4)], 2)
    rows, cols = [0, 0, 1, 1, 0, 0, 1, 1], [0, 1, 0, 1, 2, 3, 2, 3]
    assert pos.tolist() == [[t, r, c] for t in range(2) for r, c in zip(rows, cols)]


# ============================================================================================
# Model and losses
# ============================================================================================

def test_demo_inputs_run_and_output_shapes():
    cfg = tiny()
    inputs = m3.demo_inputs(cfg)
    out = model_of(cfg)(**inputs)
    B, S = inputs["input_ids"].shape
    assert out.logits.shape == (B, S, cfg.vocab_size) and len(out.mtp_logits) == 1
    assert out.mtp_logits[0].shape == out.logits.shape
    torch.testing.assert_close(out.loss, out.lm_loss + out.mtp_loss)


def test_losses_equal_hand_computed_cross_entropies():
    cfg = tiny(num_mtp_modules=2)
    model = model_of(cfg)
    ids = torch.randint(0, 400, (2, 11))
    labels = ids.clone()
    labels[0, 3] = labels[1, 9] = -100
    out = model(ids, labels=labels)

    def ce(logits, shift):
        terms = [-torch.log_softmax(logits[b, i].double(), -1)[labels[b, i + shift]]
                 for b in range(2) for i in range(11) if i + shift < 11 and labels[b, i + shift] != -100]
        return sum(terms) / len(terms)
    torch.testing.assert_close(out.lm_loss.double(), ce(out.logits, 1), rtol=1e-5, atol=1e-5)
    mtp = 0.1 / 2 * (ce(out.mtp_logits[0], 2) + ce(out.mtp_logits[1], 3))
    torch.testing.assert_close(out.mtp_loss.double(), mtp, rtol=1e-5, atol=1e-5)


def test_mtp_depth_is_the_documented_composition():
    cfg = tiny()
    model = model_of(cfg)
    text = model.language_model.model
    ids = torch.randint(0, 400, (2, 13))
    out = model(ids)
    depth = text.mtp["layers"][0]
    cos, sin = text.rope(torch.arange(13).expand(2, 13))
    h0 = text(text.embed_tokens(ids), cos, sin)
    shifted = torch.cat([ids[:, 1:], torch.zeros(2, 1, dtype=ids.dtype)], 1)
    x = torch.cat([gemma_norm(text.embed_tokens(shifted), depth.enorm.weight),
                   gemma_norm(h0, depth.hnorm.weight)], -1).float() @ depth.eh_proj.weight.T
    h1 = gemma_norm(depth.transformer_layer(x, cos, sin), depth.final_layernorm.weight).float()
    torch.testing.assert_close(out.mtp_logits[0], model.language_model.lm_head(h1),
                               rtol=FP32_LOGITS_TOL, atol=FP32_LOGITS_TOL)


@pytest.mark.parametrize("make, match", [
    (lambda i: dict(input_ids=torch.tensor([[1, -3]])), "token id -3 outside"),
    (lambda i: dict(input_ids=torch.tensor([[1, 512]])), "token id 512 outside"),
    (lambda i: dict(input_ids=i["input_ids"], labels=i["input_ids"][:, :-1]), "labels shape"),
    (lambda i: dict(input_ids=i["input_ids"].float()), "input_ids must be an int64"),
    (lambda i: {**i, "pixel_values": i["pixel_values"][:-1]}, r"image_grid_thw \[\[1, 4, 4\], \[1, 6, 8\]\] needs sum\(t\*h\*w\) = 64"),
    (lambda i: {**i, "image_grid_thw": torch.tensor([[1, 4, 4], [1, 5, 8]])}, r"\[\[1, 5, 8\]\].*multiples"),
    (lambda i: {**i, "image_grid_thw": None}, "pixel_values given without image_grid_thw"),
    (lambda i: {**i, "pixel_values": None}, "image_grid_thw given without pixel_values"),
    (lambda i: {**i, "pixel_values_videos": None, "video_grid_thw": None}, "hold 12 video placeholder.* produced 0"),
    (lambda i: {**i, "input_ids": i["input_ids"][:, 1:].clone().index_fill_(1, torch.tensor([0]), 500),
                "labels": None}, "hold 17 image placeholder.*produced 16"),
])
def test_bad_inputs_raise_clear_errors(make, match):
    cfg = tiny()
    with pytest.raises((ValueError, TypeError), match=match):
        model_of(cfg)(**make(m3.demo_inputs(cfg)))


def test_pixels_for_a_text_only_model_are_rejected():
    cfg = tiny(vision=None)
    i = m3.demo_inputs(tiny())
    with pytest.raises(ValueError, match="text-only model"):
        model_of(cfg)(i["input_ids"], pixel_values=i["pixel_values"], image_grid_thw=i["image_grid_thw"])


# ============================================================================================
# Checkpoint I/O
# ============================================================================================

def _assert_same_weights(a: m3.MiniMaxM3, b: m3.MiniMaxM3):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("shard", [None, "40KB"])
@pytest.mark.parametrize("vision", [True, False])
def test_save_load_round_trip_is_bit_identical(tmp_path, shard, vision):
    cfg = tiny() if vision else tiny(vision=None)
    model = model_of(cfg)
    m3.save_pretrained(model, tmp_path, max_shard_size=shard)
    sharded = (tmp_path / m3.INDEX_FILE).exists()
    assert sharded == (shard is not None) and (tmp_path / m3.SINGLE_FILE).exists() == (shard is None)
    loaded = m3.from_pretrained(tmp_path)
    assert loaded.config == cfg
    _assert_same_weights(model, loaded)
    keys = set(json.loads((tmp_path / m3.INDEX_FILE).read_text())["weight_map"]) if sharded else None
    if keys is not None:
        assert any(k.startswith("language_model.") for k in keys) == vision
    # a second save in the other layout leaves no stale files behind
    m3.save_pretrained(model, tmp_path, max_shard_size=None if shard else "40KB")
    _assert_same_weights(model, m3.from_pretrained(tmp_path))


def test_bf16_load_keeps_the_router_in_fp32(tmp_path):
    model = model_of(tiny())
    m3.save_pretrained(model, tmp_path)
    loaded = m3.from_pretrained(tmp_path, dtype=torch.bfloat16)
    moe = loaded.language_model.model.layers[2].block_sparse_moe
    assert moe.gate.weight.dtype == torch.float32
    assert torch.equal(moe.gate.weight, model.language_model.model.layers[2].block_sparse_moe.gate.weight)
    assert loaded.language_model.lm_head.weight.dtype == torch.bfloat16
    out = loaded(**m3.demo_inputs(tiny()))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


def test_bad_checkpoint_lists_every_problem_at_once(tmp_path):
    from safetensors.torch import load_file, save_file
    m3.save_pretrained(model_of(tiny()), tmp_path)
    state = load_file(tmp_path / m3.SINGLE_FILE)
    del state["language_model.model.norm.weight"]
    state["language_model.model.layers.0.mlp.gate_proj.weight"] = torch.zeros(3, 3)
    state["language_model.model.extra.weight"] = torch.zeros(2)
    state["language_model.model.layers.1.self_attn.q_proj.weight"] = \
        state["language_model.model.layers.1.self_attn.q_proj.weight"].to(torch.float8_e4m3fn)
    state["vision_tower.vision_model.post_layernorm.weight"] = torch.zeros(32)    # ignored, as upstream
    save_file(state, tmp_path / m3.SINGLE_FILE)
    with pytest.raises(ValueError) as e:
        m3.from_pretrained(tmp_path)
    msg = str(e.value)
    for part in ("missing: language_model.model.norm.weight",
                 "mis-shaped: language_model.model.layers.0.mlp.gate_proj.weight is [3, 3]",
                 "unexpected: language_model.model.extra.weight",
                 "fp8: language_model.model.layers.1.self_attn.q_proj.weight", "4 problems"):
        assert part in msg


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = model_of(tiny())
    m3.save_pretrained(model, tmp_path)
    before = (tmp_path / m3.SINGLE_FILE).read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        m3.save_pretrained(model_of(tiny(), seed=1), tmp_path)
    assert (tmp_path / m3.SINGLE_FILE).read_bytes() == before
    assert not list(tmp_path.glob(".*tmp"))


# ============================================================================================
# Parity with transformers (MiniMaxM3SparseForConditionalGeneration, eager)
# ============================================================================================

PARITY_CASES = [
    dict(),                                                                    # dense+full, 2x MoE+sparse
    dict(layers=(1, 0, 1, 1), sparse=(1, 0, 0, 1), heads=8, kv_heads=2, rotary_dim=6, topk=3, block=4),
    dict(layers=(0, 1), sparse=(1, 1), heads=4, kv_heads=4, head_dim=8, rotary_dim=8, topk=1, block=16, local=1),
]


def _transformers_checkpoint(tmp_path: Path, seed: int, **kw):
    """A random transformers model saved by its own save_pretrained, config.json replaced by the
    upstream form. Returns (transformers model, checkpoint path)."""
    transformers = pytest.importorskip("transformers")
    up = upstream_config(**kw)
    # transformers keys its save-time key conversion on model_type: the released text part's
    # "minimax_m2" would pick another model's renames, so its own config drops that string
    text = {k: v for k, v in up["text_config"].items() if k != "model_type"}
    hf_cfg = transformers.MiniMaxM3VLConfig(text_config=text, vision_config=up["vision_config"],
                                            image_token_index=290, video_token_index=291, projector_hidden_size=64)
    hf_cfg.text_config._attn_implementation = hf_cfg.vision_config._attn_implementation = "eager"
    hf = transformers.MiniMaxM3SparseForConditionalGeneration(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(hf.named_parameters()) + list(hf.named_buffers()):
            if "inv_freq" not in name:
                std = 1.0 if "embed" in name else (t[0].numel() ** -0.5 if t.dim() >= 2 else 0.1)
                t.copy_(torch.randn(t.shape, generator=g) * std)
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(up))
    return hf, tmp_path


def _vl_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    img, vid = torch.tensor([[1, 4, 4], [1, 2, 6]]), torch.tensor([[3, 4, 2]])    # video within one segment
    text = lambda n: torch.randint(0, 280, (n,), generator=g)
    ids = torch.cat([text(5), torch.full((4,), 290), text(3), torch.full((3,), 290), text(4),
                     torch.full((6,), 291), text(25)])[None]
    return dict(input_ids=ids, pixel_values=torch.randn(28, 1176, generator=g), image_grid_thw=img,
                pixel_values_videos=torch.randn(24, 1176, generator=g), video_grid_thw=vid)


@pytest.mark.parametrize("case", range(len(PARITY_CASES)))
def test_parity_with_transformers(tmp_path, case):
    hf, path = _transformers_checkpoint(tmp_path, seed=case, **PARITY_CASES[case])
    ours = m3.from_pretrained(path)
    inputs = _vl_inputs(case)
    text_rows = torch.randint(0, 280, (2, 47), generator=torch.Generator().manual_seed(case))
    with torch.no_grad():
        diff_vl = (ours(**inputs).logits - hf(**inputs).logits).abs().max()
        diff_text = (ours(text_rows).logits - hf(input_ids=text_rows).logits).abs().max()
    assert diff_vl <= FP32_LOGITS_TOL and diff_text <= FP32_LOGITS_TOL, (diff_vl, diff_text)


def test_parity_text_only_checkpoint_built_from_the_vl_one(tmp_path):
    from safetensors.torch import load_file, save_file
    hf, path = _transformers_checkpoint(tmp_path / "vl", seed=7)
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    state = load_file(path / m3.SINGLE_FILE)
    save_file({k.removeprefix("language_model."): t for k, t in state.items() if k.startswith("language_model.")},
              text_dir / m3.SINGLE_FILE)
    (text_dir / "config.json").write_text(json.dumps(upstream_config(vision=False)))
    ours = m3.from_pretrained(text_dir)
    assert ours.config.vision is None and not hasattr(ours, "vision_tower")
    ids = torch.randint(0, 280, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        diff = (ours(ids).logits - hf(input_ids=ids).logits).abs().max()
    assert diff <= FP32_LOGITS_TOL, diff


def test_mtp_parity_with_a_transformers_decoder_layer(tmp_path):
    """Our MTP depth against an independent composition: transformers' own decoder layer (loaded
    with the MTP transformer_layer's weights), the fusion written out here, the shared head."""
    from safetensors.torch import load_file, save_file
    transformers = pytest.importorskip("transformers")
    hf, path = _transformers_checkpoint(tmp_path, seed=3)
    state = load_file(path / m3.SINGLE_FILE)
    mtp = {"enorm.weight": torch.randn(64) * 0.1, "hnorm.weight": torch.randn(64) * 0.1,
           "final_layernorm.weight": torch.randn(64) * 0.1, "eh_proj.weight": torch.randn(64, 128) / 128 ** 0.5}
    last = "language_model.model.layers.2."
    for k, t in state.items():
        if k.startswith(last):
            mtp["transformer_layer." + k.removeprefix(last)] = t + 0.01 * torch.randn(t.shape)
    state.update({"language_model.model.mtp.layers.0." + k: t for k, t in mtp.items()})
    save_file(state, path / m3.SINGLE_FILE)
    cfg = upstream_config(mtp=1)
    (path / "config.json").write_text(json.dumps(cfg))
    ours = m3.from_pretrained(path)
    # transformers' decoder layer carrying the MTP transformer_layer weights
    layer_dir = tmp_path / "layer"
    layer_dir.mkdir()
    save_file({**{k: t for k, t in state.items() if ".mtp." not in k},
               **{last + k.removeprefix("transformer_layer."): t for k, t in mtp.items()
                  if k.startswith("transformer_layer.")}}, layer_dir / m3.SINGLE_FILE)
    (layer_dir / "config.json").write_text(json.dumps(upstream_config()))
    hf_layer = transformers.MiniMaxM3SparseForConditionalGeneration.from_pretrained(
        layer_dir, attn_implementation="eager").model.language_model.layers[2].eval()
    ids = torch.randint(0, 280, (2, 30), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(30).expand(2, 30)
    with torch.no_grad():
        lm = hf.model.language_model
        h0 = lm(input_ids=ids).last_hidden_state
        shifted = torch.cat([ids[:, 1:], torch.zeros(2, 1, dtype=ids.dtype)], 1)
        x = (torch.cat([gemma_norm(lm.embed_tokens(shifted), mtp["enorm.weight"]),
                        gemma_norm(h0, mtp["hnorm.weight"])], -1) @ mtp["eh_proj.weight"].double().T).float()
        x = hf_layer(x, position_embeddings=lm.rotary_emb(x, pos), attention_mask=None, position_ids=pos)
        expected = hf.lm_head(gemma_norm(x, mtp["final_layernorm.weight"]).float())
        got = ours(ids).mtp_logits[0]
    assert (got - expected).abs().max() <= FP32_LOGITS_TOL
