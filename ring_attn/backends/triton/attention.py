"""Host launchers of the Triton attention kernels: the ``attention_*`` functions of the backend protocol
(``ring_attn/backends/protocol.py``). No argument checking beyond what the kernels need; the ops layer
(``ring_attn.ops.attention_block``) validates, allocates and chunks the batch before calling these.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ring_attn._contracts import Dropout, KVPages, VarlenSeqs
from ring_attn.backends import backward_mode, interpreter_enabled
from ring_attn.backends.triton import tiles
from ring_attn.backends.triton.attention_kernels import bwd_dkdv_kernel, bwd_dq_kernel, delta_kernel, \
    split_combine_kernel
from ring_attn.backends.triton.attention_kernels import fwd_kernel as fwd_autotuned_kernel
from ring_attn.backends.triton.attention_kernels import fwd_tma_kernel

__all__ = ["attention_forward", "attention_delta", "attention_backward", "bwd_blocks", "tma_forward_support",
           "forward_variant", "split_plan"]

LOG2E = 1.4426950408889634


def _mask_args(causal: bool, window, softcap: float, softmax_scale: float, dtype,
               out_dtype) -> tuple[list, dict]:
    """Runtime args ``[win_left, win_right, softcap_in, softcap_out]`` and constexprs of the kernels.

    CAUSAL means "keys right of ``i + offset + win_right`` are masked": causal (``win_right = 0``, flash-attn's
    causal => right window 0) or a right window. LOCAL: a left window. SOFTCAP: ``c·tanh(s/c)`` with
    ``softcap_in = scale/c`` and ``softcap_out = c·log2(e)``. UPCAST/ROUND_BF16: bf16 under the interpreter
    (its bf16 ``tl.dot`` is wrong and its bf16 cast truncates) computes dots in fp32 and rounds stores to
    nearest."""
    left, right = int(window[0]), int(window[1])
    has_hi = bool(causal) or right >= 0
    win_right = 0 if causal else max(right, 0)
    cap = float(softcap)
    interp_bf16 = interpreter_enabled() and dtype == torch.bfloat16
    args = [max(left, 0), win_right, softmax_scale / cap if cap > 0 else 1.0, cap * LOG2E if cap > 0 else 1.0]
    flags = dict(CAUSAL=has_hi, LOCAL=left >= 0, SOFTCAP=cap > 0, UPCAST=interp_bf16,
                 ROUND_BF16=interp_bf16 and out_dtype == torch.bfloat16)
    return args, flags


def bwd_blocks(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Block sizes for the backward kernels (``tiles.bwd_tiles`` for the current GPU and ``dtype``): one fixed
    table, no autotuning, so the reduction order, and hence every gradient bit, is the same in every process.
    dK/dV: BLOCK_N keys stay, BLOCK_M query rows stream; dQ: BLOCK_M query rows stay, BLOCK_N keys stream."""
    return tiles.bwd_tiles(head_dim, tiles.current_arch(), _dtype_name(dtype))


def _dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, "bf16")


class _TableLaunched:
    """``fwd_kernel[grid](*args, **constexprs)`` as the launcher writes it, with the tile added: by default
    the fixed table's tile for (GPU, head dim, dtype, CAUSAL, MERGE) on the plain JIT function, so every
    process runs the same tile; with ``RING_ATTN_AUTOTUNE=1`` the autotuner picks by timing."""

    def __getitem__(self, grid):
        def launch(*args, tile: Optional[dict] = None, **kwargs):
            if tile is not None:  # the caller's tile (decode, split-KV): never autotuned
                return fwd_autotuned_kernel.fn[grid](*args, **kwargs, **tile)
            if tiles.autotune_enabled():
                return fwd_autotuned_kernel[grid](*args, **kwargs)
            key = tiles.FwdKey(tiles.current_arch(), int(kwargs["HEAD_DIM"]), _dtype_name(args[0].dtype),
                               bool(kwargs["CAUSAL"]), bool(kwargs["MERGE"]))
            return fwd_autotuned_kernel.fn[grid](*args, **kwargs, **tiles.fwd_tile(key))
        return launch


fwd_kernel = _TableLaunched()


def tma_forward_support() -> Optional[str]:
    """None when this Triton has what the TMA forward needs (``tl.make_tensor_descriptor``,
    ``tl.range(..., warp_specialize=)``, ``triton.set_allocator``: Triton >= 3.4), else why not."""
    import inspect

    import triton.language as tl

    if not hasattr(tl, "make_tensor_descriptor"):
        return f"triton {triton.__version__} has no tl.make_tensor_descriptor"
    if "warp_specialize" not in inspect.signature(tl.range.__init__).parameters:
        return f"triton {triton.__version__}: tl.range has no warp_specialize"
    if not hasattr(triton, "set_allocator"):
        return f"triton {triton.__version__} has no triton.set_allocator"
    return None


def _tma_ok(x: torch.Tensor, name: str) -> Optional[str]:
    """TMA needs a contiguous last dim and 16-byte aligned base and strides (every stride but the last)."""
    e = x.element_size()
    if x.stride(-1) != 1:
        return f"{name}: last dim not contiguous (stride {x.stride(-1)})"
    if x.data_ptr() % 16:
        return f"{name}: base pointer not 16-byte aligned"
    if any(st * e % 16 for st in x.stride()[:-1]):
        return f"{name}: strides {tuple(x.stride())} are not 16-byte multiples"
    return None


def forward_variant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *,
                    window: tuple[int, int] = (-1, -1), softcap: float = 0.0, merge: bool = False,
                    varlen: bool = False, alibi: bool = False, max_q: Optional[int] = None) -> tuple[str, str]:
    """Which forward kernel :func:`attention_forward` launches for these tensors: ``("tma", why)`` or
    ``("pointer", why)``. The TMA variant (``fwd_tma_kernel``) runs only when asked for
    (``RING_ATTN_FWD=tma``; the default stays the pointer kernel until a GPU has measured it) AND it
    applies: Triton has tensor descriptors and warp specialisation, the GPU is sm_90 (or the interpreter
    runs the kernels), no window, soft-cap or ALiBi, head dim 64 or 128, fp16/bf16 Q/K/V of one dtype, contiguous
    last dims and 16-byte aligned bases and strides (also O's when it is 16-bit, dense and not merged,
    since O is then stored by TMA), non-empty sequence dims, and more than ``tiles.DECODE_MAX_Q`` query rows
    in the longest sequence (``max_q``: dense, q's sequence dim when not given; decoding-shaped calls take the
    pointer kernel's decode tile). Dense and packed (``varlen``) inputs alike. Raises ValueError for an unknown
    ``RING_ATTN_FWD``."""
    mode = tiles.forward_variant_mode()
    if mode != "tma":
        return "pointer", "RING_ATTN_FWD=tma not set" if mode == "" else "RING_ATTN_FWD=pointer"
    missing = tma_forward_support()
    if missing:
        return "pointer", missing
    if not interpreter_enabled() and tiles.current_arch() // 10 != 9:
        return "pointer", f"sm_{tiles.current_arch()} is not Hopper (sm_90)"
    if tuple(window) != (-1, -1) or softcap != 0:
        return "pointer", "sliding window or soft-cap"
    if alibi:
        return "pointer", "ALiBi slopes (the TMA forward has no ALiBi bias)"
    d = q.shape[-1]
    if d not in (64, 128):
        return "pointer", f"head dim {d} not in (64, 128)"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return "pointer", f"dtype {q.dtype} (fp16/bf16 only)"
    if q.shape[-3] == 0 or k.shape[-3] == 0:
        return "pointer", "an empty sequence dimension"
    rows = q.shape[-3] if max_q is None else max_q
    if rows <= tiles.DECODE_MAX_Q:
        return "pointer", f"{rows} query rows: decoding-shaped (the decode tile)"
    checks = [(q, "q"), (k, "k"), (v, "v")] + ([(out, "out")] if _o_desc(out, merge, varlen) else [])
    for x, name in checks:
        bad = _tma_ok(x, name)
        if bad:
            return "pointer", bad
    return "tma", "RING_ATTN_FWD=tma and every requirement met"


def _o_desc(out: torch.Tensor, merge: bool, varlen: bool) -> bool:
    """O goes through a descriptor (TMA store) when it is 16-bit, dense (a packed sequence's rows are
    stored with masks, which also covers empty sequences) and not read back by the MERGE epilogue."""
    return not merge and not varlen and out.dtype in (torch.float16, torch.bfloat16)


_allocator_set = False


def _ensure_tma_allocator() -> None:
    """Kernels that build tensor descriptors on the device need global scratch from ``triton.set_allocator``
    (128 B per descriptor); install a torch one once per process, on the first TMA launch (it replaces an
    allocator set earlier with ``triton.set_allocator``; one that allocates torch memory serves both).
    Not under the interpreter."""
    global _allocator_set
    if _allocator_set or interpreter_enabled():
        return

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(alloc)
    _allocator_set = True


# ---------------------------------------------------------------------------------------------------------
# Launchers. All tensors are viewed 4-D: dense [b, s, h, d]; packed [t, h, d] as [1, t, h, d] with the
# sequences given by VarlenSeqs. LSE/delta: dense [b, h, s]; packed [h, t] as [1, h, t].


def _as4d(x):
    return x if x.dim() == 4 else x.unsqueeze(0)


def _as3d_lse(x):
    return x if x.dim() == 3 else x.unsqueeze(0)


def _strides(x, varlen: bool):
    """Strides of all but the last dim; the batch stride is 0 for packed tensors, whose "batch" index is
    the sequence number and whose rows are addressed through VarlenSeqs starts."""
    return (0 if varlen else x.stride(0),) + tuple(x.stride()[1:-1])


def _dot_precision(dtype):
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreter_enabled()):  # bf16: upcast to fp32
        return "ieee"
    return "tf32"


def _seq_args(seqs: VarlenSeqs | None, q):
    if seqs is None:
        dummy = q.new_empty(1, dtype=torch.int32)
        return dummy, dummy, dummy, dummy
    return seqs.starts_q, seqs.lens_q, seqs.starts_k, seqs.lens_k


def _dropout_args(dropout: Optional[Dropout]) -> tuple[list, dict]:
    """Runtime args ``[drop_row0, drop_rows, drop_groups, drop_seed, drop_thresh, drop_scale]`` and the DROPOUT
    constexpr (``ring_attn._contracts.Dropout``; zeros and off without dropout)."""
    if dropout is None:
        return [0, 0, 0, 0, 0, 1.0], dict(DROPOUT=False)
    return [int(dropout.row0), int(dropout.rows), dropout.groups, int(dropout.seed), dropout.threshold,
            dropout.scale], dict(DROPOUT=True)


def _alibi_args(alibi: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple[list, dict]:
    """Runtime args ``[ALIBI_SLOPES, stride_ab, stride_ah]`` and the ALIBI constexpr: the fp32 slopes
    ``[n_batch, h_q]`` (any strides), or, without ALiBi, an unused fp32 tensor of the launch and zero strides."""
    if alibi is None:
        return [dummy, 0, 0], dict(ALIBI=False)
    return [alibi, alibi.stride(0), alibi.stride(1)], dict(ALIBI=True)


def _page_args(pages: Optional[KVPages], dummy: torch.Tensor) -> tuple[list, dict]:
    """Runtime args ``[BLOCK_TABLE, stride_btb, page_size]`` and the PAGED / PAGE_ALIGN constexprs: the int32
    page table ``[n_seqs, max_pages]``, or, without pages, an unused tensor of the launch. PAGE_ALIGN is the
    largest power of two dividing the page size, capped at 256: a key block of at most that many rows never
    straddles two pages (flash-attn's pages, multiples of 256, always take that path)."""
    if pages is None:
        return [dummy, 0, 1], dict(PAGED=False)
    page = int(pages.page_size)
    return [pages.block_table, pages.block_table.stride(0), page], dict(PAGED=True,
                                                                        PAGE_ALIGN=min(page & -page, 256))


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                      *, softmax_scale: float, causal: bool, causal_offset: Optional[int],
                      seqs: Optional[VarlenSeqs], merge: bool, window: tuple[int, int],
                      softcap: float, alibi: Optional[torch.Tensor] = None, num_splits: int = 0,
                      dropout: Optional[Dropout] = None, pages: Optional[KVPages] = None) -> None:
    """Protocol ``attention_forward``: one launch of the forward kernel (MERGE epilogue when ``merge``).
    ``alibi``: fp32 slopes ``[n_batch, h_q]`` or None (then the TMA forward is never chosen). ``dropout``:
    attention dropout (``ring_attn._contracts.Dropout``; the pointer kernel only). ``pages``: a paged KV cache
    (``ring_attn._contracts.KVPages``, packed only; the pointer kernel reads each key block through the table).

    Launches whose longest query sequence has at most ``tiles.DECODE_MAX_Q`` rows (decoding) use the 16-row
    decode tile. ``num_splits`` (split-KV, without ``merge`` only): 0 = :func:`split_plan` decides (on a GPU,
    decoding-shaped grids that would leave SMs idle), 1 = one pass over the keys, n > 1 = n key ranges (at
    most one per key block and ``tiles.MAX_SPLITS``) run in parallel and combined by LSE; equal up to rounding,
    and the same split count always gives the same bits."""
    q4, k4, v4, o4, l3 = _as4d(q), _as4d(k), _as4d(v), _as4d(out), _as3d_lse(lse)
    b, s_q, h_q, d = q4.shape
    s_k, h_kv = k4.shape[1], k4.shape[2]
    n_batch = b if seqs is None else seqs.starts_q.numel()
    max_q = s_q if seqs is None else seqs.max_len_q
    max_k = s_k if seqs is None else seqs.max_len_k
    if n_batch == 0 or max_q == 0 or h_q == 0:
        return
    vl = seqs is not None
    mask_args, flags = _mask_args(causal, window, softcap, softmax_scale, q.dtype, out.dtype)
    alibi_args, alibi_flag = _alibi_args(alibi, l3)
    drop_args, drop_flag = _dropout_args(dropout)
    page_args, page_flag = _page_args(pages, l3)
    key = tiles.FwdKey(tiles.current_arch(), d, _dtype_name(q.dtype), bool(causal), bool(merge))
    tile, splits, pack = split_plan(key, max_q, max_k, n_batch * h_q, merge, num_splits, h_q // h_kv)
    if pack:  # a program per (row block of (token, head) pairs, batch, kv head)
        grid = lambda meta: (triton.cdiv(max_q * (h_q // h_kv), meta["BLOCK_M"]), n_batch * h_kv)  # noqa: E731
    else:
        grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), n_batch * h_q)  # noqa: E731
    common = dict(HEAD_DIM=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()), VARLEN=vl,
                  BOTTOM_RIGHT=causal_offset is None, DOT_PRECISION=_dot_precision(q.dtype), MERGE=bool(merge),
                  PACK_GQA=pack, **flags, **alibi_flag, **drop_flag, **page_flag)
    if splits > 1:
        _forward_split(q4, k4, v4, o4, l3, seqs, (n_batch, max_q, max_k), splits, tile, grid, causal_offset,
                       softmax_scale * LOG2E, mask_args, alibi_args, drop_args + page_args, common)
        return
    if dropout is None and pages is None and forward_variant(q4, k4, v4, o4, window=window, softcap=softcap,
                                                             merge=merge, varlen=vl, alibi=alibi is not None,
                                                             max_q=max_q)[0] == "tma":
        _ensure_tma_allocator()
        fwd_tma_kernel[grid](
            q4, k4, v4, o4, l3, *_seq_args(seqs, q),
            *_strides(q4, vl), *_strides(k4, vl), *_strides(v4, vl), *_strides(o4, vl), *_strides(l3, vl),
            s_q, s_k, h_q, h_q // h_kv, softmax_scale * LOG2E, 0 if causal_offset is None else int(causal_offset),
            HEAD_DIM=d, CAUSAL=bool(causal), VARLEN=vl, BOTTOM_RIGHT=causal_offset is None,
            DOT_PRECISION=_dot_precision(q.dtype), MERGE=bool(merge), UPCAST=flags["UPCAST"],
            ROUND_BF16=flags["ROUND_BF16"], O_DESC=_o_desc(o4, merge, vl), **tiles.fwd_tma_tile(key),
        )
        return
    fwd_kernel[grid](
        q4, k4, v4, o4, l3, *_seq_args(seqs, q),
        *_strides(q4, vl), *_strides(k4, vl), *_strides(v4, vl), *_strides(o4, vl), *_strides(l3, vl),
        s_q, s_k, h_q, h_q // h_kv, softmax_scale * LOG2E, 0 if causal_offset is None else int(causal_offset),
        *mask_args, *alibi_args, 0, 0, 0, *drop_args, *page_args, tile=tile, **common,
    )


def split_plan(key: tiles.FwdKey, max_q: int, max_k: int, heads: int, merge: bool,
               num_splits: int = 0, group: int = 1) -> tuple[Optional[dict], int, bool]:
    """``(tile, splits, pack)`` of a forward launch over ``heads`` = batch x query heads with GQA ``group``:
    the tile (None: the table's or the autotuner's, as always), the number of key ranges (split-KV) and
    whether the query heads of a GQA group share a program (``PACK_GQA``). Decoding-shaped launches
    (``max_q <= tiles.DECODE_MAX_Q``) take the decode tile and, with ``group > 1``, pack: each program then
    reads its kv head's keys once for the whole group instead of once per query head. Splits:
    ``num_splits`` > 0 as given (clamped to one per key block and ``tiles.MAX_SPLITS``), 0:
    ``tiles.split_count`` for decoding-shaped launches on a GPU (never under the interpreter, whose programs
    run one after another; longer queries keep one pass: their partial outputs and the combine would cost
    more than the idle SMs); always 1 with ``merge`` (the ring's running result is merged in the kernel)."""
    decode = max_q <= tiles.DECODE_MAX_Q
    tile = tiles.fwd_decode_tile(key) if decode else None
    pack = decode and group > 1
    if merge or num_splits == 1 or max_k == 0 or (num_splits == 0 and (interpreter_enabled() or not decode)):
        return tile, 1, pack
    if tile is None:
        tile = tiles.fwd_tile(key)
    key_blocks = triton.cdiv(max_k, tile["BLOCK_N"])
    if num_splits == 0:
        rows, programs = (max_q * group, heads // group) if pack else (max_q, heads)
        splits = tiles.split_count(triton.cdiv(rows, tile["BLOCK_M"]) * programs, key_blocks, tiles.sm_count())
    else:
        splits = min(num_splits, key_blocks, tiles.MAX_SPLITS)
    return (tile if decode or splits > 1 else None), splits, pack


def _forward_split(q4, k4, v4, o4, l3, seqs, sizes, splits, tile, grid, causal_offset, qk_scale, mask_args,
                   alibi_args, tail_args, common) -> None:
    """Split-KV forward: ``splits`` programs per (query block, head), each over its own key range, write fp32
    partial (out, lse) to scratch; ``split_combine_kernel`` combines them by LSE into ``o4``/``l3`` (one fixed
    order), touching only rows inside a sequence. ``sizes``: (batch or sequences, longest q, longest k), as the
    caller computed them; ``tail_args``: the kernel's dropout and page-table arguments; ``common``: the caller's
    constexprs."""
    n_batch, max_q, max_k = sizes
    s_q, s_k, h_q = q4.shape[1], k4.shape[1], q4.shape[2]
    split_len = triton.cdiv(triton.cdiv(max_k, splits), tile["BLOCK_N"]) * tile["BLOCK_N"]
    splits = triton.cdiv(max_k, split_len)  # no split past the last key
    # every program of the SPLIT launch writes all of its rows inside a sequence, and only those are combined
    o_part = torch.empty((splits,) + tuple(o4.shape), dtype=torch.float32, device=o4.device)
    l_part = torch.empty((splits,) + tuple(l3.shape), dtype=torch.float32, device=l3.device)
    vl = seqs is not None
    fwd_kernel[lambda meta: grid(meta) + (splits,)](
        q4, k4, v4, o_part[0], l_part[0], *_seq_args(seqs, q4),
        *_strides(q4, vl), *_strides(k4, vl), *_strides(v4, vl), *_strides(o_part[0], vl),
        *_strides(l_part[0], vl),
        s_q, s_k, h_q, h_q // k4.shape[2], qk_scale, 0 if causal_offset is None else int(causal_offset),
        *mask_args, *alibi_args, split_len, o_part.stride(0), l_part.stride(0), *tail_args, tile=tile, SPLIT=True,
        **dict(common, MERGE=False, ROUND_BF16=False),
    )
    block_m = 16  # split launches are decoding-shaped (or asked for): few rows; d = 256 at 64 rows spills
    split_combine_kernel[(triton.cdiv(max_q, block_m), n_batch * h_q)](
        o_part, l_part, o4, l3, *_seq_args(seqs, q4)[:2],
        *_strides(o_part[0], vl), *_strides(l_part[0], vl), o_part.stride(0), l_part.stride(0),
        *_strides(o4, vl), *_strides(l3, vl), s_q, h_q, splits,
        HEAD_DIM=common["HEAD_DIM"], BLOCK_D=common["BLOCK_D"], VARLEN=vl, ROUND_BF16=common["ROUND_BF16"],
        BLOCK_M=block_m, num_warps=4,
    )


def attention_delta(dout: torch.Tensor, out: torch.Tensor, delta: torch.Tensor,
                    dlse: Optional[torch.Tensor]) -> None:
    """Protocol ``attention_delta``: ``delta = rowsum(dout · out) - dlse`` in fp32."""
    do4, o4, d3 = _as4d(dout), _as4d(out), _as3d_lse(delta)
    b, s, h, d = o4.shape
    if b * s * h == 0:
        return
    l3 = _as3d_lse(dlse) if dlse is not None else d3
    block_m = 16 if interpreter_enabled() else 64
    delta_kernel[(triton.cdiv(s, block_m), b * h)](
        do4, o4, d3, l3, do4.stride(0), do4.stride(1), do4.stride(2), o4.stride(0), o4.stride(1), o4.stride(2),
        d3.stride(0), d3.stride(1), l3.stride(0), l3.stride(1), s, h,
        HEAD_DIM=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()), HAS_DLSE=dlse is not None, BLOCK_M=block_m,
    )


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                       delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, *,
                       softmax_scale: float, causal: bool, causal_offset: Optional[int],
                       seqs: Optional[VarlenSeqs], accumulate: bool, window: tuple[int, int],
                       softcap: float, alibi: Optional[torch.Tensor] = None,
                       dropout: Optional[Dropout] = None) -> None:
    """Protocol ``attention_backward``. Default: the dK/dV kernel then the dQ kernel, 7 block matmuls per
    (query block, key block) pair, fixed blocks and no atomics: bitwise deterministic.

    ``RING_ATTN_BWD`` picks the 5-matmul backward instead (one K/V-stationary kernel that also adds each dQ
    partial ``dS·K`` into an fp32 dQ, so dQ no longer recomputes ``Q·Kᵀ`` and ``dO·Vᵀ``): ``fused-ordered``
    adds the partials in increasing key-block order behind one int32 counter per (head, query block),
    bitwise deterministic; ``fused`` uses unordered fp32 atomics, not bitwise reproducible. Both cost an
    fp32 dQ workspace (unless ``accumulate``: the ring's fp32 accumulator is used directly) and, for
    ``fused-ordered``, a zeroed counter per (head, query block). What each mode costs in time on a GPU is
    measured by ``scripts/gpu_check.sh`` (benchmarks/NOTES.md, "the 5-matmul backward"). ``alibi``: fp32
    slopes ``[n_batch, h_q]`` or None, in every mode."""
    q4, k4, v4, do4 = _as4d(q), _as4d(k), _as4d(v), _as4d(dout)
    dq4, dk4, dv4 = _as4d(dq), _as4d(dk), _as4d(dv)
    l3, d3 = _as3d_lse(lse), _as3d_lse(delta)
    if l3.stride() != d3.stride():  # the kernels index both with one set of strides
        d3 = d3.contiguous() if l3.is_contiguous() else torch.empty_like(l3).copy_(d3)
    b, s_q, h_q, d = q4.shape
    s_k, h_kv = k4.shape[1], k4.shape[2]
    n_batch = b if seqs is None else seqs.starts_q.numel()
    max_q = s_q if seqs is None else seqs.max_len_q
    max_k = s_k if seqs is None else seqs.max_len_k
    if n_batch == 0 or h_q == 0:
        return
    cdiv = triton.cdiv
    blocks = bwd_blocks(d, q.dtype)
    mode = backward_mode() if max_q > 0 and max_k > 0 else ""
    mask_args, flags = _mask_args(causal, window, softcap, softmax_scale, q.dtype, dk.dtype)
    alibi_args, alibi_flag = _alibi_args(alibi, l3)
    drop_args, drop_flag = _dropout_args(dropout)
    flags.update(alibi_flag, **drop_flag)
    common = dict(HEAD_DIM=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()),
                  VARLEN=seqs is not None, BOTTOM_RIGHT=causal_offset is None, ACCUMULATE=bool(accumulate),
                  DOT_PRECISION=_dot_precision(q.dtype), num_warps=blocks["num_warps"],
                  num_stages=blocks["num_stages"], **flags)
    offset = 0 if causal_offset is None else int(causal_offset)
    seq = _seq_args(seqs, q)
    vl = seqs is not None
    # fused dQ goes into fp32: the ring's accumulator itself, else a zeroed workspace converted into dq at the end
    dqa4 = torch.zeros(q4.shape, dtype=torch.float32, device=q.device) if mode and not accumulate else dq4
    if max_k > 0:
        block_m, block_n = blocks["dkdv"]
        n_qblocks = cdiv(max_q, block_m)
        # the ordered adds' counters; other modes never read LOCKS, so they get a placeholder, not an allocation
        locks = (torch.zeros(n_batch * h_q * n_qblocks, dtype=torch.int32, device=q.device) if mode == "ordered"
                 else dk4)
        bwd_dkdv_kernel[(cdiv(max_k, block_n), n_batch * h_kv)](
            q4, k4, v4, do4, l3, d3, dk4, dv4, dqa4, locks, *seq,
            *_strides(q4, vl), *_strides(k4, vl), *_strides(v4, vl), *_strides(do4, vl), *_strides(dk4, vl),
            *_strides(dv4, vl), *_strides(dqa4, vl), *_strides(l3, vl),
            s_q, s_k, h_kv, h_q // h_kv, softmax_scale * LOG2E, softmax_scale, offset, *mask_args, n_qblocks,
            *alibi_args, *drop_args,
            BLOCK_M=block_m, BLOCK_N=block_n, DQ_MODE={"": 0, "atomic": 1, "ordered": 2}[mode],
            SPIN_ASM=mode == "ordered" and not interpreter_enabled(), **common,
        )
    if mode:
        if mode == "ordered" and interpreter_enabled() and int(locks.min()) < 0:
            raise RuntimeError("fused-ordered backward: a dQ order counter was out of step (a program found "
                               "a count other than the number of key blocks below it that visit the block)")
        if not accumulate:
            dq4.copy_(dqa4)
        return
    if max_q > 0:
        block_m, block_n = blocks["dq"]
        bwd_dq_kernel[(cdiv(max_q, block_m), n_batch * h_q)](
            q4, k4, v4, do4, l3, d3, dq4, *seq,
            *_strides(q4, vl), *_strides(k4, vl), *_strides(v4, vl), *_strides(do4, vl), *_strides(dq4, vl),
            *_strides(l3, vl),
            s_q, s_k, h_q, h_q // h_kv, softmax_scale * LOG2E, softmax_scale, offset, *mask_args, *alibi_args,
            *drop_args, BLOCK_M=block_m, BLOCK_N=block_n,
            **common | dict(ROUND_BF16=flags["UPCAST"] and dq.dtype == torch.bfloat16),
        )
