"""flash-attn's ``flash_attn_with_kvcache``: attention of new queries over a preallocated KV cache, appending the
new keys/values in place (incremental decoding), with optional rotary embedding of the new tokens.

It runs the attention kernels on the packed layout: row ``i`` of the batch is one sequence whose keys are cache row
``cache_batch_idx[i]`` from ``cache_leftpad[i]`` up to ``cache_seqlens[i] + seqlen_new``, or, with a paged cache
(``block_table``), the pages listed by row ``i`` of the table (``ring_attn._contracts.KVPages``: the kernels read
the pages in place). Nothing is copied out of the cache and the lengths never leave the device. No autograd (as
flash-attn: no backward).
"""
from __future__ import annotations

import functools
import numbers

import torch

from ring_attn._contracts import KVPages, VarlenSeqs, check_alibi_slopes, check_block_table, check_flag, \
    check_pages, check_pages_used, check_qkv, check_scale, check_softcap, check_tensor, check_window, \
    flash_attn_window, last_dim_contiguous
from ring_attn.ops._dispatch import traced
from ring_attn.ops.attention_block import attention_block_forward, forward_backend
from ring_attn.ops.rope import rotate_by_tables

__all__ = ["flash_attn_with_kvcache"]

_NAME = "flash_attn_with_kvcache"


@functools.lru_cache(maxsize=256)
def _cached_steps(device: torch.device, stream: int, n: int, step: int, first: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int32, device=device) * step + first


def _reusable(*tensors) -> bool:
    """Whether this call may take shape-only index tensors from :func:`_steps`'s cache: not while traced
    (compile, FakeTensor: the cache would keep traced values) nor during CUDA graph capture (the tensor would
    live in the graph's private pool)."""
    if traced(*tensors):
        return False
    return tensors[0].device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def _steps(device: torch.device, n: int, step: int, first: int = 0, cache: bool = True) -> torch.Tensor:
    """int32 ``[first, first + step, ..., first + (n-1)·step]`` on ``device``: the per-row offsets and lengths
    that depend only on shapes, made once per (device, stream, n, step, first) and reused, so a decoding step
    launches no kernels for them (read-only: the kernels never write them; per stream, so a first use is
    ordered after the launch that made it). ``cache=False`` makes a fresh one."""
    if not cache:
        return torch.arange(n, dtype=torch.int32, device=device) * step + first
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0  # the raw handle
    return _cached_steps(device, stream, n, step, first)


def _rows_view(name: str, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A contiguous-style cache ``[b_c, s_cache, h_kv, d]`` as packed rows ``[n, h_kv, d]`` *of the same memory*
    (what the kernels read is what the append writes), and the rows between two batch rows' starts: ``s_cache``
    when the rows follow each other, else ``stride(0) / stride(1)`` (e.g. a heads-major buffer ``[b, h, s, d]``
    seen as ``[b, s, h, d]``: batch row ``i`` starts at flat row ``i · h · s``; the rows in between belong to other
    heads and are never read). ValueError when ``stride(0)`` is not a multiple of ``stride(1)``."""
    b_c, s_c, h, d = x.shape
    st = x.stride()
    if b_c == 1 or s_c <= 1 or st[0] == s_c * st[1]:  # (s_c = 0: an empty cache, no rows at all)
        return x.view(b_c * s_c, h, d), s_c
    if st[1] > 0 and st[0] % st[1] == 0 and st[0] // st[1] >= s_c:
        per = st[0] // st[1]
        return x.as_strided(((b_c - 1) * per + s_c, h, d), (st[1], st[2], st[3]), x.storage_offset()), per
    raise ValueError(f"{_NAME}: {name} (shape {tuple(x.shape)}, strides {tuple(st)}) cannot be read in place: "
                     f"stride(0) must be a multiple of stride(1) (at least seqlen_cache times it), as in a "
                     f"[batch, seqlen, heads, head_dim] or a heads-major [batch, heads, seqlen, head_dim] buffer")


def _per_row(name: str, x, b: int, device) -> tuple[torch.Tensor, list[int] | None]:
    """An int32/int64 ``[b]`` tensor (on the CPU or q's device) as int32 on ``device``, and its values when
    they can be read without a device sync (a CPU tensor), else None."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_NAME}: {name} must be " + ("an int or " if name == "cache_seqlens" else "") +
                        f"an int32 (or int64) tensor of shape ({b},) (one per batch row), got {x!r}")
    if x.dim() != 1 or x.shape[0] != b or x.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{_NAME}: {name} must be an int32 (or int64) tensor of shape ({b},) (one per batch row), "
                         f"got {x.dtype} {tuple(x.shape)}")
    if x.device.type != "cpu" and x.device != device:
        raise ValueError(f"{_NAME}: {name} is on {x.device}; expected q's device ({device}) or the CPU")
    # contiguous: the kernels read a per-row tensor with a unit stride (a strided view was misread by Triton)
    return x.to(device=device, dtype=torch.int32).contiguous(), (x.tolist() if x.device.type == "cpu" else None)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention over a KV cache, with the new keys/values appended in place (flash-attn's signature).

    Args:
        q: ``[batch, seqlen_q, heads_q, head_dim]``, float16/bfloat16/float32.
        k_cache, v_cache: ``[batch_cache, seqlen_cache, heads_kv, head_dim]``, or with ``block_table`` (a paged
            cache) ``[num_blocks, page_block_size, heads_kv, head_dim]``; q's dtype and device, last dim
            contiguous; ``heads_q % heads_kv == 0``; both with the same strides. Written in place when ``k``/``v``
            are given. Other strides are read in place too, e.g. a heads-major ``[batch, heads, seqlen,
            head_dim]`` buffer passed as ``.transpose(1, 2)`` (``stride(0)`` must be a multiple of
            ``stride(1)``); a paged cache's pages must follow each other (``stride(0) == page_block_size ·
            stride(1)``), so a heads-major paged buffer is refused.
        k, v: None, or ``[batch, seqlen_new, heads_kv, head_dim]``: written into the cache at rows
            ``cache_seqlens[i] ..`` of cache row ``cache_batch_idx[i]``, then attended to. Both or neither.
        rotary_cos, rotary_sin: None, or ``[seqlen_ro, rotary_dim / 2]``: rotary embedding of the new ``k`` at
            positions ``cache_seqlens[i] + j`` and of ``q`` at the same positions when ``causal`` or a window is
            set, else all of ``q`` at position ``cache_seqlens[i]``; only with ``k``/``v``. The first
            ``rotary_dim`` dims rotate, the rest pass through. (Positions count from the start of the cache row,
            ``cache_leftpad`` included, as flash-attn's.)
        cache_seqlens: int, or int32 ``[batch]`` (int64 accepted too, here and in the next two): the filled
            length of each cache row before this call; None: the whole cache (``seqlen_cache``), which then has
            no room for ``k``/``v``.
        cache_batch_idx: None (row ``i`` uses cache row ``i``) or int32 ``[batch]``; not with ``block_table``.
        cache_leftpad: None, or int32 ``[batch]``: row ``i``'s keys start at cache index ``cache_leftpad[i]``
            (``<= cache_seqlens[i]``; a left-padded batch); causal alignment, windows and ALiBi count from
            there. Not with ``block_table`` (NotImplementedError, as flash-attn).
        block_table: None, or int32 ``[batch, max_num_blocks_per_seq]`` on q's device: a paged cache, where
            position ``p`` of row ``i`` is row ``p % page_block_size`` of page ``block_table[i, p //
            page_block_size]`` (flash-attn's paged KV; any page size here, flash-attn 2 needs a multiple of
            256). ``seqlen_cache = max_num_blocks_per_seq · page_block_size``. Pages may be shared between rows;
            entries past a row's last page are not read.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as :func:`ring_attn.flash_attn_func`, with
            ``seqlen_k = cache_seqlens[i] + seqlen_new - cache_leftpad[i]`` per row (bottom-right alignment);
            as in flash-attn's code, a window side ``>= seqlen_cache`` (the capacity) counts as -1 (unbounded;
            a window of two such sides is no window, also for the rotary rule above), and a window bounded on
            the left only has ``seqlen_cache`` as its right side.
        rotary_interleaved: True: rotate dims pairs (0, 1), (2, 3), ...; False: (i, i + rotary_dim / 2).
        num_splits: flash-attn's split-KV: 0 = the kernels decide (on a GPU, the keys of each row are split
            into ranges computed in parallel when batch x heads alone would leave SMs idle), 1 = no split,
            n > 1 = up to n ranges (at most one per key block). Results agree up to rounding.
        return_softmax_lse: also return the float32 LSE ``[batch, heads_q, seqlen_q]``.

    Returns:
        ``out`` ``[batch, seqlen_q, heads_q, head_dim]`` in q's dtype (rows that see no key: 0), or
        ``(out, lse)``. No autograd.

    Raises:
        TypeError / ValueError naming the argument, before anything is written; NotImplementedError for
        ``cache_leftpad`` with ``block_table``. A cache row overflowing (``cache_seqlens[i] + seqlen_new >
        seqlen_cache``), a ``cache_batch_idx`` out of range, a ``cache_leftpad`` past ``cache_seqlens`` or a
        ``block_table`` entry in use naming no page raises ValueError where the values are on the CPU (an int,
        or a CPU tensor), and fails a device-side assert on a GPU (no host sync).
    """
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{_NAME}: {name} must be 4-D [batch, seqlen, heads, head_dim], got shape "
                             f"{tuple(x.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{_NAME}: k_cache and v_cache must have the same shape; got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    paged = block_table is not None
    if paged:
        if cache_leftpad is not None:
            raise NotImplementedError(f"{_NAME}: cache_leftpad with a paged cache (block_table) is not "
                                      f"implemented (nor in flash-attn); pass one or the other")
        if cache_batch_idx is not None:
            raise ValueError(f"{_NAME}: cache_batch_idx cannot be used with block_table (a paged cache: each "
                             f"row's pages are its row of block_table), as in flash-attn")
    elif cache_batch_idx is None and k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"{_NAME}: k_cache holds {k_cache.shape[0]} rows but q's batch is {q.shape[0]}; pass "
                         f"cache_batch_idx to pick the cache row of each batch row")
    if k_cache.shape[0] == 0 and q.shape[0] > 0:
        held = "pages" if paged else "rows"
        raise ValueError(f"{_NAME}: k_cache {tuple(k_cache.shape)} holds no {held}, but q's batch of {q.shape[0]} "
                         f"needs {'the pages its block_table lists' if paged else 'the rows cache_batch_idx picks'}")
    # dtypes, devices, head dims, GQA ratio (on one row: the cache may hold more rows than q)
    h_q, h_kv, d = check_qkv(q[:1], k_cache[:1], v_cache[:1], packed=False, names=("q", "k_cache", "v_cache"))
    b, s_q = q.shape[0], q.shape[1]
    if not (last_dim_contiguous(k_cache) and last_dim_contiguous(v_cache)):
        raise ValueError(f"{_NAME}: k_cache and v_cache need a contiguous last dim (strides {k_cache.stride()}, "
                         f"{v_cache.stride()})")
    if paged:
        block_table = check_block_table(block_table, b, q.device, _NAME)
        check_pages("k_cache", k_cache, _NAME)
        check_pages("v_cache", v_cache, _NAME)
        n_pages, page = k_cache.shape[0], k_cache.shape[1]
        b_c, s_cache = b, block_table.shape[1] * page
    else:
        b_c, s_cache = k_cache.shape[0], k_cache.shape[1]
        (kc, per_k), (vc, per_v) = _rows_view("k_cache", k_cache), _rows_view("v_cache", v_cache)
        if per_k != per_v:
            raise ValueError(f"{_NAME}: k_cache and v_cache must have the same layout; got strides "
                             f"{tuple(k_cache.stride())} and {tuple(v_cache.stride())}")
    scale = check_scale(softmax_scale, d)
    causal = check_flag("causal", causal)
    interleaved = check_flag("rotary_interleaved", rotary_interleaved)
    return_softmax_lse = check_flag("return_softmax_lse", return_softmax_lse)
    window = flash_attn_window(check_window(window_size), s_cache, s_q)  # flash-attn's: against the capacity
    cap = check_softcap(softcap)
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ValueError(f"{_NAME}: num_splits must be an int >= 0 (0: heuristic), got {num_splits!r}")
    alibi = check_alibi_slopes(alibi_slopes, q.device, b, h_q, "batch")
    if (k is None) != (v is None):
        raise ValueError(f"{_NAME}: pass both k and v (the new keys and values) or neither")
    s_new = 0
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x)
            if x.dim() != 4 or x.shape[0] != b or tuple(x.shape[2:]) != (h_kv, d) or x.dtype != q.dtype or \
                    x.device != q.device:
                raise ValueError(f"{_NAME}: {name} must be [batch={b}, seqlen_new, heads_kv={h_kv}, head_dim={d}] "
                                 f"{q.dtype} on {q.device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"{_NAME}: k and v must hold the same new tokens; got {tuple(k.shape)}, {tuple(v.shape)}")
        s_new = k.shape[1]
        if cache_seqlens is None:
            raise ValueError(f"{_NAME}: k/v are appended at cache_seqlens: pass cache_seqlens (the filled length of "
                             f"each cache row)")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(f"{_NAME}: pass both rotary_cos and rotary_sin or neither")
    if rotary_cos is not None:
        if k is None:
            raise ValueError(f"{_NAME}: rotary_cos/rotary_sin rotate the new k and q: they need k and v")
        for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            check_tensor(name, x)
            if x.dim() != 2 or x.shape != rotary_cos.shape or not 0 < 2 * x.shape[1] <= d or \
                    x.device != q.device or not x.is_floating_point():
                raise ValueError(f"{_NAME}: {name} must be a float tensor [seqlen_ro, rotary_dim / 2] with "
                                 f"rotary_dim <= head_dim={d} on {q.device}" + (", shaped like rotary_cos" if
                                 name != "rotary_cos" else "") + f"; got {x.dtype} "
                                 f"{tuple(x.shape)} on {x.device}")
    # per-row filled lengths, cache rows and left pads, on q's device
    if cache_seqlens is None:
        lens = torch.full((b,), s_cache, dtype=torch.int32, device=q.device)
        host_lens = [s_cache] * b
    elif isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        lens = torch.full((b,), int(cache_seqlens), dtype=torch.int32, device=q.device)
        host_lens = [int(cache_seqlens)] * b
    else:
        lens, host_lens = _per_row("cache_seqlens", cache_seqlens, b, q.device)
    reuse = _reusable(q, k_cache)  # shape-only index tensors come from a cache (not while traced or captured)
    if cache_batch_idx is None:
        rows = _steps(q.device, b, 1, cache=reuse)
        host_rows = list(range(b))
    else:
        rows, host_rows = _per_row("cache_batch_idx", cache_batch_idx, b, q.device)
    pad, host_pad = (None, None) if cache_leftpad is None else _per_row("cache_leftpad", cache_leftpad, b, q.device)
    ro = None if rotary_cos is None else rotary_cos.shape[0]
    reach = max(s_new, s_q if (causal or window != (-1, -1)) else 1)  # rotary positions used past cache_seqlens
    if host_lens is not None:
        bad = [(i, n) for i, n in enumerate(host_lens) if not 0 <= n <= s_cache - s_new]
        if bad:
            raise ValueError(f"{_NAME}: cache_seqlens + seqlen_new must fit the cache (0 <= cache_seqlens[i] <= "
                             f"{s_cache} - {s_new}); rows (index, cache_seqlens) {bad[:4]} do not")
        if ro is not None and max(host_lens) + reach > ro:
            raise ValueError(f"{_NAME}: rotary_cos/rotary_sin cover {ro} positions, but positions up to "
                             f"{max(host_lens) + reach - 1} are rotated")
    else:
        torch._assert_async(((lens >= 0) & (lens <= s_cache - s_new)).all(),
                            f"{_NAME}: cache_seqlens + seqlen_new overflows the cache ({s_cache} rows)")
        if ro is not None:
            torch._assert_async((lens + reach <= ro).all(), f"{_NAME}: rotary positions past rotary_cos")
    if host_rows is not None:
        if any(not 0 <= r < b_c for r in host_rows):
            raise ValueError(f"{_NAME}: cache_batch_idx must index the {b_c} cache rows, got {host_rows}")
        if s_new and len(set(host_rows)) < len(host_rows):  # two rows appending into one cache row: a race
            raise ValueError(f"{_NAME}: cache_batch_idx {host_rows} names a cache row twice; with k/v appended "
                             f"each batch row needs its own cache row")
    else:
        torch._assert_async(((rows >= 0) & (rows < b_c)).all(),
                            f"{_NAME}: cache_batch_idx out of range (cache batch {b_c})")
    if pad is not None:
        if host_pad is not None and host_lens is not None:
            bad = [(i, p, n) for i, (p, n) in enumerate(zip(host_pad, host_lens)) if not 0 <= p <= n]
            if bad:
                raise ValueError(f"{_NAME}: cache_leftpad must lie in [0, cache_seqlens[i]]; rows (index, "
                                 f"cache_leftpad, cache_seqlens) {bad[:4]} do not")
        else:
            torch._assert_async(((pad >= 0) & (pad <= lens)).all(),
                                f"{_NAME}: cache_leftpad outside [0, cache_seqlens]")
    filled = lens + s_new if s_new else lens  # each row's keys after the append, counted from cache index 0
    if paged:
        check_pages_used(block_table, filled, page, n_pages, _NAME, sync=q.device.type == "cpu")

    if k is not None:  # a backend that cannot run these inputs (e.g. a pinned one) raises before the append
        forward_backend(q, True, window=window, softcap=cap, alibi=alibi is not None)
    with torch.no_grad():
        if k is not None:
            pos_new = lens[:, None].long() + torch.arange(s_new, device=q.device)  # [b, s_new]: where k/v go
        if rotary_cos is not None:
            k = rotate_by_tables(k, rotary_cos, rotary_sin, pos_new, interleaved)
            if causal or window != (-1, -1):
                pos_q = lens[:, None].long() + torch.arange(s_q, device=q.device)
            else:
                pos_q = lens[:, None].long().expand(b, s_q)
            q = rotate_by_tables(q, rotary_cos, rotary_sin, pos_q, interleaved)
        if paged:  # the pages as rows [n_pages * page, h_kv, d] (views: the checks above keep them views)
            kc, vc = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
            pages = KVPages(block_table, page)
            if k is not None:  # position p of row i is page row table[i, p // page] * page + p % page
                dest = block_table.long().gather(1, pos_new // page) * page + pos_new % page
                kc[dest] = k
                vc[dest] = v
            starts_k = _steps(q.device, b, 0, cache=reuse)
        else:  # kc, vc: views of the caches' memory (_rows_view), so they see the append
            pages = None
            if k is not None:  # append in place: cache row rows[i], positions lens[i] .. lens[i] + s_new
                idx = rows[:, None].long().expand(b, s_new)
                k_cache[idx, pos_new] = k
                v_cache[idx, pos_new] = v
            starts_k = _steps(q.device, b, per_k, cache=reuse) if cache_batch_idx is None else rows * per_k
            if pad is not None:
                starts_k = starts_k + pad
        lens_k = filled if pad is None else filled - pad
        seqs = VarlenSeqs(_steps(q.device, b, s_q, cache=reuse), _steps(q.device, b, 0, s_q, cache=reuse),
                          starts_k, lens_k, s_q, s_cache, True)
        out, lse = attention_block_forward(q.reshape(b * s_q, h_q, d), kc, vc, scale, causal, None, seqs,
                                           window=window, softcap=cap, alibi_slopes=alibi,
                                           num_splits=int(num_splits), pages=pages)
    out = out.reshape(b, s_q, h_q, d)
    if return_softmax_lse:
        return out, lse.reshape(h_q, b, s_q).transpose(0, 1).contiguous()
    return out
