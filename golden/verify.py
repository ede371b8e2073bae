"""Check an implementation of MiniMax M3 against the golden tensors, with numpy and the standard library.

    python golden/verify.py --list                                     # the cases, their inputs and tensor names
    python golden/verify.py --case text --outputs theirs.safetensors   # one committed case
    python golden/verify.py --case bf16 --outputs theirs.safetensors --layerwise
    python golden/verify.py --case text --outputs theirs.safetensors --layerwise --pcc 0.99   # approximate kernels
    python golden/verify.py --all --outputs-dir mine/                  # every case: mine/<case>.safetensors
    python golden/verify.py --reference ref.safetensors --outputs theirs.safetensors --config config.json
    python golden/verify.py --dump bf16 logits logits.npy              # one stored tensor as .npy (bf16 -> fp32)

Exit status: 0 pass; 1 divergence; 2 unusable input (an unreadable or tampered file, nothing
compared, or a required tensor missing: each case lists what it exists to pin); 3 inconclusive
(every divergence is one that an allowed near tie before it can have caused, so a correct
implementation may have taken another path: check layer by layer, README).

This file is the one implementation of the tolerance and near-tie rules: `m3_reference.py`
imports it both to write them into golden/manifest.json and to verify its own re-runs.
Safetensors files are parsed here directly (the format is a JSON header and raw little-endian
bytes), so bfloat16 tensors decode without torch: bf16 is the top half of an fp32, exactly.
The reader is yours too: from the repository root, `from golden.verify import read_safetensors`
gives every tensor of a file as numpy arrays (safetensors' own numpy loader rejects bfloat16).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PASS, DIVERGED, UNUSABLE, INCONCLUSIVE = 0, 1, 2, 3
VERDICTS = ("PASS", "DIVERGED", "UNUSABLE", "INCONCLUSIVE")     # by exit status
GOLDEN_FORMAT = 3
FP32_COMPONENT_TOL = 1e-5     # one fp32 op chain: ~100 eps_fp32 (1.2e-7)
FP32_MODEL_TOL = 1e-4         # a few tiny layers deep: rounding grows ~10x more
BF16_TOL = 2 ** -5            # eps_bf16 = 2^-8 per rounding, several roundings compound
FP32_TIE_TOL = 1e-3           # fp32 stacks that scale by d_idx^-0.5 or sum in another order stay far below
BF16_TIE_TOL = 0.05           # bf16 / 16-bit quantised rankers flip choices whose scores differ by ~2^-8 |s|
SELECTIONS = ("block_ids", ".ids")                 # chosen blocks / experts: compared as sets per row
SCORES = ("scores",)                               # what the selections rank: tolerance scaled by the max
GRADIENTS = "grad."                                # gradients: tolerance scaled by the tensor's max too


class Unusable(ValueError):
    """The input cannot give a verdict: unreadable, tampered, or not comparable."""


# ---- safetensors without torch ------------------------------------------------------------

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
           "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _header(path: Path) -> tuple[dict, int]:
    """The JSON header (tensor name -> dtype, shape, data_offsets) and where the data starts."""
    path = Path(path)
    if path.is_dir():
        raise Unusable(f"cannot read {path}: a directory, not a safetensors file")
    if not path.is_file():
        raise Unusable(f"cannot read {path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise Unusable(f"cannot read {path}: truncated or not a safetensors file (a header of {n} bytes "
                           f"in a file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Unusable(f"cannot read {path}: the safetensors header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise Unusable(f"cannot read {path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        well_formed = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                       and isinstance(info.get("shape"), list) and all(_is_int(d) and d >= 0 for d in info["shape"])
                       and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                       and all(_is_int(o) for o in info["data_offsets"]))
        if not well_formed:
            raise Unusable(f"cannot read {path}: tensor {name!r} has a malformed header entry {info!r} (needs a "
                           f"dtype string, a shape of non-negative integers and two integer data_offsets)")
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise Unusable(f"cannot read {path}: tensor {name!r} has dtype {dtype}; supported: "
                           f"{sorted(_DTYPES)} (store outputs as float32, bfloat16 or integers)")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if not 0 <= start <= end or end - start != nbytes or 8 + n + end > size:
            raise Unusable(f"cannot read {path}: tensor {name!r} ({dtype} {shape}) has data offsets "
                           f"[{start}, {end}] that do not fit its size or the file (truncated?)")
    return header, 8 + n


def safetensors_dtypes(path: Path) -> dict[str, str]:
    """Tensor name -> its safetensors dtype ("F32", "BF16", "I64", ...), read from the header only."""
    return {name: info["dtype"] for name, info in _header(path)[0].items()}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a numpy array; bfloat16 becomes float32 (exact)."""
    header, base = _header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        a = data[base + start:base + end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a
    return out


# ---- the rules: tolerances, forward order, near ties ----------------------------------------

def tolerance(name: str, floating: bool, dtype: str, kind: str) -> dict:
    """How one tensor is compared. Selections as sets per row; other integers exactly; floats by
    |theirs - ref| <= atol + rtol * |ref|, atol = rtol set by the case's dtype (16-bit floats: bf16
    rules) and kind (component: one op chain; model: several layers). Scores (what selections rank)
    take the rtol part relative to the largest finite |ref| of the tensor instead ("scale": "max"):
    a score is a dot product, whose rounding error scales with the size of its factors (which the
    largest score reflects), not with a result that may have cancelled to near zero. Gradients
    (`grad.*`) likewise: each element is a sum over tokens of products whose rounding follows the
    tensor's largest terms; without the scale, a gradient of small elements would pass as zeros."""
    if name.endswith(SELECTIONS):
        return {"compare": "set"}
    if not floating:
        return {"compare": "exact"}
    tol = BF16_TOL if dtype in ("bfloat16", "float16") else FP32_COMPONENT_TOL if kind == "component" else FP32_MODEL_TOL
    if name.startswith(GRADIENTS):
        return {"compare": "close", "atol": 0.0, "rtol": tol, "scale": "max"}
    return {"compare": "close", "atol": tol, "rtol": tol, **({"scale": "max"} if name.endswith(SCORES) else {})}


def tie_tolerance(dtype: str) -> float:
    """Largest reference-score gap of a swapped choice that counts as a near tie."""
    return BF16_TIE_TOL if dtype in ("bfloat16", "float16") else FP32_TIE_TOL


_ORDER = re.compile(r"^(?:vision\.(image|video)\.(patches|projected|features)|(embeddings)|layers\.(\d+)\.(.+)|"
                    r"(hidden)|(logits)|mtp\.(\d+)\.(.+)|(lm_loss|mtp_loss|loss))$")
_IN_LAYER = ["indexer.block_scores", "indexer.block_ids", "router.scores", "router.ids", "router.weights", "hidden"]
_IN_MTP = [f"layer.{n}" for n in _IN_LAYER[:-1]] + ["hidden"]


_CALL = re.compile(r"^((?:step|row)\.(\d+)\.)(.+)$")     # a decode call's or a padded row's tensors (nested:
                                                         # a padded row of a call, `step.1.row.0.`)
_STEP_TAIL = ["draft_logits", "drafts", "accepted", "cache_length"]


def forward_order(names) -> list[str]:
    """Golden tensor names in forward order: vision (images, then videos), embeddings, each layer
    (indexer, router, hidden), hidden, logits, each MTP depth (its layer, hidden), then the MTP
    logits (the shared head runs after the last depth), losses; unknown names last, sorted. Decode
    calls `step.{s}.*` (q_start first; then the forward; draft_logits, drafts, accepted and
    cache_length last) and padded rows `row.{b}.*` follow each other in that order; then
    `generated`; a call's padded rows follow its own tensors."""
    def key(name):
        m = _ORDER.match(name)
        if m is None:
            return (-1,) if name == "q_start" else (9, _STEP_TAIL.index(name)) if name in _STEP_TAIL else (10, name)
        kind, part, emb, layer, sub, hid, log, depth, msub, loss = m.groups()
        if kind:
            return (0, kind == "video", ["patches", "projected", "features"].index(part))
        if layer:
            return (2, int(layer), _IN_LAYER.index(sub) if sub in _IN_LAYER else len(_IN_LAYER), sub)
        if depth:
            if msub == "logits":
                return (6, int(depth))
            return (5, int(depth), _IN_MTP.index(msub) if msub in _IN_MTP else len(_IN_MTP), msub)
        if loss:
            return (7, ["lm_loss", "mtp_loss", "loss"].index(loss))
        return (1,) if emb else (3,) if hid else (4,)

    def call_key(name):
        m = _CALL.match(name)
        if m:
            return (1, m.group(1).split(".")[0], int(m.group(2)), call_key(m.group(3)))
        return (2,) if name == "generated" else (0, key(name))
    return sorted(names, key=call_key)


def stage(name: str) -> str:
    """The forward stage a tensor belongs to: `layers.i`, `mtp.d` (its layer and hidden; its logits
    come from the stored hidden), `vision.image|video`, else the tensor itself; inside a decode call
    or padded row, prefixed by it (`step.2.layers.1`). With --layerwise every stage starts from
    stored tensors, so a near tie never crosses stages."""
    prefix, name = _split(name)
    m = re.match(r"^(layers\.\d+|mtp\.\d+(?=\.(?:layer|hidden))|vision\.\w+)\.", name)
    return prefix + (m.group(1) if m else name)


def q_start(reference: dict[str, np.ndarray], name: str) -> int:
    """The slot of a selection's first query: the `q_start` of its call (`step.{s}.q_start`: the
    positions cached before it; `step.{s}.row.{b}.q_start`: a padded row's own cached tokens), else 0."""
    prefix = _split(name)[0]
    outer = _CALL.match(prefix)                             # `step.{s}.` of `step.{s}.row.{b}.`
    for p in [prefix] + ([outer.group(1)] if outer else []):
        stored = reference.get(p + "q_start") if p else None
        if stored is not None and np.asarray(stored).size == 1:
            return int(np.asarray(stored).reshape(-1)[0])
    return 0


def forced_blocks(c: int, init_blocks: int, local_blocks: int) -> set[int]:
    """The blocks forced for a query in block c, before the top-k budget: the first `init_blocks`
    blocks and the last `local_blocks` blocks ending at c."""
    return set(range(min(init_blocks, c + 1))) | set(range(max(c - local_blocks + 1, 0), c + 1))


def sparse_rules(config: dict) -> dict | None:
    """Block size and forced blocks from a config.json (upstream `sparse_attention_config` or the
    transformers `index_*` keys, with the reference's defaults); None when it has neither."""
    text = config.get("text_config", config) if isinstance(config, dict) else None
    if not isinstance(text, dict):
        raise Unusable(f"the config must be a JSON object (with an object text_config, if any), got {config!r:.80}")
    s = text.get("sparse_attention_config")
    if isinstance(s, dict):      # rule: (key, default, minimum)
        keys = {"block_size": ("sparse_block_size", 128, 1), "init": ("sparse_init_block", 0, 0),
                "local": ("sparse_local_block", 1, 0)}
    elif "index_block_size" in text:
        s, keys = text, {"block_size": ("index_block_size", 128, 1), "init": (None, 0, 0),
                         "local": ("index_local_blocks", 1, 0)}
    else:
        return None
    rules = {}
    for rule, (key, default, minimum) in keys.items():
        value = s.get(key, default) if key else default
        if not _is_int(value) or value < minimum:
            raise Unusable(f"config key {key} must be an integer >= {minimum}, got {value!r}")
        rules[rule] = value
    return rules


@dataclass
class Rules:
    """What one comparison needs: the reference tensors' specs in forward order (name, shape,
    compare, atol, rtol, scale), the required tensors (what the case exists to pin: its end
    results and more; without one of them there is no verdict), tie_tol, sparse rules."""
    outputs: list[dict]
    required: list[str]
    tie_tol: float
    sparse: dict | None
    dtype: str                    # the model dtype the tolerances assume: float32, bfloat16, float16


def case_rules(entry: dict) -> Rules:
    """The rules of a committed case, from its manifest entry."""
    return Rules(entry["outputs"], entry["required"], entry["tie_tol"], sparse_rules(entry["config"]),
                 entry["dtype"])


def reference_rules(reference: dict[str, np.ndarray], dtypes: dict[str, str], config: dict | None,
                    tol: float | None = None, tie_tol: float | None = None) -> Rules:
    """Rules for any file in the golden naming (model kind): the model dtype is that of `logits`
    (else of the first floating tensor that is not a score); the end results and every MTP depth's
    logits are required (`required_names`); tol / tie_tol override the dtype's values."""
    if not reference:
        raise Unusable("the reference file holds no tensors")
    names = forward_order(reference)
    floats = [n for n in names if reference[n].dtype.kind == "f"]
    model = next((n for n in ["logits"] + floats if n in floats and not n.endswith(SCORES)), None)
    dtype = {"BF16": "bfloat16", "F16": "float16"}.get(dtypes.get(model, "F32"), "float32")
    outputs = []
    for n in names:
        spec = tolerance(n, n in floats, dtype, "model")
        if tol is not None and spec["compare"] == "close":
            spec.update(atol=tol, rtol=tol)
        outputs.append({"name": n, "shape": list(reference[n].shape), **spec})
    sparse = sparse_rules(config) if config is not None else None
    for n in [n for n in names if n.endswith(SELECTIONS)]:
        ids, scores = reference[n], reference.get(n.removesuffix("ids") + "scores")
        if ids.dtype.kind not in "iu" or ids.ndim < 1:
            raise Unusable(f"the reference's {n} must be an integer tensor of choices, got {ids.dtype} {list(ids.shape)}")
        if scores is None or scores.ndim != ids.ndim or scores.shape[:-1] != ids.shape[:-1]:
            raise Unusable(f"the reference's {n} {list(ids.shape)} needs the scores it was chosen from, "
                           f"{n.removesuffix('ids')}scores, with the same leading shape")
        if n.endswith("block_ids"):
            if sparse is None:
                raise Unusable(f"the reference holds {n}: give --config (the model's config.json) so that forced "
                               f"blocks (block size, init and local blocks) are known when classifying near ties")
            S, nb = q_start(reference, n) + scores.shape[-2], scores.shape[-1]
            if nb != -(-S // sparse["block_size"]):
                raise Unusable(f"--config's block size {sparse['block_size']} gives {-(-S // sparse['block_size'])} "
                               f"blocks for {S} positions, but the reference's block_scores have {nb}")
    return Rules(outputs, required_names(names), tie_tolerance(dtype) if tie_tol is None else tie_tol, sparse,
                 dtype)


def end_results(names: list[str]) -> list[str]:
    """A reference file's end results: `logits`; else every decode call's or padded row's logits
    and `generated`; else its last tensor in forward order."""
    ends = [n for n in names if n in ("logits", "generated") or re.fullmatch(r"(?:step|row)\.\d+\.logits", n)]
    return ["logits"] if "logits" in ends else ends or names[-1:]


def required_names(names: list[str]) -> list[str]:
    """What a file in the golden naming pins beyond its end results: every MTP depth's logits (a
    drafter with the wrong conventions leaves the main logits as they are)."""
    mtp = [n for n in names if re.fullmatch(r"(?:(?:step|row)\.\d+\.)?mtp\.\d+\.logits", n)]
    return forward_order(set(end_results(names)) | set(mtp))


# ---- comparison -----------------------------------------------------------------------------

def _where(index: int, shape) -> str:
    return str([int(i) for i in np.unravel_index(index, shape)]) if shape else "[]"


def _close(spec: dict, ref: np.ndarray, got: np.ndarray) -> dict:
    """Elementwise |got - ref| <= atol + rtol * scale, scale = |ref| or the largest finite |ref|.
    Equal values (infinities included) and NaN against NaN match; any other NaN fails. The relative
    error printed is |got - ref| / |ref|, and the absolute error where the reference is 0."""
    r, g = ref.astype(np.float64), got.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        diff = np.where((r == g) | (np.isnan(r) & np.isnan(g)), 0.0, np.abs(g - r))
        diff = np.where(np.isnan(diff), np.inf, diff)
        scale = np.abs(np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0))
        if spec.get("scale") == "max":
            scale = scale.max(initial=0.0)
        over = diff > spec["atol"] + spec["rtol"] * scale
        rel = np.where(r == 0, diff, diff / np.abs(r))
    row = {"abs": float(diff.max(initial=0.0)), "rel": float(np.nan_to_num(rel, nan=np.inf).max(initial=0.0)),
           "tol": f"{spec['atol']:g}+{spec['rtol']:g}{'*max|x|' if spec.get('scale') == 'max' else '|x|'}",
           "status": "FAIL" if over.any() else "pass", "bad": over}
    if over.any():
        worst = int(np.argmax(np.where(over, diff, -1.0)))
        counts = [(int(not g.any() and r.any()), "all zero where the reference is not (no gradient?)"),
                  (int((np.isnan(g) & ~np.isnan(r)).sum()), "NaN"),
                  (int((np.isinf(g) & np.isfinite(r)).sum()), "inf where the reference is finite"),
                  (int((np.isinf(r) & (g != r)).sum()), "not the reference's inf (mask with -inf, not a "
                                                        "large finite value)")]
        row["note"] = ", ".join([f"{int(over.sum())} of {r.size} over, worst at {_where(worst, r.shape)}"]
                                + [what if what.startswith("all zero") else f"{k} {what}" for k, what in counts if k])
    return row


def similarity(ref: np.ndarray, got: np.ndarray) -> tuple[float, float | None]:
    """(cosine similarity, PCC) of two tensors of one shape, in float64 over every element: the
    cosine r.g / (|r| |g|) and the Pearson correlation of the flattened values (tt-metal's
    comp_pcc). Both are 1 where the tensors are equal; a NaN or Inf that the other tensor does not
    hold at the same place makes both 0 (no similarity excuses it); an all-zero or constant
    tensor against a different one is 0. PCC is None for fewer than 2 elements (undefined)."""
    r, g = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    finite = np.isfinite(r)
    if not np.array_equal(finite, np.isfinite(g)) or not np.array_equal(r[~finite], g[~finite], equal_nan=True):
        return 0.0, (0.0 if r.size >= 2 else None)
    r, g = r[finite], g[finite]
    if np.array_equal(r, g):
        return 1.0, (1.0 if ref.size >= 2 else None)

    def ratio(a, b):
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        return float(np.dot(a, b) / norm) if norm > 0 else 0.0
    return ratio(r, g), (ratio(r - r.mean(), g - g.mean()) if ref.size >= 2 else None)


def _pcc_criterion(row: dict, ref: np.ndarray, got: np.ndarray, pcc: float) -> None:
    """--pcc: a floating tensor of 2 or more elements passes when its PCC reaches `pcc`, in place of
    the dtype tolerance (a scalar keeps the tolerance: one value has no correlation)."""
    if row["pcc"] is None:
        return
    ok = row["pcc"] >= pcc
    row.update(tol=f"pcc>={pcc:g}", status="pass" if ok else "FAIL",
               bad=np.zeros(ref.shape, bool) if ok else np.ones(ref.shape, bool),
               note="" if ok else f"pcc {row['pcc']:.6f} < {pcc:g} (max abs {row['abs']:.2e})")


def _selections(name: str, ref: np.ndarray, got: np.ndarray, scores: np.ndarray, rules: Rules,
                first: int = 0) -> dict:
    """Choices compared as sets per row (order, -1 padding and repeats ignored). A differing row is
    a near tie when both sets have the same size, every block/expert swapped in is a valid candidate
    (a causal block, finite score), none swapped out was forced, and the swapped-in ones score, by
    the reference scores, less than tie_tol below the swapped-out ones; otherwise it diverges.
    Block queries sit at slots first, first + 1, ... (first: the decode call's q_start). `bad` and
    `tied` mark the diverging and the near-tie rows (shape: ref's without its last axis)."""
    blocks = name.endswith("block_ids")
    if blocks and rules.sparse is None:
        raise Unusable(f"{name}: forced blocks are unknown (no sparse_attention_config in the config)")
    k = ref.shape[-1]
    ref_rows, got_rows, score_rows = ref.reshape(-1, k), got.reshape(-1, k), scores.reshape(-1, scores.shape[-1])
    S = ref.shape[-2] if blocks else None
    bad, tied = np.zeros(len(ref_rows), bool), np.zeros(len(ref_rows), bool)
    worst_gap, first_bad = 0.0, None
    for r in np.nonzero((np.sort(ref_rows, -1) != np.sort(got_rows, -1)).any(-1))[0]:
        a, b = set(ref_rows[r].tolist()) - {-1}, set(got_rows[r].tolist()) - {-1}
        if a == b:
            continue
        gap, why = _swap_gap(a, b, score_rows[r], (first + r % S) // rules.sparse["block_size"] if blocks else None,
                             rules)
        if gap < rules.tie_tol:
            tied[r], worst_gap = True, max(worst_gap, gap)
            continue
        bad[r] = True
        if first_bad is None:
            first_bad = f"first at {_where(r, ref.shape[:-1])}: {sorted(a)} -> {sorted(b)}, {why}"
    differ, diverge = int(bad.sum() + tied.sum()), int(bad.sum())
    row = {"abs": differ, "tol": f"sets, tie<{rules.tie_tol:g}",
           "status": "FAIL" if diverge else "near tie" if differ else "pass",
           "bad": bad.reshape(ref.shape[:-1]), "tied": tied.reshape(ref.shape[:-1])}
    if diverge:
        row["note"] = f"{diverge} of {ref_rows.shape[0]} rows beyond a near tie, {first_bad}"
    elif differ:
        row["note"] = f"{differ} rows swap choices within {worst_gap:.3g} of a tie"
    return row


def _swap_gap(a: set, b: set, s: np.ndarray, c: int | None, rules: Rules) -> tuple[float, str]:
    """For reference choices a and theirs b (a row's sets) with reference scores s: the score gap of
    the swap (inf when it is no valid swap) and why. c is the query's block for block ids."""
    out_, in_ = a - b, b - a
    if len(a) != len(b):
        return float("inf"), f"{len(b)} choices where the reference has {len(a)}"
    if any(not 0 <= n < s.size for n in in_):
        return float("inf"), f"id {max(in_)} out of range (0..{s.size - 1})"
    if c is not None:
        if max(in_) > c:
            return float("inf"), f"block {max(in_)} is after the query's own block {c}"
        dropped = out_ & forced_blocks(c, rules.sparse["init"], rules.sparse["local"])
        if dropped:
            return float("inf"), f"forced block {sorted(dropped)} dropped"
    if not all(np.isfinite(s[n]) for n in in_):
        return float("inf"), "a choice without a finite reference score"
    gap = float(min(s[n] for n in out_) - max(s[n] for n in in_))
    return gap, f"score gap {gap:.3g} >= tie_tol {rules.tie_tol:g}"


def _kind_problem(name: str, spec: dict, got: np.ndarray) -> str | None:
    need, what = ("f", "a floating") if spec["compare"] == "close" else ("iu", "an integer")
    if name.endswith("block_ids"):
        need, what = "i", "a signed integer (-1 pads unused slots)"
    if got.dtype.kind not in need:
        return f"dtype {got.dtype}: {what} tensor is expected"
    return None


def _in_id_order(weights: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
    """Router weights reordered per row as their own expert ids sorted ascending (the golden's
    order), so that weights stored in top-k order compare; as given when there are no usable ids."""
    if ids is None or ids.shape != weights.shape or ids.dtype.kind not in "iu":
        return weights
    return np.take_along_axis(weights, np.argsort(ids, axis=-1, kind="stable"), axis=-1)


# ---- near ties: what a tie can have caused --------------------------------------------------

_STATE = re.compile(r"^(?:embeddings|hidden|layers\.\d+\.hidden|mtp\.\d+\.hidden)$")       # the residual stream
_TOKENS = re.compile(r"^(?:embeddings|hidden|logits|out|layers\.\d+\.hidden|mtp\.\d+\.(?:hidden|logits))$")


def _split(name: str) -> tuple[str, str]:
    """(the call prefix: `step.{s}.`, `row.{b}.` or both nested, else "", and the name inside it)."""
    prefix = ""
    while (call := _CALL.match(name)) is not None:
        prefix, name = prefix + call.group(1), call.group(3)
    return prefix, name


def sites(name: str, reference: dict[str, np.ndarray], mask: np.ndarray) -> dict[int, float] | None:
    """Where the marked elements of a tensor sit in the token sequence: {batch row: earliest position},
    or None for a tensor without token axes (losses, counts, vision tensors). Layouts: [B, S, ...] for
    the stream (`embeddings`, `hidden`s, `logits`, a component's `out`), [B, Hi, S, ...] for the
    indexer, [B*S, ...] for the router (S from the call's logits); a padded row's tensors are row b
    of the batch, a decode call's positions start at its q_start, and `generated` [B, n] comes after
    every prompt position."""
    prefix, base = _split(name)
    if base == "generated":
        return {int(b): np.inf for b in np.nonzero(mask.reshape(mask.shape[0], -1).any(-1))[0]}
    if _TOKENS.match(base) and mask.ndim >= 2:
        b, p = np.nonzero(mask.reshape(*mask.shape[:2], -1).any(-1))
    elif "indexer.block_" in base and mask.ndim >= 3:
        b, p = np.nonzero(mask.reshape(*mask.shape[:3], -1).any(-1).any(1))
    elif base.startswith("router.") or ".router." in base:
        S = next((reference[prefix + n].shape[1] for n in ("logits", "out", "embeddings")
                  if prefix + n in reference and reference[prefix + n].ndim >= 3), None)
        if S is None:
            return None
        t = np.nonzero(mask.reshape(mask.shape[0], -1).any(-1))[0]
        b, p = t // S, t % S
    else:
        return None
    row = re.search(r"row\.(\d+)\.$", prefix)
    if row:                                                   # a padded row's tensor: batch row b alone
        b = np.full_like(b, int(row.group(1)))
    first = {}
    for row, pos in zip(b.tolist(), (p + q_start(reference, name)).tolist()):
        first[row] = min(first.get(row, np.inf), pos)
    return first


def _cause(ties: list[dict], where: dict[int, float] | None) -> str | None:
    """The earliest of the ties in effect that can have caused failures at `where` (every failing
    batch row at or after a tie's position in that row); None when some failure has no such tie."""
    if where is None:
        return ties[0]["name"] if ties else None
    causes = [next((i for i, t in enumerate(ties) if t["sites"].get(b, np.inf) <= p), None) for b, p in where.items()]
    return None if not causes or None in causes else ties[min(causes)]["name"]


def with_derived(reference: dict[str, np.ndarray], specs: list[dict]) -> dict[str, np.ndarray]:
    """The tensors with their derived ones: a spec with `from` [[sign, name], ...] is the signed
    sum of those stored tensors, in float64, stored as float32 (the gradient of one loss term as the
    whole loss's minus the other term's: exact in real arithmetic, so golden/ stores two of three).
    A file of yours that lacks a derived tensor but holds its sources gets it the same way."""
    out = dict(reference)
    for spec in specs:
        if "from" in spec and spec["name"] not in out:
            parts = [(sign, reference.get(name)) for sign, name in spec["from"]]
            if any(t is None for _, t in parts):
                raise Unusable(f"the reference lacks {[n for (_, n), (_, t) in zip(spec['from'], parts) if t is None]}, "
                               f"from which {spec['name']} is derived")
            out[spec["name"]] = sum(sign * t.astype(np.float64) for sign, t in parts).astype(np.float32)
    return out


def _given(theirs: dict[str, np.ndarray], spec: dict) -> np.ndarray | None:
    """Your tensor for a reference row: as given, or a derived one from your own sources (as the
    reference's is derived), or None."""
    if spec["name"] in theirs or "from" not in spec or not all(n in theirs for _, n in spec["from"]):
        return theirs.get(spec["name"])
    return with_derived(theirs, [spec])[spec["name"]]


def _floats(row: dict, spec: dict, ref: np.ndarray, got: np.ndarray, theirs: dict, pcc: float | None) -> None:
    """A floating tensor's row: the tolerance (or --pcc) verdict, max errors, cosine and PCC;
    router weights first put in their ids' ascending order."""
    if spec["name"].endswith("router.weights"):
        got = _in_id_order(got, theirs.get(spec["name"].removesuffix("weights") + "ids"))
    row.update(_close(spec, ref, got))
    row["cos"], row["pcc"] = similarity(ref, got)
    if pcc is not None:
        _pcc_criterion(row, ref, got, pcc)


def compare(rules: Rules, reference: dict[str, np.ndarray], theirs: dict[str, np.ndarray],
            layerwise: bool = False, pcc: float | None = None) -> list[dict]:
    """One row per reference tensor in forward order: name, shape, max abs / rel error (rows that
    differ, for sets), tolerance, status (pass, FAIL, near tie, missing), note, and `after`: for a
    failure, the near tie that can have caused it (None: no tie explains it); otherwise the first
    near tie still in effect. A near tie is in effect for the tensors after it (with layerwise: of
    its own stage) until a residual-stream tensor of its own call passes (`embeddings`,
    `layers.{i}.hidden`, `hidden`, `mtp.{d}.hidden`: what follows is computed from it), and explains
    failures only in its own batch rows, at or after its own positions (`sites`). Floating tensors
    also get `cos` and `pcc` (`similarity`); with `pcc` set, that is their criterion."""
    rows, ties, reference = [], [], with_derived(reference, rules.outputs)
    for spec in rules.outputs:
        name = spec["name"]
        ref, (call, base) = reference[name], _split(name)
        active = [t for t in ties if not layerwise or t["stage"] == stage(name)]
        row = {"name": name, "shape": list(ref.shape), "abs": None, "rel": None, "tol": "", "note": "",
               "after": active[0]["name"] if active else None, "cos": None, "pcc": None}
        rows.append(row)
        got = _given(theirs, spec)
        if got is None:
            row["status"] = "missing"
            continue
        problem = (f"shape {list(got.shape)}, expected {list(ref.shape)}" if list(got.shape) != list(ref.shape)
                   else _kind_problem(name, spec, got))
        if problem:                                   # no near tie changes a shape or a dtype
            row.update(status="FAIL", note=problem, after=None)
            continue
        if spec["compare"] == "set":
            row.update(_selections(name, ref, got, reference[name.removesuffix("ids") + "scores"], rules,
                                   q_start(reference, name)))
        elif spec["compare"] == "exact":
            bad = np.asarray(got, np.int64) != np.asarray(ref, np.int64)
            row.update(tol="exact", status="FAIL" if bad.any() else "pass", bad=bad,
                       note=f"{int(bad.sum())} of {ref.size} differ, first at {_where(int(np.argmax(bad)), ref.shape)}"
                       if bad.any() else "")
        else:
            _floats(row, spec, ref, got, theirs, pcc)
        if "from" in spec and spec["name"] not in theirs:
            row["note"] = "; ".join(filter(None, [row["note"], "derived from your " + ", ".join(n for _, n in spec["from"])]))
        bad, tied = row.pop("bad"), row.pop("tied", None)
        if row["status"] == "FAIL":
            row["after"] = _cause(active, sites(name, reference, bad)) if active else None
        if tied is not None and tied.any():
            ties.append({"name": name, "call": call, "stage": stage(name), "sites": sites(name, reference, tied) or {}})
        elif row["status"] == "pass" and _STATE.match(base):
            ties = [t for t in ties if t["call"] != call]
    return rows


def _names(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def verdict(rules: Rules, rows: list[dict], layerwise: bool = False, pcc: float | None = None) -> tuple[int, str]:
    """The exit status and its one-line reason (with --pcc, naming that criterion)."""
    status, reason = _verdict(rules, rows, layerwise)
    return status, reason + (f"; criterion PCC >= {pcc:g} for floating tensors, not the dtype tolerance"
                             if pcc is not None else "")


def _verdict(rules: Rules, rows: list[dict], layerwise: bool) -> tuple[int, str]:
    """The first that applies: 1 a failure no near tie explains; 2 nothing compared, or a required
    tensor missing; 3 failures, each explained by a near tie; else 0, saying how many of the
    optional intermediates were not given."""
    failed = [r for r in rows if r["status"] == "FAIL"]
    plain = [r for r in failed if r["after"] is None]
    given = {r["name"] for r in rows if r["status"] != "missing"}
    absent = [n for n in rules.required if n not in given]
    if plain:
        return DIVERGED, f"first divergence: {plain[0]['name']}"
    if not given:
        return UNUSABLE, (f"nothing compared: the file holds none of the {len(rows)} reference tensors "
                          f"(check the names against --list)")
    if absent:
        return UNUSABLE, (f"required {'tensor' if len(absent) == 1 else 'tensors'} missing: {_names(absent)} "
                          f"(what the case exists to pin, see --list); no verdict without them")
    if failed:
        first = failed[0]
        how = ("the failure is inside the tie's own stage: run that stage on the stored selection "
               "(README, 'Layer by layer')" if layerwise else
               "check layer by layer from the stored inputs (README, 'Layer by layer') and rerun with --layerwise")
        return INCONCLUSIVE, (f"first divergence: {first['name']}, after the near tie in {first['after']}: "
                              f"inconclusive. A near tie lets a correct implementation take another path; {how}")
    optional = len(rows) - len(rules.required)
    missing = len(rows) - len(given)
    text = f"pass, {missing} of {optional} intermediates not given" if missing else f"pass, all {len(rows)} compared"
    text += " (with near ties)" if any(r["status"] == "near tie" for r in rows) else ""
    return PASS, text


def report(title: str, rules: Rules, rows: list[dict], extra: list[str] = (), layerwise: bool = False,
           pcc: float | None = None) -> int:
    """Print the forward-ordered table (with layerwise or pcc: each floating tensor's cosine
    similarity and PCC beside its max abs error) and the verdict; return the exit status."""
    status, reason = verdict(rules, rows, layerwise, pcc)
    similar = layerwise or pcc is not None
    counts = {s: sum(r["status"] == s for r in rows) for s in ("missing", "FAIL", "near tie")}
    print(f"\n{title}: {len(rows) - counts['missing']} tensors compared, {counts['missing']} missing, "
          f"{counts['FAIL']} failed, {counts['near tie']} near ties")
    print(f"  {'tensor':<39} {'shape':<18}{'max abs':>10}{'max rel':>10}" + (f"{'cos':>10}{'pcc':>10}" if similar else "")
          + f"  {'tolerance':<27}status")
    num = lambda v: "" if v is None else (f"{v}" if isinstance(v, int) else f"{v:.2e}")
    sim = lambda v: "" if v is None else f"{v:.6f}"
    required = set(rules.required)
    for r in rows:
        after = "  (after a near tie)" if r["after"] and r["status"] != "missing" else ""
        note = f"  {r['note']}" if r["note"] else ""
        status_text = "MISSING (required)" if r["status"] == "missing" and r["name"] in required else r["status"]
        print(f"  {r['name']:<39} {str(r['shape']):<18}{num(r['abs']):>10}{num(r['rel']):>10}"
              + (f"{sim(r['cos']):>10}{sim(r['pcc']):>10}" if similar else "") + f"  {r['tol']:<27}{status_text}{after}{note}")
    for line in extra:
        print(f"  {line}")
    print(f"  {VERDICTS[status]} (exit {status}): {reason}")
    return status


def worst(statuses) -> int:
    """Several verdicts as one: any divergence, else any unusable input, else any inconclusive."""
    statuses = set(statuses)
    return next((s for s in (DIVERGED, UNUSABLE, INCONCLUSIVE) if s in statuses), PASS)


def check(title: str, rules: Rules, reference: dict, theirs: dict, layerwise: bool = False,
          their_dtypes: dict[str, str] | None = None, pcc: float | None = None) -> int:
    """Compare, print, and return the exit status; names the reference lacks are listed, and so
    are 16-bit tensors given to a float32 case (their rounding alone can exceed its tolerance)."""
    unknown = sorted(set(theirs) - {s["name"] for s in rules.outputs})
    extra = [f"not in the reference, ignored: {', '.join(unknown)}"] if unknown else []
    narrow = sorted(n for n, d in (their_dtypes or {}).items() if d in ("BF16", "F16") and n not in unknown)
    if narrow and rules.dtype == "float32":
        extra.append(f"stored in 16 bits for a float32 case (save float32): {', '.join(narrow)}")
    return report(title, rules, compare(rules, reference, theirs, layerwise, pcc), extra, layerwise, pcc)


# ---- the committed cases --------------------------------------------------------------------

_CASE_KEYS = {"name": str, "description": str, "kind": str, "dtype": str, "tie_tol": (int, float), "config": dict,
              "inputs": dict, "end_results": list, "required": list, "outputs": list, "files": dict}


def load_manifest(root: Path) -> dict:
    """golden/manifest.json, checked for the format and the keys every case needs."""
    path = Path(root) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Unusable(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != GOLDEN_FORMAT \
            or not isinstance(manifest.get("cases"), list):
        raise Unusable(f"cannot read {path}: it must be an object of format {GOLDEN_FORMAT} with a list of cases")
    for i, case in enumerate(manifest["cases"]):
        bad = [k for k, kind in _CASE_KEYS.items() if not isinstance(case, dict) or not isinstance(case.get(k), kind)]
        bad += [] if bad else [f"outputs[{j}]" for j, o in enumerate(case["outputs"])
                               if not (isinstance(o, dict) and {"name", "shape", "compare"} <= o.keys())]
        if bad:
            raise Unusable(f"cannot read {path}: case {i} lacks or mistypes {', '.join(bad)}")
    return manifest


def find_case(manifest: dict, root: Path, name: str) -> dict:
    entry = next((e for e in manifest["cases"] if e["name"] == name), None)
    if entry is None:
        raise Unusable(f"no case {name!r} in {Path(root) / 'manifest.json'}; cases: "
                       f"{[e['name'] for e in manifest['cases']]}")
    return entry


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_case_files(root: Path, entry: dict) -> Path:
    """The case directory, after checking every file against the manifest's sha256 (a case whose
    weights are another case's, `checkpoint`, lists that case's files as ../<case>/<file>)."""
    path = Path(root) / entry["name"]
    for name, digest in entry["files"].items():
        file = path / name
        if not file.exists():
            raise Unusable(f"{file}: listed in the manifest but missing")
        if sha256(file) != digest:
            raise Unusable(f"{file}: sha256 does not match manifest.json; the file was changed or corrupted "
                           f"(regenerate with `python m3_reference.py golden --out {root}`)")
    return path


def list_cases(entries: list[dict]) -> None:
    for e in entries:
        print(f"{e['name']}  ({e['kind']}, {e['dtype']}, tie_tol {e['tie_tol']:g}): {e['description']}")
        print("  inputs:  " + ", ".join(f"{k} {v}" for k, v in e["inputs"].items()))
        if "checkpoint" in e:
            print(f"  weights: those of case {e['checkpoint']} (its config.json and model.safetensors)")
        if "processor" in e:
            print("  processor: " + ", ".join(f"{k} {v}" for k, v in e["processor"].items()))
        for o in e["outputs"]:
            role = ("  (required, end result)" if o["name"] in e["end_results"]
                    else "  (required)" if o["name"] in e["required"] else "")
            derived = ("  = " + " ".join(f"{'-' if sign < 0 else '+'} {n}" for sign, n in o["from"]).lstrip("+ ")
                       + " (derived, not stored)") if "from" in o else ""
            rule = (f" {o['atol']:g}+{o['rtol']:g}{'*max|x|' if o.get('scale') == 'max' else '|x|'}"
                    if o["compare"] == "close" else "")
            print(f"  {o['name']:<39} {str(o['shape']):<18}{o['dtype']:<10}{o['compare']}{rule}{role}{derived}")


def check_case(root: Path, entry: dict, outputs: Path, layerwise: bool = False, pcc: float | None = None) -> int:
    """One committed case against a file of yours: print the table and return the exit status."""
    theirs = read_safetensors(outputs)
    reference = read_safetensors(check_case_files(root, entry) / "outputs.safetensors")
    return check(entry["name"], case_rules(entry), reference, theirs, layerwise, safetensors_dtypes(outputs), pcc)


def check_all(root: Path, outputs_dir: Path, layerwise: bool = False, pcc: float | None = None) -> int:
    """Every committed case against DIR/<case>.safetensors, then one line per case. A case without
    its file, or with an unreadable one, is unusable (exit 2): --all passes only when all passed."""
    if not outputs_dir.is_dir():
        raise Unusable(f"--outputs-dir {outputs_dir}: not a directory")
    statuses, absent = {}, []
    for entry in load_manifest(root)["cases"]:
        name, file = entry["name"], outputs_dir / f"{entry['name']}.safetensors"
        statuses[name] = UNUSABLE
        if not file.is_file():
            absent.append(name)
            print(f"\n{name}: error: no file {file} (one file per case, named <case>.safetensors)")
            continue
        try:
            statuses[name] = check_case(root, entry, file, layerwise, pcc)
        except Unusable as e:
            print(f"\n{name}: error: {e}")
    print("\nall cases:")
    for name, status in statuses.items():
        print(f"  {name:<32}{VERDICTS[status]} (exit {status})")
    print(f"  {sum(s == PASS for s in statuses.values())} of {len(statuses)} cases pass"
          + (f"; {len(absent)} not given: {_names(absent)}" if absent else ""))
    others = sorted(f.name for f in outputs_dir.glob("*.safetensors") if f.stem not in statuses)
    if others:
        print(f"  not a case, ignored: {', '.join(others)}")
    return worst(statuses.values())


def dump(root: Path, case: str, tensor: str, out: Path) -> int:
    """Write one tensor of a committed case as a .npy file (bfloat16 as float32, exactly). The name
    is looked up in outputs.safetensors, then inputs.safetensors, then model.safetensors; prefix it
    with `outputs:`, `inputs:` or `model:` to choose a file (component-rope has `q` in two)."""
    entry = find_case(load_manifest(root), root, case)
    path = check_case_files(root, entry)
    part, _, name = tensor.rpartition(":")
    parts = [part] if part else ["outputs", "inputs", "model"]
    if not set(parts) <= {"outputs", "inputs", "model"}:
        raise Unusable(f"--dump: {part!r} is not a file of a case (outputs, inputs or model)")
    files = {p: path / rel for p in parts for rel in entry["files"] if Path(rel).name == f"{p}.safetensors"}
    found = [p for p in parts if p in files and name in _header(files[p])[0]]    # a checkpoint case's too
    if not found:
        raise Unusable(f"--dump: case {case} has no tensor {name!r} in its {' / '.join(parts)} file(s) (see --list)")
    array = read_safetensors(files[found[0]])[name]
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
    tmp.replace(out)
    print(f"{case} {found[0]}:{name} {array.dtype} {list(array.shape)} -> {out}")
    return PASS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="exit status: 0 pass, 1 divergence, 2 unusable input, 3 inconclusive "
                                       "(divergence after a near tie)")
    p.add_argument("--root", default=str(Path(__file__).resolve().parent), help="golden directory (default: this one)")
    p.add_argument("--list", action="store_true", help="print the cases (or --case) with their inputs and tensors")
    p.add_argument("--case", help="a committed case to compare against")
    p.add_argument("--all", action="store_true", help="every committed case, from --outputs-dir")
    p.add_argument("--reference", help="a reference .safetensors in the golden naming, instead of --case")
    p.add_argument("--outputs", help="your implementation's tensors (.safetensors), named as the reference")
    p.add_argument("--outputs-dir", help="with --all: a directory of <case>.safetensors files")
    p.add_argument("--config", help="with --reference: the model's config.json (block size, forced blocks)")
    p.add_argument("--tol", type=_tolerance_arg, help="with --reference: atol = rtol instead of the dtype's")
    p.add_argument("--tie-tol", type=_tolerance_arg, help="with --reference: tie_tol instead of the dtype's")
    p.add_argument("--layerwise", action="store_true",
                   help="your tensors were computed stage by stage from the stored inputs: near ties do not "
                        "excuse later stages")
    p.add_argument("--pcc", type=_pcc_arg, help="a floating tensor passes when its Pearson correlation with the "
                   "reference reaches this (e.g. 0.99, for approximate kernels) instead of the dtype tolerance")
    p.add_argument("--dump", nargs=3, metavar=("CASE", "TENSOR", "OUT.npy"),
                   help="write one tensor of a case (outputs, inputs or model weights) as .npy, bf16 as fp32")
    args = p.parse_args(argv)
    given = [f"--{k.replace('_', '-')}" for k in ("list", "dump", "all", "case", "reference", "outputs", "outputs_dir")
             if getattr(args, k) not in (None, False)]
    usage = {"--list": [["--list"], ["--list", "--case"]], "--dump": [["--dump"]], "--all": [["--all", "--outputs-dir"]],
             "--case": [["--case", "--outputs"]], "--reference": [["--reference", "--outputs"]]}
    if given not in usage.get(given[0] if given else "", []):
        p.error(f"got {' '.join(given) or 'no mode'}; give one of: --list [--case C]; --case C --outputs F; "
                f"--all --outputs-dir D; --reference R --outputs F [--config C]; --dump CASE TENSOR OUT.npy")
    if args.pcc is not None and (args.list or args.dump):
        p.error("--pcc is a criterion for comparing outputs: it goes with --case, --all or --reference")
    if args.reference is None and (args.config or args.tol is not None or args.tie_tol is not None):
        p.error("--config, --tol and --tie-tol go with --reference; a case carries its own")
    root = Path(args.root)
    try:
        if args.dump:
            return dump(root, args.dump[0], args.dump[1], Path(args.dump[2]))
        if args.list:
            manifest = load_manifest(root)
            list_cases([find_case(manifest, root, args.case)] if args.case else manifest["cases"])
            return PASS
        if args.all:
            return check_all(root, Path(args.outputs_dir), args.layerwise, args.pcc)
        if args.case is not None:
            return check_case(root, find_case(load_manifest(root), root, args.case), Path(args.outputs), args.layerwise,
                              args.pcc)
        return check_reference(Path(args.reference), Path(args.outputs), args)
    except Unusable as e:
        print(f"error: {e}", file=sys.stderr)
        return UNUSABLE


def check_reference(path: Path, outputs: Path, args) -> int:
    """A file of yours against any reference file in the golden naming (--reference)."""
    theirs, reference = read_safetensors(outputs), read_safetensors(path)
    config = None
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise Unusable(f"cannot read --config {args.config}: {e}") from e
    rules = reference_rules(reference, safetensors_dtypes(path), config, args.tol, args.tie_tol)
    return check(str(path), rules, reference, theirs, args.layerwise, safetensors_dtypes(outputs), args.pcc)


def _tolerance_arg(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError(text)
    return value


_tolerance_arg.__name__ = "finite, non-negative number"      # argparse names the type in its error


def _pcc_arg(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(text)
    return value


_pcc_arg.__name__ = "number in (0, 1]"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:             # the reader stopped reading (`--list | head`): the rest goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(UNUSABLE)
    except Exception:                   # exit 1 means "diverged": an unforeseen crash must not say that
        import traceback
        traceback.print_exc()
        print("error: verify.py failed on this input (traceback above); this is not a verdict", file=sys.stderr)
        sys.exit(UNUSABLE)
