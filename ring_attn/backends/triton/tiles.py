"""Fixed tile tables of the Triton attention kernels, so every process picks the same tiles.

The forward used to autotune by timing: two processes (two ranks, two runs) could pick different tiles and
produce different bits. Now the tile of every launch comes from :func:`fwd_tile` / :func:`bwd_tiles`, a
table keyed by (GPU capability, head dim, dtype, causal, MERGE) chosen from the sm_90 compile report
(``scripts/compile_check.py``; ``benchmarks/NOTES.md`` says why each entry). Timing-based autotuning is
opt-in (``RING_ATTN_AUTOTUNE=1``); its winners can be written out with :func:`dump_tuned` and loaded back
(``RING_ATTN_TILES=path.json``) so a tuned table can be shipped. Under the Triton interpreter every kernel
uses one small tile (16×16, 1 warp), which exercises the tails.

A tile is a dict ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}``.
"""
from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple, Optional

from ring_attn.backends import autotune_mode, forward_variant_mode, interpreter_enabled  # noqa: F401 - re-exported

__all__ = ["FwdKey", "fwd_tile", "fwd_candidates", "bwd_tiles", "bwd_kernel_tile", "smem_estimate", "fits",
           "fwd_acc_regs", "current_arch", "autotune_enabled", "forward_variant_mode", "fwd_tma_tile",
           "dump_tuned", "SMEM_LIMIT", "smem_limit", "check_tile_file", "DECODE_MAX_Q", "fwd_decode_tile", "sm_count",
           "split_count", "MAX_SPLITS"]

# Opt-in shared memory per block, bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute capability
# (90 = sm_90). Capabilities of one major differ: sm_80 A100 163 KB, sm_86/89 (RTX 30xx/40xx, L4, L40) 99 KB.
SMEM_LIMIT = {70: 98304, 72: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
              100: 232448, 103: 232448, 120: 101376}
_SMEM_DEFAULT = 101376  # an unknown capability: the limit of the consumer GPUs


def smem_limit(arch: int) -> int:
    """Shared memory one block may use on compute capability ``arch`` (90 = sm_90), bytes."""
    return SMEM_LIMIT.get(arch, _SMEM_DEFAULT)

INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}


class FwdKey(NamedTuple):
    """Key of the forward tile table. ``arch``: compute capability as an int (90 = sm_90); ``dtype``:
    "bf16" | "fp16" | "fp32"."""
    arch: int
    head_dim: int
    dtype: str
    causal: bool
    merge: bool


def _tile(bm, bn, w, s):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def _dtype_class(dtype: str) -> str:
    return "32" if dtype == "fp32" else "16"


def _elt(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def smem_estimate(tile: dict, head_dim: int, dtype: str, kernel: str = "fwd_kernel") -> int:
    """Static shared-memory estimate, bytes: the stationary tiles once plus ``num_stages`` copies of the
    streamed tiles (what Triton's software pipeliner allocates for loads in the loop). Checked against the
    compiled kernels' ``metadata.shared`` by ``scripts/compile_check.py`` (it reports both)."""
    bd, e, s = _block_d(head_dim), _elt(dtype), tile["num_stages"]
    bm, bn = tile["BLOCK_M"], tile["BLOCK_N"]
    if kernel.startswith("fwd"):          # Q stays; K, V stream
        return bm * bd * e + s * 2 * bn * bd * e
    if "dkdv" in kernel or "fused" in kernel:  # K, V stay; Q, dO (+ lse, delta) stream
        return 2 * bn * bd * e + s * (2 * bm * bd * e + 2 * bm * 4)
    if "dq" in kernel:                    # Q, dO stay; K, V stream
        return 2 * bm * bd * e + s * 2 * bn * bd * e
    return 0


def fwd_acc_regs(tile: dict, head_dim: int) -> float:
    """fp32 registers per thread the forward holds live across its loop: the output accumulator
    ``BLOCK_M × BLOCK_D`` plus the score tile ``BLOCK_M × BLOCK_N``, spread over ``32 · num_warps`` threads."""
    threads = 32 * tile["num_warps"]
    return (tile["BLOCK_M"] * _block_d(head_dim) + tile["BLOCK_M"] * tile["BLOCK_N"]) / threads


# Empirical spill edge of the forward on sm_90 (compile report, benchmarks/NOTES.md): every config at or
# below 144 live fp32 registers per thread compiled with at most 16 B of stack, every config at 160 or
# more spilled 56-1640 B.
FWD_MAX_ACC_REGS = 144


def _smem_shortfall(tile: dict, head_dim: int, dtype: str, arch: int, kernel: str = "fwd_kernel",
                    dims: str = "head dim") -> str:
    """'' when ``tile``'s static shared-memory estimate fits sm_``arch``, else the words of every error that
    says it does not: "needs N B of shared memory at <dims> D <dtype>, over the L B of sm_A"."""
    need, limit = smem_estimate(tile, head_dim, dtype, kernel), smem_limit(arch)
    if need <= limit:
        return ""
    return f"needs {need} B of shared memory at {dims} {head_dim} {dtype}, over the {limit} B of sm_{arch}"


def fits(tile: dict, head_dim: int, dtype: str, arch: int, kernel: str = "fwd_kernel") -> bool:
    """Whether ``tile`` passes the static checks made before compiling: its estimated shared memory fits
    the per-block limit of ``arch``, and (forward) its live accumulators stay under the spill edge."""
    if _smem_shortfall(tile, head_dim, dtype, arch, kernel):
        return False
    return not kernel.startswith("fwd") or fwd_acc_regs(tile, head_dim) <= FWD_MAX_ACC_REGS


# Candidates for opt-in autotuning (before pruning). 4-warp 128-row tiles are left out: on sm_90 they
# spill 1 KB+ at d=128 (compile report), since one warpgroup then holds a 128-row fp32 accumulator.
_FWD_CANDIDATES = [
    _tile(128, 64, 8, 3), _tile(128, 64, 8, 2), _tile(128, 128, 8, 2), _tile(128, 128, 8, 3),
    _tile(64, 64, 4, 3), _tile(64, 64, 4, 4), _tile(64, 32, 4, 4), _tile(64, 32, 4, 3),
    _tile(128, 32, 8, 3), _tile(32, 32, 4, 2),
]


def fwd_candidates(head_dim: int, dtype: str, arch: int) -> list:
    """Autotune candidates for the forward that fit shared memory (pruned before compiling)."""
    return [t for t in _FWD_CANDIDATES if fits(t, head_dim, dtype, arch)]


# The default table. Keys: (capability major, head-dim bucket, dtype class, causal, merge) -> tile; a None
# field matches anything. First match wins. Chosen from the sm_90 report (benchmarks/NOTES.md).
_FWD_TABLE = [
    # Hopper. d64: 111 regs and 64 KB, so two 8-warp programs share an SM (one's softmax overlaps the
    # other's wgmma). d128: the only clean 128-row tile (226 regs, 128 KB, no spill; MERGE 230). d256: the
    # only config of the old list without spills (230 regs, 160 KB); 128-row tiles need > 227 KB.
    ((9, 64, "16", None, None), _tile(128, 64, 8, 3)),
    ((9, 128, "16", None, None), _tile(128, 64, 8, 3)),
    ((9, 256, "16", None, None), _tile(64, 32, 4, 4)),
    # Hopper fp32 (the exact path: `ieee` dots on FMA units, no tensor cores). The larger tiles (M64 N32 w4,
    # the old entry) made ptxas fall to 32 registers and 7-17 KB of stack; these compile with no spill
    # (97 / 210 / 209 registers; benchmarks/NOTES.md). Not measured.
    ((9, 64, "32", None, None), _tile(64, 32, 8, 2)),
    ((9, 128, "32", None, None), _tile(32, 16, 4, 2)),
    ((9, 256, "32", None, None), _tile(32, 32, 8, 2)),
    # Ampere / Ada and anything else (not measured; FA2-like tiles that fit 99 KB)
    ((None, 64, "16", None, None), _tile(128, 64, 4, 2)),
    ((None, 128, "16", None, None), _tile(64, 64, 4, 2)),
    ((None, None, None, None, None), _tile(64, 32, 4, 2)),
]
_loaded: Optional[dict] = None


def _bucket(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def _overrides() -> dict:
    """Tiles loaded from ``RING_ATTN_TILES``: a JSON list of forward records (as :func:`dump_tuned` writes:
    arch, head_dim, dtype, causal, merge, BLOCK_M, BLOCK_N, num_warps, num_stages), keyed by FwdKey, and
    backward records (``"op": "bwd"``, arch, head_dim, dkdv, dq, num_warps, num_stages and an optional dtype:
    absent, the record serves fp16/bf16; ``"fp32"``, fp32), keyed by (capability, head-dim bucket, dtype
    class). A file that cannot be read, a malformed or repeated record, an unknown field, or a tile over its
    GPU's shared memory raises ValueError naming the variable, the record and what was expected. Only shared
    memory is checked: a listed tile may spill. The file is read once per value of the variable (a file edited
    during a run does not change the tiles, and so the bits, half way); a failed read is retried at every call."""
    global _loaded
    path = os.environ.get("RING_ATTN_TILES", "")
    if _loaded is None or _loaded.get("__path__") != path:
        loaded = {"__path__": path}
        if path:
            loaded.update(_read_tile_file(path))
        _loaded = loaded
    return _loaded


def check_tile_file() -> None:
    """Read and check ``RING_ATTN_TILES`` now (ValueError naming the variable and the record), not first inside a
    kernel launch. ``ring_attn.backends.check_kernel_settings`` calls it, with the other kernel switches, before
    every attention call reaches a backend, on every path (decode, split-KV, the interpreter, the CPU
    backends)."""
    _overrides()


_TILE_DTYPES = ("bf16", "fp16", "fp32")
_FWD_FIELDS = frozenset({"op", "arch", "head_dim", "dtype", "causal", "merge", "BLOCK_M", "BLOCK_N", "num_warps",
                         "num_stages"})
_BWD_FIELDS = frozenset({"op", "arch", "head_dim", "dtype", "dkdv", "dq", "num_warps", "num_stages"})


def _read_tile_file(path: str) -> dict:
    where = f"RING_ATTN_TILES={path!r}"
    try:
        with open(path) as f:
            recs = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"{where}: cannot read it as a JSON tile table ({type(exc).__name__}: {exc})") from None
    if not isinstance(recs, list):
        raise ValueError(f"{where}: expected a JSON list of tile records (as tiles.dump_tuned writes), got a "
                         f"{type(recs).__name__}")
    out = {}
    for i, rec in enumerate(recs):
        here = f"{where}, record {i}"
        if not isinstance(rec, dict):
            raise ValueError(f"{here}: expected a JSON object, got {rec!r}")

        def field(name, ok, expected, rec=rec, here=here):
            if name not in rec:
                raise ValueError(f"{here}: the field {name!r} is missing ({expected})")
            value = rec[name]
            if not ok(value):
                raise ValueError(f"{here}: {name}={value!r}; expected {expected}")
            return value

        fields = _BWD_FIELDS if rec.get("op") == "bwd" else _FWD_FIELDS
        unknown = sorted(set(rec) - fields)
        if unknown:
            kind = "backward" if fields is _BWD_FIELDS else "forward"
            raise ValueError(f"{here}: unknown field(s) {unknown}; a {kind} record has {sorted(fields)}")
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        block = lambda v: is_int(v) and 16 <= v <= 256 and v & (v - 1) == 0  # noqa: E731
        pair = lambda v: isinstance(v, list) and len(v) == 2 and all(block(x) for x in v)  # noqa: E731
        arch = field("arch", lambda v: is_int(v) and 50 <= v < 1000, "a compute capability as an int, e.g. 90 "
                     "for sm_90")
        head_dim = field("head_dim", lambda v: is_int(v) and 1 <= v <= 256, "an int in [1, 256]")
        warps = field("num_warps", lambda v: v in (1, 2, 4, 8, 16) and is_int(v), "1, 2, 4, 8 or 16")
        stages = field("num_stages", lambda v: is_int(v) and 1 <= v <= 8, "an int in [1, 8]")
        op = field("op", lambda v: v in ("fwd", "bwd"), "'fwd' or 'bwd'") if "op" in rec else "fwd"
        if op == "bwd":  # {"op": "bwd", "arch", "head_dim", "dkdv", "dq", ...}
            dkdv, dq = (field(n, pair, "[BLOCK_M, BLOCK_N], powers of two in [16, 256]") for n in ("dkdv", "dq"))
            dtype = field("dtype", lambda v: v in _TILE_DTYPES, f"one of {_TILE_DTYPES} (absent: fp16/bf16)") \
                if "dtype" in rec else "bf16"
            key = ("bwd", arch, _bucket(head_dim), _dtype_class(dtype))
            if key in out:
                raise ValueError(f"{here}: a second backward record for sm_{arch}, head dims of bucket "
                                 f"{_bucket(head_dim)}, {'fp32' if key[3] == '32' else 'fp16/bf16'}")
            over = dict(dkdv=tuple(dkdv), dq=tuple(dq), num_warps=warps, num_stages=stages)
            for which, kernel in (("dkdv", "bwd_dkdv_kernel"), ("dq", "bwd_dq_kernel")):
                short = _smem_shortfall(bwd_kernel_tile(over, which), _bucket(head_dim), dtype, arch, kernel,
                                        "head dims up to")  # (the record serves its whole bucket)
                if short:
                    raise ValueError(f"{here}: the {which} tile {over[which]} {short}")
            out[key] = over
            continue
        dtype = field("dtype", lambda v: v in _TILE_DTYPES, f"one of {_TILE_DTYPES}")
        causal, merge = (field(n, lambda v: isinstance(v, bool), "true or false") for n in ("causal", "merge"))
        tile = _tile(*(field(n, block, "a power of two in [16, 256]") for n in ("BLOCK_M", "BLOCK_N")), warps,
                     stages)
        short = _smem_shortfall(tile, head_dim, dtype, arch)
        if short:
            raise ValueError(f"{here}: the tile {tile} {short}")
        key = FwdKey(arch, head_dim, dtype, causal, merge)
        if key in out:
            raise ValueError(f"{here}: a second forward record for {key}")
        out[key] = tile
    return out


def fwd_tile(key: FwdKey) -> dict:
    """The forward tile for ``key``: from ``RING_ATTN_TILES`` if it lists the key, else the fixed table.
    Under the interpreter: the small interpreter tile."""
    if interpreter_enabled():
        return dict(INTERPRETER_TILE)
    over = _overrides().get(key)
    if over is not None:
        return dict(over)
    want = (key.arch // 10, _bucket(key.head_dim), "32" if key.dtype == "fp32" else "16", key.causal, key.merge)
    for pattern, tile in _FWD_TABLE:
        if all(p is None or p == w for p, w in zip(pattern, want)):
            if fits(tile, key.head_dim, key.dtype, key.arch):
                return dict(tile)
    return _tile(16, 16, 4, 1)  # no entry fits (sm_75 fp32 at d > 128): the smallest tile (48 KB at d=256 fp32)


# Launches whose longest query sequence has at most this many rows (decoding: 1 new token, or a few with
# speculative decoding) take the decode tile: a 128-row block would compute 127 masked-out rows per token.
DECODE_MAX_Q = 16
# sm_90 decode tiles (compile report, benchmarks/NOTES.md): 16 query rows (the smallest tl.dot: mma.sync
# m16n8k16; a 128-row tile would compute 8x the useless rows), 32 KB of K+V per 3-stage step at d <= 128
# (d256: 32 KB too), no spill, 72-75 KB of shared memory so three programs share an SM: decoding is bound by
# reading the cache, and this keeps ~190 KB of loads in flight per SM.
_FWD_DECODE_TABLE = [
    ((9, 64, "16"), _tile(16, 128, 4, 3)),   # 128 regs, 72 KB
    ((9, 128, "16"), _tile(16, 64, 4, 3)),   # 123 regs, 72 KB
    ((9, 256, "16"), _tile(16, 32, 4, 3)),   # 138 regs, 75 KB
    ((9, 256, "32"), _tile(16, 16, 4, 2)),   # fp32: 192 regs, no spill (16x32: 32 regs and 6.5 KB of stack)
    ((None, None, None), _tile(16, 32, 4, 2)),
]


def fwd_decode_tile(key: FwdKey) -> dict:
    """The forward tile for a launch whose longest query sequence has at most :data:`DECODE_MAX_Q` rows
    (``RING_ATTN_TILES`` does not cover it; autotuning does not either). Under the interpreter: the small
    interpreter tile (already 16 rows)."""
    if interpreter_enabled():
        return dict(INTERPRETER_TILE)
    want = (key.arch // 10, _bucket(key.head_dim), "32" if key.dtype == "fp32" else "16")
    for pattern, tile in _FWD_DECODE_TABLE:
        if all(p is None or p == w for p, w in zip(pattern, want)) and fits(tile, key.head_dim, key.dtype,
                                                                              key.arch):
            return dict(tile)
    return _tile(16, 32, 4, 1)


# Split-KV: at most this many key ranges per (query block, head) (also under CUDA's 65535 grid limit).
MAX_SPLITS = 128
# Each split visits at least this many key blocks, so its q load, epilogue and partial write stay small next
# to its loop.
_MIN_BLOCKS_PER_SPLIT = 4


def sm_count() -> int:
    """Streaming multiprocessors of the current CUDA device; 132 (an H100 SXM, the compile report's target)
    when there is none."""
    import torch

    if torch.cuda.is_available():
        return _device_sms(torch.cuda.current_device())
    return 132


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def split_count(programs: int, key_blocks: int, sms: int) -> int:
    """How many key ranges (split-KV) a forward launch of ``programs`` programs (query blocks x batch x heads),
    each over up to ``key_blocks`` key blocks, should be cut into on a GPU with ``sms`` SMs: 1 when the grid
    already fills the GPU (>= 80 % of the SMs busy) or the keys are few; else the count whose last wave is
    fullest, the smallest within 15 % of the best (fewer splits: less partial output to combine), with at
    least :data:`_MIN_BLOCKS_PER_SPLIT` key blocks per split and at most :data:`MAX_SPLITS` splits (flash-attn
    decides the same way for its decoding kernel)."""
    if programs <= 0 or programs >= 0.8 * sms:
        return 1
    cap = min(MAX_SPLITS, key_blocks // _MIN_BLOCKS_PER_SPLIT)
    if cap < 2:
        return 1

    def efficiency(n: int) -> float:
        total = programs * n
        waves = -(-total // sms)
        return total / (waves * sms)

    best = max(efficiency(n) for n in range(1, cap + 1))
    return next(n for n in range(1, cap + 1) if efficiency(n) >= 0.85 * best)


def bwd_tiles(head_dim: int, arch: int = 90, dtype: str = "bf16") -> dict:
    """Backward tiles ``{"dkdv": (BLOCK_M, BLOCK_N), "dq": (BLOCK_M, BLOCK_N), "num_warps", "num_stages"}``
    for a GPU of capability ``arch`` (90 = sm_90) and storage ``dtype`` ("bf16" | "fp16" | "fp32")
    (``RING_ATTN_TILES`` may override them per capability and head-dim bucket).
    dK/dV: BLOCK_N keys stay, BLOCK_M query rows stream; dQ: BLOCK_M query rows stay, BLOCK_N keys stream.
    Fixed (never autotuned) so the reduction order, and hence every gradient bit, is the same everywhere."""
    if dtype not in _TILE_DTYPES:
        raise ValueError(f"bwd_tiles: dtype {dtype!r}; expected one of {_TILE_DTYPES}")
    if interpreter_enabled():
        return dict(dkdv=(16, 16), dq=(16, 16), num_warps=1, num_stages=1)
    over = _overrides().get(("bwd", arch, _bucket(head_dim), _dtype_class(dtype)))
    # sm_90 compile report (benchmarks/NOTES.md). 8 warps = two warpgroups, and each wgmma covers 64 rows
    # of its output, so the stationary side must be 128 rows (keys for dK/dV, queries for dQ): with 64 rows
    # both warpgroups computed the same Kᵀ·Q and dPᵀ tiles (the old 64-key dK/dV: 96 of 108 wgmma m64n16).
    # d<=64: every wgmma m64n64, no spill. d<=128: dK/dV streams 32 query rows (m64n32 for the score tiles,
    # m64n128 for dK/dV; 216 B stack, touched only between the inner loops), dQ m64n64/m64n128, no spill.
    # d=256: the 128-key dK/dV spills 1 KB (its fp32 dK+dV alone are 256 registers per thread), so dK/dV
    # keeps 64 keys (104 B); dQ takes 128 rows (no spill, m64n32 instead of m64n8).
    if over is not None:  # RING_ATTN_TILES lists backward tiles for this capability, head dims and dtype class
        return dict(over)  # (checked against shared memory when the file was read)
    if arch // 10 == 9 and dtype == "fp32":
        # fp32 (`ieee` dots on FMA units): the 16-bit tiles made ptxas fall to 32 registers and 8-27 KB of
        # stack; these compile with no spill (d=256 dK/dV: 24 B; benchmarks/NOTES.md). Not measured.
        t = dict(dkdv=(16, 64), dq=(64, 16), num_warps=8, num_stages=2)
        return t if head_dim <= 128 else dict(t, dkdv=(16, 32), dq=(32, 16))
    if head_dim <= 64:
        t = dict(dkdv=(64, 128), dq=(128, 64), num_warps=8, num_stages=2)
    elif head_dim <= 128:
        t = dict(dkdv=(32, 128), dq=(128, 64), num_warps=8, num_stages=2)
    else:
        t = dict(dkdv=(16, 64), dq=(128, 32), num_warps=8, num_stages=2)
    # Only sm_90 16-bit has been examined, and there every tile above fits. Elsewhere (smaller shared memory:
    # sm_80 163 KB, sm_86/89 99 KB; fp32's 4-byte tiles) a tile over the limit would fail at launch (e.g. the
    # d=256 dQ tile needs 168 KB on sm_80/89, 336 KB in fp32 on sm_90), so it is shrunk until the static estimate
    # fits: the streamed side halves first, then the stationary side. Still a pure function of the key.
    return dict(t, dkdv=_shrink_to_fit(t, "dkdv", head_dim, dtype, arch), dq=_shrink_to_fit(t, "dq", head_dim,
                                                                                              dtype, arch))


def bwd_kernel_tile(tiles_: dict, which: str) -> dict:
    """The tile of one backward kernel (``which``: "dkdv" | "dq") as a forward-style tile dict, the form
    :func:`smem_estimate` and :func:`fits` take."""
    bm, bn = tiles_[which]
    return _tile(bm, bn, tiles_["num_warps"], tiles_["num_stages"])


def _shrink_to_fit(t: dict, which: str, head_dim: int, dtype: str, arch: int) -> tuple:
    kernel = "bwd_dkdv_kernel" if which == "dkdv" else "bwd_dq_kernel"
    bm, bn = t[which]
    stream_first = ("m", "n") if which == "dkdv" else ("n", "m")  # dK/dV streams query rows, dQ keys
    for side in stream_first:
        while not fits(_tile(bm, bn, t["num_warps"], t["num_stages"]), head_dim, dtype, arch, kernel):
            if side == "m" and bm > 16:
                bm //= 2
            elif side == "n" and bn > 16:
                bn //= 2
            else:
                break
    short = _smem_shortfall(_tile(bm, bn, t["num_warps"], t["num_stages"]), head_dim, dtype, arch, kernel)
    if short:
        raise RuntimeError(f"the Triton backward's {which} kernel {short} even with {bm}x{bn} tiles: use a 16-bit "
                           "dtype or another backend (ring_attn.backends.force)")
    return bm, bn


def current_arch() -> int:
    """Compute capability of the current CUDA device as an int (90 = sm_90); 90 when there is none (the
    offline compile report targets sm_90)."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor
    return 90


def fwd_tma_tile(key: FwdKey) -> dict:
    """Tile of the TMA forward (``fwd_tma_kernel``) for ``key``, with ``WARP_SPECIALIZE``. sm_90, 16-bit,
    d in {64, 128}: ``_FWD_TMA_TABLE`` (from the compile report, benchmarks/NOTES.md); anything else: the
    pointer kernel's tile without warp specialisation. Under the interpreter: the small tile, with the
    warp-specialised code structure (one masked loop) unless ``_TMA_WARP_SPECIALIZE`` is off."""
    if interpreter_enabled():
        return dict(INTERPRETER_TILE, WARP_SPECIALIZE=_TMA_WARP_SPECIALIZE)
    if key.arch // 10 == 9 and key.dtype != "fp32" and key.head_dim in _FWD_TMA_TABLE:
        return dict(_FWD_TMA_TABLE[key.head_dim], WARP_SPECIALIZE=_TMA_WARP_SPECIALIZE)
    return dict(fwd_tile(key), WARP_SPECIALIZE=False)


# Whether the TMA forward asks for warp specialisation (compile report, benchmarks/NOTES.md).
_TMA_WARP_SPECIALIZE = True
# sm_90 tiles of the TMA forward. Triton's Hopper warp specialisation engages only at num_warps=4 and then
# runs 3 warpgroups (a TMA producer and two 64-row consumers of the 128-row block).
_FWD_TMA_TABLE = {64: _tile(128, 128, 4, 2), 128: _tile(128, 128, 4, 2)}


def autotune_enabled() -> bool:
    """True when ``RING_ATTN_AUTOTUNE=1`` (:func:`ring_attn.backends.autotune_mode`; other values raise): the
    forward times its candidates instead of using the table (never under the interpreter)."""
    return autotune_mode() and not interpreter_enabled()


def dump_tuned(autotuner, path: str, arch: int) -> list:
    """Write the configs ``autotuner`` (the forward's ``triton.autotune`` object) has picked so far as a
    JSON tile table for ``RING_ATTN_TILES``; returns the records. Its cache keys are the values of the
    autotune key (``autotuner.keys``: HEAD_DIM, CAUSAL, VARLEN, DOT_PRECISION, MERGE, ALIBI, seqlen_q) followed
    by the dtypes of the tensor arguments, Q's first. Launches that differ only in what the table does not key
    (sequence length, varlen, ALiBi) give one record: the longest ``seqlen_q``'s pick."""
    names = list(autotuner.keys)
    best = {}
    for key, cfg in autotuner.cache.items():
        vals = dict(zip(names, key))
        q_dtype = str(key[len(names)]) if len(key) > len(names) else "torch.bfloat16"
        dtype = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}.get(q_dtype, "bf16")
        fkey = (int(vals["HEAD_DIM"]), dtype, bool(vals["CAUSAL"]), bool(vals["MERGE"]))
        length = int(vals.get("seqlen_q", 0))
        if fkey not in best or length > best[fkey][0]:
            best[fkey] = (length, cfg)
    recs = [dict(arch=arch, head_dim=head_dim, dtype=dtype, causal=causal, merge=merge,
                 BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"], num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages)
            for (head_dim, dtype, causal, merge), (_, cfg) in sorted(best.items())]
    with open(path, "w") as f:
        json.dump(recs, f, indent=1)
    return recs
