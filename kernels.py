"""Triton twins of the hot functions of m3_reference.py: one kernel and its launch wrapper per torch
function, under the same name and with the same signature and math. m3_reference.set_kernels
("triton") (or M3_KERNELS=triton, or --kernels triton) routes the model through them; the torch
functions stay the specification, and test_m3.py compares every pair.

    rms_norm            Gemma RMSNorm, optionally fused with the residual add before it
    swiglu_oai          the clamped SwiGLU-OAI activation
    norm_rope, rope     per-head q/k Gemma norm + partial NeoX RoPE; RoPE alone (vision 3D RoPE)
    route               sigmoid router on tensor cores (fp32 weights as three exact bf16 pieces),
                        bias-corrected top-k (ties to the lower id), weights
    routed_experts      grouped MoE: rows aligned to experts on the device (no host sync there), gate/up +
                        SwiGLU-OAI and down as grouped GEMMs over a table of per-expert weight
                        pointers, a deterministic fp32 combination
    index_block_scores  lightning-indexer scores, causal mask and block max-pool fused (no [S, S])
    select_blocks       forced-block top-k selection: ascending ids, -1 padding, ties to the lower id
    sparse_attention    block-sparse attention over the selected blocks only, the 16 heads of a KV
                        group as the rows of every tl.dot. Prefill inverts the selection (per key
                        block, the queries that chose it, 4 to a tile: the block loads once for
                        64 rows), then merges each query's slots by their max and sum; decode walks
                        each query's own blocks, its slots split over programs (flash-decoding)

Kernels run on a CUDA device, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set
before this module is imported): the interpreter runs one program at a time in numpy, for tests at
small shapes only. It cannot do bf16 arithmetic or bf16 tl.dot, so tiles are upcast to fp32 after
loading; on a GPU the tl.dot operands stay in the model dtype (bf16 products are exact in fp32)
and every dot accumulates in fp32, with fp32 operands in full precision (no TF32). Launch
configurations are autotuned on a GPU (_tuned); the interpreter runs the first of each list.

    python kernels.py bench        # torch vs Triton at the released per-layer shapes (on a GPU)
"""
from __future__ import annotations

import functools
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ROUND_BY_HAND = tl.constexpr(INTERPRET)     # the interpreter truncates fp32 -> bf16; a GPU rounds to even
# sparse attention's p.v for 16-bit values: fp32-faithful (two dots, as the twin) under the
# interpreter and in the exact tests; one bf16 dot on a GPU (see _pv for the error it allows)
EXACT_PV = INTERPRET
# sparse attention's prefill: the selection inverted, QUERIES_PER_TILE (query, slot) pairs per key
# block tile (True), or each query walking its own blocks (False); decode always walks by query
BY_BLOCK, QUERIES_PER_TILE = True, 4


def _p2(n: int, least: int = 1) -> int:
    return max(triton.next_power_of_2(max(int(n), 1)), least)


def _common(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors in one dtype: theirs when they agree (no copy), else fp32 (the twins upcast)."""
    dtype = tensors[0].dtype if all(t.dtype == tensors[0].dtype for t in tensors) else torch.float32
    return [t.to(dtype) for t in tensors]


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as rows of `width` [n, width]: a view with t's strides wherever one exists (the kernels
    take strides), a copy only where the layout cannot be viewed so."""
    return t.reshape(-1, width)


def _rows_per_program(width: int) -> int:
    """Rows a row-wise kernel takes at once: about 4k elements per program."""
    return max(1, 4096 // _p2(width))


def _tuned(key: list[str], configs: list) -> callable:
    """triton.autotune over configs on a GPU (each timed once per new value of the key arguments,
    the fastest kept); under the interpreter the first config alone, since timing numpy says
    nothing about a GPU (it is chosen small, for the interpreter's speed)."""
    return triton.autotune(configs=configs[:1] if INTERPRET else configs, key=key)


def _capturing() -> bool:
    """Whether a CUDA graph is being captured: no read-back then, so the id checks that need one
    are skipped (the kernels stay within their tables: a bad id adds nothing)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _twin():
    """m3_reference, whose input checks the kernels share (the running module when it runs as a
    script: its __main__ registers itself under that name)."""
    import m3_reference
    return m3_reference


def _on_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRET:
            raise ValueError(f"kernels.py runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                             f"got a tensor on {t.device}")


# ---- interpreter shims: the same rounding under TRITON_INTERPRET=1 (numpy, no bf16 arithmetic,
# truncating casts) as on a GPU; every kernel below rounds and multiplies through these -------

@triton.jit
def _to(x, dtype: tl.constexpr):
    """fp32 x in `dtype`, rounded to nearest even as torch rounds: by the GPU's cast, and under the
    interpreter, which truncates fp32 -> bf16, on the bits first (the same value)."""
    if _ROUND_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = tl.where(x == x, rounded, x)                  # NaN stays NaN (its bits could carry into the sign)
    return x.to(dtype)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b in fp32: operands upcast under the interpreter, native on a GPU; never TF32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _pv(p, v, acc, EXACT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + p @ v, p fp32 in [0, 1]. For fp32 v one fp32 dot. For 16-bit v: EXACT keeps p fp32 as
    the torch twin does, split into a rounded head and the rounded rest (p = hi + lo to ~2^-16),
    two tensor-core dots; else p rounds once to v's dtype, one dot: each p moves by up to 2^-8 of
    itself (bf16; 2^-11 fp16), so the output by up to 2^-8 max|v| before its own rounding (a
    FlashAttention kernel's choice)."""
    if v.dtype == tl.float32:
        return _dot(p, v, acc, UPCAST)
    hi = _to(p, v.dtype)
    if not EXACT:
        return _dot(hi, v, acc, UPCAST)
    lo = _to(p - hi.to(tl.float32), v.dtype)
    return _dot(lo, v, _dot(hi, v, acc, UPCAST), UPCAST)


# ---- Gemma RMSNorm (+ the residual add) -----------------------------------------------------

@triton.jit
def _rms_chunk(X, R, H, row, offs, D, sx, sxd, sr, srd, mask, RESIDUAL: tl.constexpr, STORE: tl.constexpr):
    """A chunk of rows in fp32: x, or x + residual rounded to the model dtype as torch's add
    (stored to H, row-major [rows, D], on the first pass)."""
    x = tl.load(X + row * sx + offs[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        x = _to(x + tl.load(R + row * sr + offs[None, :] * srd, mask=mask, other=0.0).to(tl.float32),
                H.dtype.element_ty)
        if STORE:
            tl.store(H + row * D + offs[None, :], x, mask=mask)
        x = x.to(tl.float32)
    return x


@_tuned(key=["D", "BLOCK", "RESIDUAL"], configs=[triton.Config({}, num_warps=w) for w in (4, 1, 2, 8, 16)])
@triton.jit
def _rms_norm_kernel(X, R, W, Y, H, rows, D, sx, sxd, sr, srd, sw, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                     RESIDUAL: tl.constexpr):
    """ROWS rows of D per program, in chunks of BLOCK: the sum of squares over every chunk first,
    then each chunk normalised from a second read (from cache, ~no HBM traffic). x and the
    residual are read through their (row, column) strides."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row, offs = r[:, None].to(tl.int64), tl.arange(0, BLOCK)
    squares = tl.zeros([ROWS], dtype=tl.float32)
    for d0 in range(0, D, BLOCK):
        mask = (r[:, None] < rows) & (d0 + offs[None, :] < D)
        x = _rms_chunk(X, R, H, row, d0 + offs, D, sx, sxd, sr, srd, mask, RESIDUAL, True)
        squares += tl.sum(x * x, axis=1)
    inv = tl.rsqrt(squares / D + eps)[:, None]
    for d0 in range(0, D, BLOCK):
        mask = (r[:, None] < rows) & (d0 + offs[None, :] < D)
        x = _rms_chunk(X, R, H, row, d0 + offs, D, sx, sxd, sr, srd, mask, RESIDUAL, False)
        w = tl.load(W + (d0 + offs) * sw, mask=d0 + offs < D, other=0.0).to(tl.float32)
        tl.store(Y + row * D + d0 + offs[None, :], _to(x * inv * (1.0 + w[None, :]), Y.dtype.element_ty), mask=mask)


def _chunk(D: int) -> int:
    """rms_norm's chunk: the largest power of two up to 2048 that divides D when one of at least
    256 does (D = 6144: 3 x 2048, no masked lane; the whole row in one 8192 block masks 25 %),
    else D rounded up to a power of two, capped at 2048."""
    return next((c for c in (2048, 1024, 512, 256) if D % c == 0), min(_p2(D), 2048))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """m3_reference.rms_norm. x, residual [..., D] (same shape and dtype)."""
    _on_device(x, weight)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    D = x.shape[-1]
    x2 = _rows(x, D)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else y
    r = _rows(residual, D) if residual is not None else x2
    block = _chunk(D)
    rows = _rows_per_program(block)
    _rms_norm_kernel[(triton.cdiv(x2.shape[0], rows),)](x2, r, weight, y, h, x2.shape[0], D, *x2.stride(), *r.stride(),
                                                        weight.stride(0), eps, ROWS=rows, BLOCK=block,
                                                        RESIDUAL=residual is not None)
    return y.view(x.shape) if residual is None else (y.view(x.shape), h.view(x.shape))


# ---- SwiGLU-OAI -------------------------------------------------------------------------------

@triton.jit
def _swiglu(g, u, alpha, limit):
    """g * sigmoid(alpha g) * (u + 1) with g = min(g, limit), u = clamp(u, -limit, limit), in fp32;
    the clamps keep NaN, as torch's do (a GPU's plain min/max would drop it)."""
    g = tl.minimum(g, limit, propagate_nan=tl.PropagateNan.ALL)
    u = tl.minimum(tl.maximum(u, -limit, propagate_nan=tl.PropagateNan.ALL), limit, propagate_nan=tl.PropagateNan.ALL)
    return g * tl.sigmoid(alpha * g) * (u + 1.0)


@_tuned(key=["C"], configs=[triton.Config({"BLOCK": b}, num_warps=w) for b, w in
                           ((1024, 4), (1024, 8), (2048, 8), (4096, 8), (4096, 16))])
@triton.jit
def _swiglu_kernel(G, U, O, N, C, sg, sgc, su, suc, alpha, limit, BLOCK: tl.constexpr):
    """BLOCK elements of the [N / C, C] rows per program, gate and up read through their strides."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row, col = offs // C, offs % C
    g = tl.load(G + row * sg + col * sgc, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * su + col * suc, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + offs, _to(_swiglu(g, u, alpha, limit), O.dtype.element_ty), mask=mask)


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """m3_reference.swiglu_oai, elementwise over blocks of the tuned size."""
    _on_device(gate, up)
    C = gate.shape[-1]
    g, u = (_rows(t, C) for t in _common(gate, up))
    out = torch.empty(gate.shape, dtype=g.dtype, device=g.device)
    _swiglu_kernel[lambda meta: (triton.cdiv(g.numel(), meta["BLOCK"]),)](g, u, out, g.numel(), C, *g.stride(),
                                                                          *u.stride(), alpha, limit)
    return out.to(gate.dtype)


# ---- per-head Gemma norm + partial NeoX RoPE; RoPE alone --------------------------------------

@_tuned(key=["Dh", "half", "NORM"], configs=[triton.Config({}, num_warps=w) for w in (4, 1, 2, 8)])
@triton.jit
def _rope_kernel(X, W, COS, SIN, Y, rows, heads, Dh, half, st, sh, sd, sc, scd, ss, ssd, sw, eps, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr, NORM: tl.constexpr):
    """ROWS (token, head) rows per program, x read through its (token, head, channel) strides, the
    angle tables through theirs. Channel i < half pairs with i + half, both rotate by angle i;
    channels past 2*half pass through. The partner is loaded from memory (no register shuffle)."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    token = (r // heads).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = (r[:, None] < rows) & (offs[None, :] < Dh)
    first, rotated = offs < half, offs < 2 * half
    partner = tl.where(first, offs + half, tl.where(rotated, offs - half, offs))
    base = token[:, None] * st + (r % heads)[:, None].to(tl.int64) * sh
    x = tl.load(X + base + offs[None, :] * sd, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(X + base + partner[None, :] * sd, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        inv = tl.rsqrt(tl.sum(x * x, axis=1) / Dh + eps)[:, None]
        x = x * inv * (1.0 + tl.load(W + offs * sw, mask=offs < Dh, other=0.0).to(tl.float32))[None, :]
        xp = xp * inv * (1.0 + tl.load(W + partner * sw, mask=offs < Dh, other=0.0).to(tl.float32))[None, :]
    angle = tl.where(first, offs, offs - half)[None, :]
    c = tl.load(COS + token[:, None] * sc + angle * scd, mask=mask & rotated[None, :], other=1.0)
    s = tl.load(SIN + token[:, None] * ss + angle * ssd, mask=mask & rotated[None, :], other=0.0)
    y = tl.where(rotated[None, :], x * c + tl.where(first[None, :], -xp, xp) * s, x)      # x1 c - x2 s | x2 c + x1 s
    tl.store(Y + r[:, None].to(tl.int64) * Dh + offs[None, :], _to(y, Y.dtype.element_ty), mask=mask)


def _rope_launch(x, weight, cos, sin, eps, norm: bool):
    _on_device(x, cos, sin)
    H, Dh, half = x.shape[-2], x.shape[-1], cos.shape[-1]
    # one angle row per token: a view, copied only where cos/sin broadcast over a leading dim
    cs = [_rows(t.float().expand(*x.shape[:-2], half), half) for t in (cos, sin)]
    x3 = x.reshape(-1, H, Dh)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows, per = x3.shape[0] * H, _rows_per_program(Dh)
    _rope_kernel[(triton.cdiv(rows, per),)](x3, weight if norm else x3, cs[0], cs[1], y, rows, H, Dh, half,
                                            *x3.stride(), *cs[0].stride(), *cs[1].stride(),
                                            weight.stride(0) if norm else 0, eps, ROWS=per, BLOCK=_p2(Dh), NORM=norm)
    return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """m3_reference.rope. x [..., H, Dh], cos/sin [..., R/2] (text partial RoPE or the vision 3D angles)."""
    return _rope_launch(x, None, cos, sin, 0.0, norm=False)


def norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              eps: float) -> torch.Tensor:
    """m3_reference.norm_rope. x [B, S, H, Dh], weight [Dh], cos/sin [B, S, R/2]."""
    _on_device(weight)
    return _rope_launch(x, weight, cos, sin, eps, norm=True)


# ---- router -----------------------------------------------------------------------------------

@triton.jit
def _route_dot(x, w, acc, UPCAST: tl.constexpr):
    """acc + x @ w for fp32 w, on tensor cores when x is bf16: w = hi + mid + lo exactly for
    2^-110 <= |w| < 2^128 (three bf16 pieces hold fp32's 24 significant bits, whichever way the
    casts round; router weights are ~D^-0.5), so each product with a bf16 x is exact and only the
    accumulation differs from an fp32 GEMM (the tensor cores' fp32 adds, in their order). Any
    other x runs one fp32 dot in full precision. (Both branches assign: a GPU compiles the code
    after an early return too, where a bf16 dot with fp32 x would not compile.)"""
    if x.dtype == tl.bfloat16:
        hi = w.to(tl.bfloat16)
        rest = w - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        acc = _dot(x, hi, _dot(x, mid, _dot(x, lo, acc, UPCAST), UPCAST), UPCAST)  # smallest first
    else:
        acc = _dot(x.to(tl.float32), w, acc, UPCAST)
    return acc


@_tuned(key=["T_BUCKET", "D", "E"], configs=[triton.Config({"BLOCK_T": t, "BLOCK_D": d}, num_warps=w, num_stages=n)
                                              for t, d, w, n in ((16, 32, 4, 1), (16, 64, 4, 3), (16, 128, 8, 3),
                                                                 (32, 64, 4, 3), (32, 128, 8, 3), (64, 64, 8, 3))])
@triton.jit
def _route_kernel(X, W, BIAS, WOUT, IDS, T, T_BUCKET, D, E, sx, sxd, sw, swd, sb, scaling, TOPK: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """BLOCK_T tokens per program: fp32-accurate logits over D (_route_dot), sigmoid, then TOPK
    rounds of argmax over the biased scores (ties to the lowest id), each choice masked out for the
    next round."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    tmask, emask = t < T, e < E
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + t[:, None].to(tl.int64) * sx + d[None, :] * sxd, mask=tmask[:, None] & (d[None, :] < D),
                    other=0.0)
        w = tl.load(W + e[None, :] * sw + d[:, None] * swd, mask=emask[None, :] & (d[:, None] < D), other=0.0)
        acc = _route_dot(x, w, acc, UPCAST)
    p = tl.sigmoid(acc)
    score = tl.where(emask[None, :], p + tl.load(BIAS + e * sb, mask=emask, other=0.0).to(tl.float32)[None, :],
                     float("-inf"))
    k = tl.arange(0, BLOCK_K)
    chosen_p = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    chosen_id = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(TOPK):
        best = tl.argmax(score, axis=1, tie_break_left=True)                     # [BLOCK_T]
        hit = e[None, :] == best[:, None]
        chosen_p = tl.where(k[None, :] == j, tl.sum(tl.where(hit, p, 0.0), axis=1)[:, None], chosen_p)
        chosen_id = tl.where(k[None, :] == j, best[:, None].to(tl.int64), chosen_id)
        score = tl.where(hit, float("-inf"), score)
    w = chosen_p / tl.sum(chosen_p, axis=1)[:, None] * scaling
    out = t[:, None].to(tl.int64) * TOPK + k[None, :]
    tl.store(WOUT + out, w, mask=tmask[:, None] & (k[None, :] < TOPK))
    tl.store(IDS + out, chosen_id, mask=tmask[:, None] & (k[None, :] < TOPK))


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int,
          scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """m3_reference.route. x [T, D], weight [E, D] (fp32), bias [E] -> (weights [T, K] fp32, ids [T, K] int64)."""
    _on_device(x, weight, bias)
    T, D = x.shape
    E = weight.shape[0]
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}] (the number of experts), got {top_k}")
    w = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=x.device)
    weight, bias = weight.float(), bias.float()
    # T_BUCKET keys the tuning by T's power of two: one tuning per bucket, not per length
    _route_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)](
        x, weight, bias, w, ids, T, _p2(T), D, E, *x.stride(), *weight.stride(), bias.stride(0), scaling,
        TOPK=top_k, BLOCK_K=_p2(top_k), BLOCK_E=_p2(E, 16), UPCAST=INTERPRET)
    return w, ids


# ---- grouped MoE ------------------------------------------------------------------------------

# BLOCK_N x BLOCK_K tiles of the grouped GEMMs (BLOCK_M is the tile table's); every one fits an
# H100's 227 KB of shared memory at BLOCK_M = 64
_MOE_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st) for n, k, w, st in
                ((32, 32, 4, 1), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2), (256, 64, 8, 3))]


@triton.jit
def _tile(TILES):
    """This program's row of a _sorted_tiles table: (group, first sorted row, rows)."""
    tile = tl.program_id(0)
    return tl.load(TILES + tile * 3), tl.load(TILES + tile * 3 + 1), tl.load(TILES + tile * 3 + 2)


@triton.jit
def _expert_weights(OFFS, e, REF, ALIGNED: tl.constexpr):
    """Expert e's weight matrix: REF (expert 0's tensor) plus a table of per-expert element offsets
    (the checkpoint keeps one tensor per expert; the table avoids stacking them). When every weight
    is 32-byte aligned the offsets are multiples of 16 elements, which keeps the loads vectorised."""
    offset = tl.load(OFFS + e)
    if ALIGNED:
        offset = tl.multiple_of(offset, 16)
    return REF + offset


@_tuned(key=["D", "I", "BLOCK_M"], configs=_MOE_CONFIGS)
@triton.jit
def _moe_up_kernel(X, TOKEN, TILES, W1P, W3P, WREF, ACT, D, I, sx, sxd, alpha, limit, BLOCK_M: tl.constexpr,
                   UPCAST: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """act[r] = swiglu_oai(x[token[r]] W1_e^T, x[token[r]] W3_e^T) for the rows r of one tile (one
    expert e), BLOCK_N columns of I. Like the torch twin, each projection rounds to the model dtype
    and the activation is computed in fp32 and rounded once."""
    e, start, count = _tile(TILES)
    col = tl.program_id(1)
    if count == 0:                                        # past the real tiles (the grid is their bound)
        return
    m = tl.arange(0, BLOCK_M)
    rows = start + m
    tok = tl.load(TOKEN + rows, mask=m < count, other=0).to(tl.int64)
    n = col * BLOCK_N + tl.arange(0, BLOCK_N)
    w1, w3 = _expert_weights(W1P, e, WREF, ALIGNED), _expert_weights(W3P, e, WREF, ALIGNED)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + tok[:, None] * sx + k[None, :] * sxd, mask=(m[:, None] < count) & (k[None, :] < D), other=0.0)
        wmask = (n[None, :] < I) & (k[:, None] < D)
        acc_g = _dot(x, tl.load(w1 + n[None, :].to(tl.int64) * D + k[:, None], mask=wmask, other=0.0), acc_g, UPCAST)
        acc_u = _dot(x, tl.load(w3 + n[None, :].to(tl.int64) * D + k[:, None], mask=wmask, other=0.0), acc_u, UPCAST)
    g = _to(acc_g, ACT.dtype.element_ty).to(tl.float32)
    u = _to(acc_u, ACT.dtype.element_ty).to(tl.float32)
    act = _to(_swiglu(g, u, alpha, limit), ACT.dtype.element_ty)
    tl.store(ACT + rows[:, None].to(tl.int64) * I + n[None, :], act, mask=(m[:, None] < count) & (n[None, :] < I))


@_tuned(key=["D", "I", "BLOCK_M"], configs=_MOE_CONFIGS)
@triton.jit
def _moe_down_kernel(ACT, TILES, W2P, WREF, Y, D, I, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
                     ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[r] = act[r] W2_e^T for one tile's rows, BLOCK_N columns of D, rounded to the model dtype."""
    e, start, count = _tile(TILES)
    col = tl.program_id(1)
    if count == 0:
        return
    m = tl.arange(0, BLOCK_M)
    rows = (start + m).to(tl.int64)
    n = col * BLOCK_N + tl.arange(0, BLOCK_N)
    w2 = _expert_weights(W2P, e, WREF, ALIGNED)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(ACT + rows[:, None] * I + k[None, :], mask=(m[:, None] < count) & (k[None, :] < I), other=0.0)
        w = tl.load(w2 + n[None, :].to(tl.int64) * I + k[:, None], mask=(n[None, :] < D) & (k[:, None] < I), other=0.0)
        acc = _dot(a, w, acc, UPCAST)
    tl.store(Y + rows[:, None] * D + n[None, :], _to(acc, Y.dtype.element_ty), mask=(m[:, None] < count) & (n[None, :] < D))


@triton.jit
def _moe_combine_kernel(Y, ROW, WEIGHT, OUT, D, K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = sum_k w[t,k] * y[row[t,k]] in fp32, slots in ascending expert order (the torch
    twin's accumulation order), starting from 0: the same order on every run. A row of -1 (an id
    outside the experts, let through only under CUDA-graph capture) adds nothing."""
    t, col = tl.program_id(0).to(tl.int64), tl.program_id(1)
    d = col * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        r = tl.load(ROW + t * K + j).to(tl.int64)
        y = tl.load(Y + r * D + d, mask=(d < D) & (r >= 0), other=0.0).to(tl.float32)
        acc += y * tl.load(WEIGHT + t * K + j)
    tl.store(OUT + t * D + d, acc, mask=d < D)


def _sorted_tiles(groups: torch.Tensor, n: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Alignment on the device, no host sync: items labelled with a group in [0, n) (a token-expert
    pair's expert; a query-slot pair's key block) sorted by group, stably -> order [N], and the
    tiles over the sorted items [n_tiles, 3] int32 (group, first item, items), none spanning two
    groups. n_tiles = ceil(N / block_m) + min(n, N) bounds the real count (each group adds at most
    one partial tile) without reading the labels: the tiles past the real ones hold 0 items and
    their programs return at once. Labels outside [0, n) sort last, into no tile."""
    flat = groups.reshape(-1)
    bucket = torch.where((flat >= 0) & (flat < n), flat, n)
    order = torch.argsort(bucket, stable=True)
    counts = torch.zeros(n + 1, dtype=torch.int64, device=flat.device).scatter_add_(0, bucket, torch.ones_like(bucket))[:n]
    tiles_of = (counts + block_m - 1) // block_m
    tile_end = tiles_of.cumsum(0)
    tile = torch.arange(-(-flat.numel() // block_m) + min(n, flat.numel()), device=flat.device)
    g = torch.searchsorted(tile_end, tile, right=True).clamp(max=n - 1)           # [n_tiles] group of each tile
    within = (tile - tile_end[g] + tiles_of[g]) * block_m                         # the tile's first item in its group
    rows = (counts[g] - within).clamp(0, block_m).masked_fill(tile >= tile_end[-1], 0)
    return order, torch.stack([g, counts.cumsum(0)[g] - counts[g] + within, rows], 1).to(torch.int32)


@functools.lru_cache(maxsize=512)
def _offset_table(ptrs: tuple, itemsize: int, device: torch.device) -> torch.Tensor:
    """[3, E] int64 element offsets of each expert's w1, w2, w3 from the first real one (0 for the
    meta device's), built once per set of weights: the model's parameters never move, so after the
    first call no host-to-device copy remains (a CUDA graph can replay the launch)."""
    ref = next((p for p in ptrs if p), 0)
    return torch.tensor([(p - ref) // itemsize if p else 0 for p in ptrs], dtype=torch.int64, device=device).view(3, -1)


def _check_routes(flat: torch.Tensor, E: int, meta: list[int]) -> None:
    """The twin's check on ids outside [0, E), plus none routed to an expert left on the meta
    device: one read of three numbers from the device. Skipped under CUDA-graph capture (which
    cannot read back): there an id outside [0, E) adds nothing, and a route to a meta expert reads
    another expert's weights (capture a model whose experts are all loaded)."""
    if not flat.numel() or _capturing():
        return
    on_meta = torch.zeros(E + 1, dtype=torch.bool, device=flat.device)
    on_meta[meta] = True
    lo, hi, missing = torch.stack([flat.min(), flat.max(), on_meta[flat.clamp(0, E)].sum()]).tolist()
    _twin().check_expert_ids([lo, hi], E)
    if missing:
        routed = sorted(set(meta) & set(flat.unique().tolist()))
        raise ValueError(f"experts {routed} are routed to but their weights are on the meta device (not loaded)")


def routed_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1, w2, w3,
                   alpha: float, limit: float) -> torch.Tensor:
    """m3_reference.routed_experts as grouped GEMMs. x [T, D]; ids [T, K]; weights [T, K] fp32;
    w1/w3 per expert [I, D], w2 [D, I] (one dtype) -> [T, D] fp32.

    The T*K (token, slot) rows are sorted by expert on the device (_sorted_tiles), and one launch
    runs gate/up + SwiGLU-OAI over all the tiles, one the down projection; the combination then sums
    each token's slots in ascending expert order. Only routed experts are read: an offloaded model
    may keep the others on the meta device.
    """
    _on_device(x, ids, weights)
    T, D = x.shape
    K, E, I = ids.shape[1], len(w1), w1[0].shape[0]
    ws = [w if w.is_meta else w.contiguous() for w in (*w1, *w2, *w3)]
    if any(w.dtype != x.dtype or w.device != x.device for w in ws if not w.is_meta):
        raise ValueError(f"expert weights must be in the activations' dtype {x.dtype}, on their device {x.device}")
    _check_routes(ids.reshape(-1), E, sorted({i % E for i, w in enumerate(ws) if w.is_meta}))
    real = [w for w in ws if not w.is_meta] or [x]
    offsets = _offset_table(tuple(0 if w.is_meta else w.data_ptr() for w in ws), x.element_size(), x.device)
    block_m = 16 if INTERPRET or T * K <= 4 * E else 64                          # decode: a few rows per expert
    order, tiles = _sorted_tiles(ids, E, block_m)
    token = (order // K).to(torch.int32)
    aligned, grid = all(w.data_ptr() % 32 == 0 for w in real), len(tiles)
    act = torch.empty(T * K, I, dtype=x.dtype, device=x.device)
    y = torch.empty(T * K, D, dtype=x.dtype, device=x.device)
    if grid:
        _moe_up_kernel[lambda meta: (grid, triton.cdiv(I, meta["BLOCK_N"]))](
            x, token, tiles, offsets[0], offsets[2], real[0], act, D, I, *x.stride(), alpha, limit, BLOCK_M=block_m,
            UPCAST=INTERPRET, ALIGNED=aligned)
        _moe_down_kernel[lambda meta: (grid, triton.cdiv(D, meta["BLOCK_N"]))](
            act, tiles, offsets[1], real[0], y, D, I, BLOCK_M=block_m, UPCAST=INTERPRET, ALIGNED=aligned)
    slot = torch.argsort(ids, dim=1, stable=True)                                # each token's slots by expert
    row = torch.empty_like(order)
    row[order] = torch.arange(order.numel(), device=x.device)                    # (token, slot) -> sorted row
    row = row.masked_fill((ids.reshape(-1) < 0) | (ids.reshape(-1) >= E), -1)
    out = torch.empty(T, D, dtype=torch.float32, device=x.device)
    _moe_combine_kernel[(T, triton.cdiv(D, 256))](y, row.view(T, K).gather(1, slot),
                                                  weights.float().gather(1, slot), out, D, K=K,
                                                  BLOCK=256)
    return out


# ---- lightning indexer: block scores and selection --------------------------------------------

@_tuned(key=["Di", "bs"], configs=[triton.Config({"BLOCK_Q": q}, num_warps=w, num_stages=n)
                                   for q, w, n in ((16, 4, 1), (64, 4, 3), (64, 8, 3), (128, 8, 3), (128, 8, 4))])
@triton.jit
def _index_scores_kernel(IQ, IK, OUT, Sc, heads, Di, q_start, bs, nb, kv_len, sqb, sqs, sqh, sqd, skb, sks, skd,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, BLOCK_Q: tl.constexpr):
    """out[b, h, i, n] = max over keys j of block n with j <= q_start + i of <iq[b, i, h], ik[b, j]>:
    one program per (BLOCK_Q queries, b, h), one tl.dot per key block, masked before the max."""
    qt, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    i = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(IQ + b.to(tl.int64) * sqb + i[:, None].to(tl.int64) * sqs + h * sqh + d[None, :] * sqd,
                mask=(i[:, None] < Sc) & (d[None, :] < Di), other=0.0)
    q_slot = q_start + i
    last = tl.minimum((q_start + qt * BLOCK_Q + BLOCK_Q - 1) // bs + 1, nb)       # blocks past it: no causal key
    j = tl.arange(0, BLOCK_S)
    for n in range(0, nb):
        best = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        if n < last:
            slot = n * bs + j
            k = tl.load(IK + b.to(tl.int64) * skb + slot[:, None].to(tl.int64) * sks + d[None, :] * skd,
                        mask=(j[:, None] < bs) & (slot[:, None] < kv_len) & (d[None, :] < Di), other=0.0)
            s = _dot(q, tl.trans(k), tl.zeros([BLOCK_Q, BLOCK_S], dtype=tl.float32), UPCAST)
            keep = (j[None, :] < bs) & (slot[None, :] < kv_len) & (slot[None, :] <= q_slot[:, None])
            best = tl.max(tl.where(keep, s, float("-inf")), axis=1)
        tl.store(OUT + ((b * heads + h) * Sc + i).to(tl.int64) * nb + n, best, mask=i < Sc)


def index_block_scores(iq: torch.Tensor, ik: torch.Tensor, q_start: int, block_size: int) -> torch.Tensor:
    """m3_reference.index_block_scores. iq [B, Sc, Hi, Di], ik [B, Sk, Di] -> [B, Hi, Sc, nb] fp32."""
    _on_device(iq, ik)
    B, Sc, Hi, Di = iq.shape
    kv_len = min(ik.shape[1], q_start + Sc)
    nb = -(-kv_len // block_size)
    out = torch.empty(B, Hi, Sc, nb, dtype=torch.float32, device=iq.device)
    iq, ik = _common(iq, ik)
    _index_scores_kernel[lambda meta: (triton.cdiv(Sc, meta["BLOCK_Q"]), B * Hi)](
        iq, ik, out, Sc, Hi, Di, q_start, block_size, nb, kv_len, *iq.stride(), *ik.stride(),
        BLOCK_S=_p2(block_size, 16), BLOCK_D=_p2(Di, 16), UPCAST=INTERPRET)
    return out


@triton.jit
def _select_kernel(SCORES, OUT, rows, Sc, nb, q_start, bs, topk, init_blocks, local_blocks, srow, sn,
                   ROWS: tl.constexpr, NB: tl.constexpr, TOPK: tl.constexpr):
    """ROWS (b, h, query) rows per program: the forced blocks first (init by ascending id, then local
    from the own block back), then the best scores (ties to the lower id), k = min(topk, c + 1) per
    row; written ascending, then -1."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = (q_start + r % Sc) // bs                                                 # [ROWS]
    n = tl.arange(0, NB)
    causal = (n[None, :] <= c[:, None]) & (n[None, :] < nb)                      # [ROWS, NB]
    init = causal & (n[None, :] < init_blocks)
    local = causal & (n[None, :] > c[:, None] - local_blocks)
    forced = init | local
    priority = tl.where(init, init_blocks + local_blocks - n[None, :],
                        tl.where(local, local_blocks - (c[:, None] - n[None, :]), 0)).to(tl.float32)
    score = tl.load(SCORES + r[:, None].to(tl.int64) * srow + n[None, :] * sn, mask=(r[:, None] < rows) & (n[None, :] < nb),
                    other=float("-inf"))
    k = tl.minimum(tl.minimum(topk, c + 1), nb)                                  # [ROWS]
    chosen = causal & ~causal
    for j in range(0, topk):
        pri = tl.where(forced & ~chosen, priority, 0.0)
        open_ = causal & ~forced & ~chosen
        cand = tl.where(open_, score, float("-inf"))
        # by score, ties to the lower id; when the best left is -inf, the lowest open block
        by_score = tl.where(tl.max(cand, axis=1) > float("-inf"), tl.argmax(cand, axis=1, tie_break_left=True),
                            tl.argmax(open_.to(tl.int32), axis=1, tie_break_left=True))
        pick = tl.where(tl.max(pri, axis=1) > 0, tl.argmax(pri, axis=1, tie_break_left=True), by_score)
        chosen = chosen | ((n[None, :] == pick[:, None]) & (j < k)[:, None])
    # slot s holds the chosen block whose rank among the chosen (ascending) is s, else -1: built in
    # registers and stored once, so no two stores race for a slot
    rank = tl.cumsum(chosen.to(tl.int32), axis=1) - 1                            # [ROWS, NB]
    slots = tl.arange(0, TOPK)
    hit = chosen[:, None, :] & (rank[:, None, :] == slots[None, :, None])        # [ROWS, TOPK, NB]
    ids = tl.where(slots[None, :] < k[:, None], tl.sum(tl.where(hit, n[None, None, :], 0), axis=2), -1)
    tl.store(OUT + r[:, None].to(tl.int64) * topk + slots[None, :], ids.to(tl.int32),
             mask=(r[:, None] < rows) & (slots[None, :] < topk))


def select_blocks(block_scores: torch.Tensor, q_start: int, block_size: int, topk: int,
                  init_blocks: int, local_blocks: int) -> torch.Tensor:
    """m3_reference.select_blocks. block_scores [B, Hi, Sc, nb] -> int32 [B, Hi, Sc, topk]."""
    _on_device(block_scores)
    B, Hi, Sc, nb = block_scores.shape
    out = torch.empty(B, Hi, Sc, topk, dtype=torch.int32, device=block_scores.device)
    scores = _rows(block_scores.float(), nb)
    rows, per = B * Hi * Sc, max(1, 2048 // (_p2(nb) * _p2(topk)))
    _select_kernel[(triton.cdiv(rows, per),)](scores, out, rows, Sc, nb, q_start, block_size, topk, init_blocks,
                                              local_blocks, *scores.stride(), ROWS=_p2(per),
                                              NB=_p2(nb), TOPK=_p2(topk))
    return out


# ---- block-sparse attention -------------------------------------------------------------------

@triton.jit
def _online_softmax(s, v, m, l, acc, EXACT_PV: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile into the running softmax (flash attention): s [rows, keys] masked scores, m the
    running max, l the running sum of e^(s - m), acc the running sum of e^(s - m) v, all fp32;
    the old terms rescale by e^(m_old - m_new). Returns the new (m, l, acc)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)        # no key yet: keep exp() finite
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    return m_new, l * alpha + tl.sum(p, axis=1), _pv(p, v, acc * alpha[:, None], EXACT_PV, UPCAST)


@_tuned(key=["Dh", "bs", "G", "TOPK", "SPLIT", "EXACT_PV"], configs=[triton.Config({}, num_warps=w, num_stages=n)
                                                                      for w, n in ((8, 2), (8, 3), (8, 1), (4, 2))])
@triton.jit
def _sparse_attention_kernel(Q, K, V, IDS, O, ACC, ML, S, Sk, H, Hkv, Dh, topk, per_split, bs, q_start, scale,
                             sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sib, sih, sis, sit,
                             G: tl.constexpr, BS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                             TOPK: tl.constexpr, SPLIT: tl.constexpr, EXACT_PV: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (query i, b, KV head, split of the slots). Its G rows are the query heads of
    the KV group, which share the selection (M3: 16 heads, the M of every tl.dot). It walks only
    its split's slots, up to the row's last used one, BLOCK_S / BS slots per key tile (one at the
    released block of 128; blocks smaller than tl.dot's 16 share a tile): q.k^T [G, BLOCK_S]
    masked to the keys that are neither after the query nor past the end (a -1 slot masks all),
    an fp32 online softmax, p.v into the fp32 accumulator. A block named twice is walked twice, so
    it weighs twice, as the twin's gathered keys do. With SPLIT the unnormalised accumulator, the
    running max and the sum go to a workspace for _sparse_combine_kernel; else o = acc / l."""
    i, bh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (bh // Hkv).to(tl.int64), bh % Hkv
    group = H // Hkv
    g, d, j, t = tl.arange(0, G), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_S), tl.arange(0, TOPK)
    head, row_ok, d_ok = h * group + g, g < group, d < Dh
    q = tl.load(Q + b * sqb + i.to(tl.int64) * sqs + head[:, None] * sqh + d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)                 # [G, BLOCK_D]
    IDS += b * sib + h * sih + i.to(tl.int64) * sis
    used = tl.max(tl.where(tl.load(IDS + t * sit, mask=t < topk, other=-1) >= 0, t + 1, 0), axis=0)
    q_slot = q_start + i
    m = tl.full([G], float("-inf"), tl.float32)
    l = tl.zeros([G], dtype=tl.float32)
    acc = tl.zeros([G, BLOCK_D], dtype=tl.float32)
    first, end = split * per_split, tl.minimum(split * per_split + per_split, used)
    K += b * skb + h * skh + d[None, :] * skd
    V += b * svb + h * svh + d[None, :] * svd
    for slot0 in range(first, end, BLOCK_S // BS):
        slot = slot0 + j // BS                                                    # [BLOCK_S]: the lane's slot
        n = tl.load(IDS + slot * sit, mask=slot < end, other=-1)
        key = n * bs + j % BS
        valid = (n >= 0) & (j % BS < bs) & (key < Sk) & (key <= q_slot)
        at, kv_mask = key[:, None].to(tl.int64), valid[:, None] & d_ok[None, :]
        k = tl.load(K + at * sks, mask=kv_mask, other=0.0)                      # [BLOCK_S, BLOCK_D]
        v = tl.load(V + at * svs, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([G, BLOCK_S], dtype=tl.float32), UPCAST) * scale
        m, l, acc = _online_softmax(tl.where(valid[None, :], s, float("-inf")), v, m, l, acc, EXACT_PV, UPCAST)
    rows = (bh * S + i).to(tl.int64) * G + g                                      # (b, KV head, query, head)
    if SPLIT:
        part = rows * tl.num_programs(2) + split
        tl.store(ACC + part[:, None] * BLOCK_D + d[None, :], acc)
        tl.store(ML + part * 2, m)
        tl.store(ML + part * 2 + 1, l)
    else:
        out = acc / tl.where(row_ok, l, 1.0)[:, None]    # no selected key: 0 / 0 = NaN, as the twin's softmax
        tl.store(O + ((b * S + i) * H + head[:, None]) * Dh + d[None, :], _to(out, O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


@_tuned(key=["Dh", "bs", "G", "QB", "EXACT_PV"], configs=[triton.Config({}, num_warps=w, num_stages=n)
                                            for w, n in ((4, 1), (4, 2), (8, 2), (8, 3), (4, 3))])
@triton.jit
def _sparse_by_block_kernel(Q, K, V, PAIRS, TILES, ACC, ML, S, Sk, H, Hkv, Dh, nb, topk, bs, q_start, scale,
                            sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, G: tl.constexpr,
                            QB: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                            EXACT_PV: tl.constexpr, UPCAST: tl.constexpr):
    """The selection inverted (MSA-style prefill): one program per tile of up to QB (query, slot)
    pairs that chose the same key block, sorted and tiled on the device (_sorted_tiles). The block's
    K and V load once for all QB x G rows (M3: 4 queries x 16 heads, an M of 64); each row's
    softmax over this block alone, causal per query, goes to the workspace as (acc, max, sum) under
    its (query, head, slot), and _sparse_combine_kernel merges a query's slots."""
    blk, start, count = _tile(TILES)
    if count == 0:                                        # past the real tiles (the grid is their bound)
        return
    b, h, n = (blk // nb // Hkv).to(tl.int64), blk // nb % Hkv, blk % nb
    r, d, j = tl.arange(0, QB * G), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_S)
    g, group, d_ok = r % G, H // Hkv, d < Dh
    pair = tl.load(PAIRS + start + r // G, mask=r // G < count, other=0)        # flat index into [B, Hkv, S, topk]
    i, row_ok = pair // topk % S, (r // G < count) & (g < group)
    q = tl.load(Q + b * sqb + i[:, None] * sqs + (h * group + g)[:, None] * sqh + d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)                 # [QB * G, BLOCK_D]
    key = n * bs + j
    valid = (j < bs) & (key < Sk)
    at, kv_mask = key[:, None].to(tl.int64), valid[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + at * sks + h * skh + d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + at * svs + h * svh + d[None, :] * svd, mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), tl.zeros([QB * G, BLOCK_S], dtype=tl.float32), UPCAST) * scale
    keep = valid[None, :] & (key[None, :] <= q_start + i[:, None])
    m, l, acc = _online_softmax(tl.where(keep, s, float("-inf")), v, tl.full([QB * G], float("-inf"), tl.float32),
                                tl.zeros([QB * G], dtype=tl.float32), tl.zeros([QB * G, BLOCK_D], dtype=tl.float32),
                                EXACT_PV, UPCAST)
    part = ((pair // topk) * G + g) * topk + pair % topk                          # the combine's (row, head, slot)
    tl.store(ACC + part[:, None] * BLOCK_D + d[None, :], acc, mask=(r // G < count)[:, None])
    tl.store(ML + part * 2, m, mask=r // G < count)
    tl.store(ML + part * 2 + 1, l, mask=r // G < count)


@triton.jit
def _sparse_combine_kernel(ACC, ML, O, S, H, Hkv, Dh, parts, sob, sos, soh, sod, G: tl.constexpr,
                           PARTS: tl.constexpr, BLOCK_D: tl.constexpr):
    """o = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the parts s of one (query, b, KV
    head) (the splits of its slots, or its slots), M = max_s m_s: the flash-decoding merge. A part
    with no key (m = -inf, l = 0: an empty slot's as the workspace starts) adds nothing and its acc
    is not read. The maxima are read first, then one part's [G, BLOCK_D] at a time (16 of them at
    once would spill). A row with no key stays 0 / 0."""
    i, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // Hkv).to(tl.int64), bh % Hkv
    g, s, d = tl.arange(0, G), tl.arange(0, PARTS), tl.arange(0, BLOCK_D)
    group = H // Hkv
    rows = (bh * S + i).to(tl.int64) * G + g                                      # [G]
    top = tl.max(tl.load(ML + (rows[:, None] * parts + s[None, :]) * 2, mask=s[None, :] < parts,
                         other=float("-inf")), axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)
    l = tl.zeros([G], dtype=tl.float32)
    acc = tl.zeros([G, BLOCK_D], dtype=tl.float32)
    for part in range(0, parts):
        at = rows * parts + part
        m = tl.load(ML + at * 2)                                                  # [G]
        w = tl.exp(m - top)
        l += tl.load(ML + at * 2 + 1) * w
        acc += tl.load(ACC + at[:, None] * BLOCK_D + d[None, :], mask=(m > float("-inf"))[:, None], other=0.0) * w[:, None]
    out = acc / tl.where(g < group, l, 1.0)[:, None]
    head = h * group + g
    tl.store(O + b * sob + i.to(tl.int64) * sos + head[:, None] * soh + d[None, :] * sod, _to(out, O.dtype.element_ty),
             mask=(g < group)[:, None] & (d < Dh)[None, :])


def _slots_per_program(programs: int, topk: int, device) -> int:
    """Slots per program: all of a row's when the queries alone fill the device (prefill); for a
    few queries (decode) the slots split until about two programs per SM run (8 programs under
    the interpreter, so that its tests reach both paths)."""
    target = 8 if INTERPRET else 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return -(-topk // max(1, min(topk, target // max(programs, 1))))


def _block_keys(block_ids: torch.Tensor, nb: int) -> torch.Tensor:
    """Each slot's key block as one label over all (b, KV head): (b Hkv + h) nb + id, or -1 for
    an empty slot or an id outside [0, nb). block_ids [B, Hkv, S, topk] -> int64, same shape."""
    B, Hkv = block_ids.shape[:2]
    heads = torch.arange(B * Hkv, device=block_ids.device).view(B, Hkv, 1, 1) * nb
    return torch.where((block_ids >= 0) & (block_ids < nb), heads + block_ids, -1)


def _sparse_by_query(q, k, v, block_ids, out, block_size, scale, q_start, per):
    """Each (query, KV head) walks its own slots, per of them a program (_sparse_attention_kernel),
    the splits merged after when per < topk. Writes out."""
    B, S, H, Dh = q.shape
    Sk, Hkv, topk = k.shape[1], k.shape[2], block_ids.shape[-1]
    G, BD, splits = _p2(H // Hkv, 16), _p2(Dh, 16), -(-topk // per)              # tl.dot wants M >= 16
    acc = torch.empty(B * Hkv * S * G * splits * BD if splits > 1 else 1, dtype=torch.float32, device=q.device)
    ml = torch.empty(acc.numel() // BD * 2 if splits > 1 else 1, dtype=torch.float32, device=q.device)
    _sparse_attention_kernel[(S, B * Hkv, splits)](
        q, k, v, block_ids, out, acc, ml, S, Sk, H, Hkv, Dh, topk, per, block_size, q_start, scale,
        *q.stride(), *k.stride(), *v.stride(), *block_ids.stride(), G=G, BS=_p2(block_size),
        BLOCK_S=_p2(block_size, 16), BLOCK_D=BD, TOPK=_p2(topk), SPLIT=splits > 1, EXACT_PV=EXACT_PV, UPCAST=INTERPRET)
    if splits > 1:
        _sparse_combine_kernel[(S, B * Hkv)](acc, ml, out, S, H, Hkv, Dh, splits, *out.stride(), G=G,
                                             PARTS=_p2(splits), BLOCK_D=BD)


def _sparse_by_block(q, k, v, block_ids, out, block_size, scale, q_start):
    """The selection inverted (_sparse_by_block_kernel), in query chunks whose fp32 workspace (a
    partial output per query, head and slot) stays within 1 GiB, each merged by its slots (a slot
    no tile wrote keeps the workspace's start, no key). Writes out."""
    B, S, H, Dh = q.shape
    Sk, Hkv, topk = k.shape[1], k.shape[2], block_ids.shape[-1]
    G, BD, nb = _p2(H // Hkv, 16), _p2(Dh, 16), -(-Sk // block_size)
    chunk = max(1, (1 << 30) // (B * Hkv * G * topk * BD * 4))
    for s0 in range(0, S, chunk):
        ids = block_ids[:, :, s0:s0 + chunk]
        n = ids.shape[2]
        order, tiles = _sorted_tiles(_block_keys(ids, nb), B * Hkv * nb, QUERIES_PER_TILE)
        acc = torch.empty(B * Hkv * n * G * topk * BD, dtype=torch.float32, device=q.device)
        ml = torch.zeros(acc.numel() // BD, 2, dtype=torch.float32, device=q.device)
        ml[:, 0] = float("-inf")                           # (max, sum) of no key: an empty slot's, never written
        qs, os_ = q[:, s0:s0 + n], out[:, s0:s0 + n]
        if len(tiles):
            _sparse_by_block_kernel[(len(tiles),)](
                qs, k, v, order, tiles, acc, ml, n, Sk, H, Hkv, Dh, nb, topk, block_size, q_start + s0, scale,
                *qs.stride(), *k.stride(), *v.stride(), G=G, QB=QUERIES_PER_TILE, BLOCK_S=_p2(block_size, 16),
                BLOCK_D=BD, EXACT_PV=EXACT_PV, UPCAST=INTERPRET)
        _sparse_combine_kernel[(n, B * Hkv)](acc, ml, os_, n, H, Hkv, Dh, topk, *os_.stride(), G=G,
                                             PARTS=_p2(topk), BLOCK_D=BD)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_ids: torch.Tensor,
                     block_size: int, scale: float, q_start: int = 0,
                     query_chunk: int | None = None) -> torch.Tensor:
    """m3_reference.sparse_attention. q [B, S, H, Dh]; k/v [B, Sk, Hkv, Dh]; block_ids int32
    [B, Hkv, S, topk] -> [B, S, H, Dh]. query_chunk bounds the torch twin's memory and has no
    meaning here (nothing is gathered); q_start > 0 is the decode case against cached keys.
    Enough queries to fill the device run by block (BY_BLOCK, the default) or by query; a few
    run by query with their slots split. EXACT_PV picks p.v's precision for 16-bit v (see _pv)."""
    _on_device(q, k, v, block_ids)
    Sk, Hkv = k.shape[1], k.shape[2]
    if not _capturing():                   # under capture a block past the keys or below -1 adds nothing
        _twin().check_block_ids(block_ids, -(-Sk // block_size))
    topk = block_ids.shape[-1]
    per = _slots_per_program(q.shape[0] * Hkv * q.shape[1], topk, q.device)
    qc, k, v = _common(q, k, v)
    out = torch.empty(q.shape, dtype=qc.dtype, device=q.device)
    if BY_BLOCK and per == topk:
        _sparse_by_block(qc, k, v, block_ids, out, block_size, scale, q_start)
    else:
        _sparse_by_query(qc, k, v, block_ids, out, block_size, scale, q_start, per)
    return out.to(q.dtype)


# ---- benchmark --------------------------------------------------------------------------------

RELEASED = dict(D=6144, H=64, Hkv=4, Dh=128, R=64, E=128, K=4, I=3072, Hi=4, Di=128, bs=128, topk=16)
# dense bf16 tensor-core FLOP/s and HBM bytes/s (NVIDIA's datasheets; dense = half the sparsity
# figure), matched in this order against torch.cuda.get_device_name: the last is the SXM (HBM3) H100
PEAKS = [("H100 PCIe", 756e12, 2.0e12), ("H100 NVL", 835e12, 3.9e12), ("H200", 989e12, 4.8e12),
         ("H100", 989e12, 3.35e12)]
TARGETS = {"rms_norm": "HBM >= 80%", "swiglu_oai": "HBM >= 80%", "norm_rope": "HBM >= 80%", "rope": "HBM >= 80%",
           "route": ">= 1x torch", "routed_experts": "HBM >= 70% on expert weights",
           "index_block_scores": ">= 5x torch at 32k", "sparse_attention": ">= 5x torch at 32k, >= 30% of peak FLOP/s",
           "sparse_attention by query": ">= 5x torch at 32k, >= 30% of peak FLOP/s",
           "sparse_attention decode": "HBM >= 50% on the selected K/V"}


def sparse_attention_flops(block_ids: torch.Tensor, block_size: int, Sk: int, H: int, Dh: int,
                           q_start: int = 0) -> tuple[int, int, int]:
    """(useful, by block, by query) FLOPs of sparse_attention on block_ids [B, Hkv, S, topk].
    Useful: 4 Dh (q.k and p.v) per query head and attended key, each key of a selected block that
    is not after the query nor past the end (a repeated block counts per slot, as it weighs). The
    other two are what each prefill path computes, at the padded tile sizes: G' = max(16, H / Hkv
    rounded up to a power of two) rows per query, BLOCK_S = max(16, bs') keys per tile (bs' = bs
    rounded up to a power of two). By block: per key block, its (query, slot) pairs in tiles of
    QUERIES_PER_TILE. By query: per (query, KV head), its key tiles up to the last used slot,
    BLOCK_S / bs' slots per tile."""
    B, Hkv, S, topk = block_ids.shape
    G, dev, nb = H // Hkv, block_ids.device, -(-Sk // block_size)
    ids = block_ids.long()
    q_slot = q_start + torch.arange(S, device=dev)[:, None]                       # [S, 1]
    end = torch.minimum((ids + 1) * block_size, (q_slot + 1).clamp(max=Sk))
    useful = 4 * Dh * G * int((end - ids * block_size).clamp(min=0).masked_fill(ids < 0, 0).sum())
    tile = 4 * _p2(Dh, 16) * _p2(G, 16) * _p2(block_size, 16)                   # one query's rows x one key tile
    keys = _block_keys(ids, nb)
    pairs = torch.bincount(keys[keys >= 0], minlength=B * Hkv * nb)
    by_block = int(((pairs + QUERIES_PER_TILE - 1) // QUERIES_PER_TILE).sum()) * QUERIES_PER_TILE * tile
    per_tile = _p2(block_size, 16) // _p2(block_size)
    used = torch.where(ids >= 0, torch.arange(1, topk + 1, device=dev), 0).amax(-1)
    return useful, by_block, int(((used + per_tile - 1) // per_tile).sum()) * tile


def _time(fn, device) -> float:
    """Median seconds of fn() over a few runs after a warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(5):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _sparse_attention_by_query(q, k, v, block_ids, block_size, scale):
    """sparse_attention's other prefill path (each query walking its own blocks), for the bench."""
    out = torch.empty_like(q)
    _sparse_by_query(q, k, v, block_ids, out, block_size, scale, 0, block_ids.shape[-1])
    return out


def _chunked_scores(iq, ik, q_start, bs):
    """The torch twin the model's way: query chunks of 1024, each against its causal keys."""
    import m3_reference as m3
    parts = [m3.index_block_scores.torch(iq[:, i:i + 1024], ik, q_start + i, bs) for i in range(0, iq.shape[1], 1024)]
    nb = parts[-1].shape[-1]
    return torch.cat([F.pad(p, (0, nb - p.shape[-1]), value=float("-inf")) for p in parts], dim=2)


def bench_cases(c: dict, lengths, decode, device, dtype):
    """Yields (kernel, label, torch twin call, Triton call, bytes moved, FLOPs) at the shapes of c,
    building each case's inputs only when it is reached (the 64k ones are large)."""
    import m3_reference as m3
    r = lambda *shape, scale=1.0: (torch.randn(*shape, device=device) * scale).to(dtype)
    for S in lengths:
        x = r(S, c["D"])
        yield ("rms_norm", f"S={S}", (m3.rms_norm.torch, rms_norm), (x, r(c["D"], scale=0.1), 1e-6, r(S, c["D"])),
               x.numel() * x.element_size() * 4, 0)
        g = r(S * c["K"], c["I"], scale=4.0)
        yield ("swiglu_oai", f"T={S * c['K']}", (m3.swiglu_oai.torch, swiglu_oai), (g, r(*g.shape, scale=4.0), 1.702, 7.0),
               g.numel() * g.element_size() * 3, 0)
        q = r(1, S, c["H"], c["Dh"])
        cos, sin = m3.rope_angles(torch.arange(S, device=device)[None], c["R"], 5e6)
        yield ("norm_rope", f"S={S}", (m3.norm_rope.torch, norm_rope), (q, r(c["Dh"], scale=0.1), cos, sin, 1e-6),
               q.numel() * q.element_size() * 2, 0)
        yield ("rope", f"S={S}", (m3.rope.torch, rope), (q, cos, sin), q.numel() * q.element_size() * 2, 0)
        w = torch.randn(c["E"], c["D"], device=device) * c["D"] ** -0.5
        yield ("route", f"S={S}", (m3.route.torch, route), (x, w, torch.zeros(c["E"], device=device), c["K"], 2.0),
               0, 2 * S * c["E"] * c["D"])
        iq, ik = r(1, S, c["Hi"], c["Di"]), r(1, S, c["Di"])
        # the torch twin runs in query chunks of 1024, as the model does (one chunk would be [S, S])
        yield ("index_block_scores", f"S={S}", (_chunked_scores, index_block_scores), (iq, ik, 0, c["bs"]), 0,
               S * S * c["Hi"] * c["Di"])
        args = (r(1, S, c["H"], c["Dh"]), r(1, S, c["Hkv"], c["Dh"]), r(1, S, c["Hkv"], c["Dh"]),
                _bench_selection(S, c, device), c["bs"], c["Dh"] ** -0.5)
        useful, by_block, by_query = sparse_attention_flops(args[3], c["bs"], S, c["H"], c["Dh"])
        yield ("sparse_attention", f"S={S} (ran {by_block / useful:.1f}x)", (m3.sparse_attention.torch, sparse_attention),
               args, 0, useful)
        yield ("sparse_attention by query", f"S={S} (ran {by_query / useful:.1f}x)",
               (m3.sparse_attention.torch, _sparse_attention_by_query), args, 0, useful)
    S = min(lengths[-1], 2048)
    scores = m3.index_block_scores.torch(r(1, S, c["Hi"], c["Di"]), r(1, S, c["Di"]), 0, c["bs"])
    yield ("select_blocks", f"S={S}", (m3.select_blocks.torch, select_blocks), (scores, 0, c["bs"], c["topk"], 0, 1), 0, 0)
    for n in decode:
        Sk = lengths[-1]
        q, k, v = r(1, n, c["H"], c["Dh"]), r(1, Sk, c["Hkv"], c["Dh"]), r(1, Sk, c["Hkv"], c["Dh"])
        ids = _bench_selection(Sk, c, device)[:, :, -n:].contiguous()
        kv = 2 * c["bs"] * c["Dh"] * k.element_size() * int((ids >= 0).sum())       # K and V of each selected block
        yield ("sparse_attention decode", f"{n} of {Sk}", (m3.sparse_attention.torch, sparse_attention),
               (q, k, v, ids, c["bs"], c["Dh"] ** -0.5, Sk - n), kv, 0)
    T = min(lengths[0], 4096)
    x = r(T, c["D"])
    weights, ids = m3.route.torch(x, torch.randn(c["E"], c["D"], device=device) * c["D"] ** -0.5,
                                  torch.zeros(c["E"], device=device), c["K"], 2.0)
    experts = [[r(*shape, scale=shape[1] ** -0.5) for _ in range(c["E"])] for shape in
               ((c["I"], c["D"]), (c["D"], c["I"]), (c["I"], c["D"]))]
    weight_bytes = len(ids.unique()) * 3 * c["I"] * c["D"] * x.element_size()      # each routed expert read once
    yield ("routed_experts", f"T={T}", (m3.routed_experts.torch, routed_experts),
           (x, ids, weights, *experts, 1.702, 7.0), weight_bytes, 0)


def _bench_selection(S: int, c: dict, device) -> torch.Tensor:
    """A valid selection for every query: its own block and random earlier ones, ascending, -1 padded.
    -> int32 [1, Hkv, S, topk]"""
    nb = -(-S // c["bs"])
    own = torch.arange(S, device=device) // c["bs"]
    key = torch.rand(c["Hkv"], S, nb, device=device).masked_fill(torch.arange(nb, device=device) > own[:, None], -1.0)
    key.scatter_(-1, own[None, :, None].expand(c["Hkv"], S, 1), 2.0)
    top = key.topk(min(c["topk"], nb), dim=-1)
    ids = torch.where(top.values >= 0, top.indices, nb).sort(-1).values       # unused slots (nb) sort last
    ids = torch.nn.functional.pad(torch.where(ids == nb, -1, ids), (0, c["topk"] - ids.shape[-1]), value=-1)
    return ids[None].to(torch.int32)


def bench(config: dict = RELEASED, lengths=(4096, 16384, 32768, 65536), decode=(1, 4)) -> None:
    """Per kernel: torch twin vs Triton time, the Triton GB/s or TFLOP/s and its share of the peak.
    Sparse attention's prefill counts useful FLOPs only (the keys attended: causal, selected,
    within the keys), and its shape says how many times that the kernel ran (sparse_attention_flops);
    its decode counts the selected blocks' K and V bytes, routed_experts the routed experts'
    weight bytes (each read once), the row-wise kernels their inputs and outputs."""
    if not torch.cuda.is_available():
        print("kernels.py bench needs a CUDA device: none is visible here, so nothing was measured "
              "(the interpreter, TRITON_INTERPRET=1, checks correctness, not speed)")
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    flops_peak, bytes_peak = next(((f, b) for key, f, b in PEAKS if key in name), (None, None))
    print(f"{name}, bf16, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'kernel':<24}{'shape':<22}{'torch ms':>10}{'triton ms':>11}{'speed-up':>9}{'achieved':>16}{'of peak':>9}  target")
    for kernel, label, (twin, mine), args, nbytes, flops in bench_cases(config, lengths, decode, device, torch.bfloat16):
        try:
            t_torch = _time(lambda: twin(*args), device)
            t_mine = _time(lambda: mine(*args), device)
        except torch.OutOfMemoryError:
            print(f"{kernel:<24}{label:<22}out of memory on this device")
            del args
            torch.cuda.empty_cache()
            continue
        # route's fp32-accurate logits take three bf16 dots per product: its target is torch's time, not a peak
        rate, peak = (nbytes / t_mine, bytes_peak) if nbytes else (flops / t_mine, None if kernel == "route" else flops_peak)
        unit = "GB/s" if nbytes else "TFLOP/s"
        shown = rate / (1e9 if nbytes else 1e12) if rate else 0.0
        share = f"{rate / peak:8.0%}" if peak and rate else f"{'-':>8}"
        print(f"{kernel:<24}{label:<22}{1e3 * t_torch:>10.3f}{1e3 * t_mine:>11.3f}{t_torch / t_mine:>8.1f}x"
              f"{shown:>10.1f} {unit:<7}{share} {TARGETS.get(kernel, '')}")


if __name__ == "__main__":
    if sys.argv[1:] != ["bench"]:
        sys.exit("usage: python kernels.py bench")
    bench()
