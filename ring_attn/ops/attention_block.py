"""Block-level attention without autograd: what the custom ops of ``ring_attn.ops.attention`` and the ring
(``ring_attn.ring``) build on. Each function checks what the backends rely on, picks the backend per call
(``ring_attn.backends.select``), allocates outputs and splits oversized grids, then calls the backend.

* :func:`attention_block_forward` — ``(out, lse)`` for one (query block, key block) pair, with a causal mode
  and an explicit causal offset, optionally in fp32, or merged in place into a running fp32 ``(out, lse)``.
* :func:`attention_delta` — ``delta = rowsum(dout · out) - dlse`` from the *final* output.
* :func:`attention_block_backward` — gradients of one block pair from the final ``lse`` and ``delta``,
  added into (or written to) caller-provided tensors.

Conventions: ``docs/design.md``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ring_attn import backends
from ring_attn._contracts import Dropout, KVPages, VarlenSeqs, check_alibi_slopes, check_flag, check_int, \
    check_qkv, check_scale, check_softcap, check_tensor, check_window, last_dim_contiguous

__all__ = ["attention_block_forward", "attention_block_backward", "attention_delta", "lse_shape",
           "forward_backend"]

_NO_WINDOW = (-1, -1)  # no sliding window
_MAX_GRID_Y = 65535  # CUDA's limit on grid dim 1, which carries (batch or sequence) x heads


def _batch_chunks(q, seqs, alibi=None, pages=None):
    """Split the batch (dense) or the sequence list (packed) so batch x heads fits in one grid dimension.
    Yields ``(slice for dense tensors, VarlenSeqs or None, the chunk's ALiBi slopes or None, its KVPages or
    None)``; one chunk in all but extreme cases."""
    n = q.shape[0] if seqs is None else seqs.starts_q.numel()
    step = max(1, _MAX_GRID_Y // max(1, q.shape[-2]))
    if n <= step:
        yield slice(None), seqs, alibi, pages
        return
    for b0 in range(0, n, step):
        b1 = min(n, b0 + step)
        part_alibi = None if alibi is None else alibi[b0:b1]
        if seqs is None:
            yield slice(b0, b1), None, part_alibi, None
        else:
            yield slice(None), seqs._replace(starts_q=seqs.starts_q[b0:b1], lens_q=seqs.lens_q[b0:b1],
                                             starts_k=seqs.starts_k[b0:b1], lens_k=seqs.lens_k[b0:b1]), \
                part_alibi, None if pages is None else pages._replace(block_table=pages.block_table[b0:b1])


def _alibi(alibi_slopes, q, seqs):
    """Validated slopes as fp32 ``[n_batch, h_q]`` (``n_batch``: batch, or packed sequences), or None."""
    if seqs is None:
        return check_alibi_slopes(alibi_slopes, q.device, q.shape[0], q.shape[-2], "batch")
    return check_alibi_slopes(alibi_slopes, q.device, seqs.starts_q.numel(), q.shape[-2], "n_seqs")


def _chunk_dropout(dropout: Optional[Dropout], sl: slice, q) -> Optional[Dropout]:
    """The dropout of one batch chunk: dense chunks start at row ``sl.start · s_q`` of the call (packed chunks
    keep the packed rows, already in the call's row space)."""
    if dropout is None or not sl.start:
        return dropout
    return dropout._replace(row0=dropout.row0 + sl.start * q.shape[1])


def _unpage(k, v, seqs: VarlenSeqs, pages: KVPages):
    """For a backend that cannot read pages itself: each sequence's keys/values gathered from the pages into
    contiguous packed rows (sequence ``i`` at rows ``i · span ..``, ``span`` = its longest possible length), and
    the matching ``VarlenSeqs``. Exact: the same rows, copied."""
    n_pages_rows = k.shape[0]
    span = min(seqs.max_len_k, pages.block_table.shape[1] * pages.page_size)
    rows = pages.key_rows(span, n_pages_rows // pages.page_size).reshape(-1)
    n = seqs.starts_q.numel()
    starts = torch.arange(n, dtype=torch.int32, device=k.device) * span
    return k[rows], v[rows], seqs._replace(starts_k=starts, max_len_k=span)


def _mask_mode(window, softcap) -> tuple[tuple[int, int], float]:
    """``(window, softcap)`` validated and normalised: a negative side becomes -1, softcap a float >= 0."""
    return check_window(window), check_softcap(softcap)


def _check_block(name: str, q, k, v, packed: bool, softmax_scale, causal, causal_offset) -> float:
    """The host-side checks every block call gets (shapes, dtypes, scalars; no data read): the kernels index k/v
    by q's batch, heads and head dim, so a mismatch would read out of bounds. Also the kernel settings of the
    environment (``backends.check_kernel_settings``). Returns the scale as a float."""
    backends.check_kernel_settings()
    try:
        check_qkv(q, k, v, packed, max_head_dim=None)  # (head dims: each backend's capability)
        scale = check_scale(softmax_scale, q.shape[-1])
        check_flag("causal", causal)
        if causal_offset is not None:
            check_int("causal_offset", causal_offset)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from None
    return scale


def _check_rows(fn: str, name: str, x, what: str, shape, dtype=None) -> None:
    """``x`` (argument ``name`` of block function ``fn``) has ``shape`` (and ``dtype``): ValueError / TypeError."""
    check_tensor(name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}; expected {tuple(shape)} ({what})")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{fn}: {name}.dtype is {x.dtype}; expected {dtype}")


def lse_shape(q, packed: bool) -> tuple[int, ...]:
    """Shape of the fp32 LSE of q: ``[b, h, s]`` dense, ``[h, t]`` packed."""
    return (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])


def forward_backend(q, packed: bool, *, window: tuple[int, int] = _NO_WINDOW, softcap: float = 0.0,
                    alibi: bool = False, merge: bool = False, dropout: bool = False):
    """The backend module :func:`attention_block_forward` runs these inputs on (RuntimeError naming every reason
    when none can, or not the pinned one): for callers that must fail before they write anything, e.g. the KV
    cache's append."""
    window, softcap = _mask_mode(window, softcap)
    return backends.select("attention", q.device, q.dtype, q.shape[-1], varlen=packed, merge=merge, window=window,
                           softcap=softcap, alibi=alibi, dropout=dropout)


def attention_block_forward(q, k, v, softmax_scale: float, causal: bool, causal_offset: Optional[int] = None,
                            seqs: Optional[VarlenSeqs] = None, out_dtype: Optional[torch.dtype] = None,
                            out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, *,
                            window: tuple[int, int] = _NO_WINDOW, softcap: float = 0.0, alibi_slopes=None,
                            num_splits: int = 0, dropout: Optional[Dropout] = None,
                            pages: Optional[KVPages] = None):
    """Attention of one (query block, key block) pair; no autograd, no input checks beyond the essentials.

    Args:
        q: ``[b, s_q, h_q, d]`` (or packed ``[t_q, h_q, d]`` with ``seqs``), fp16/bf16/fp32, last dim contiguous.
        k, v: ``[b, s_k, h_kv, d]`` (or packed ``[t_k, h_kv, d]``), same dtype and device.
        softmax_scale: multiplies ``q·k``.
        causal: mask keys ``j > i + offset``.
        causal_offset: ``offset`` above; ``None`` = ``s_k - s_q`` per sequence (bottom-right alignment).
            The window is aligned with the same offset.
        seqs: packed layout description (:class:`VarlenSeqs`), or None for dense.
        out_dtype: dtype of ``out`` (default: q's). The ring passes ``torch.float32`` so partial outputs are
            merged without rounding to 16 bits.
        out, lse: a running result of earlier key blocks for the same queries (``out`` fp32 shaped like q,
            ``lse`` fp32 or fp64 shaped as returned; views with any strides, unit stride along the sequence for
            ``lse``). When given, this block is merged into them in place, in the kernel's epilogue, by LSE
            weighting, and they are returned; rows outside ``seqs`` are left as they are. An fp64 ``lse`` (the
            ring's) keeps the merge as exact as one pass over all the keys: the block's LSE is formed and merged
            in fp64, so the merge weights do not carry an fp32 LSE's rounding (an ulp of 650 is 6e-5).
        window: ``(left, right)`` sliding window, flash-attn's ``window_size`` (keyword-only): query ``i`` sees
            keys ``i + offset - left ..= i + offset + right``; a negative side is unbounded. With ``causal`` the
            right side is 0. Key blocks outside the window are never visited.
        softcap: ``> 0``: scores ``softcap · tanh(s / softcap)`` (Gemma 2); 0: off (keyword-only).
        alibi_slopes: ALiBi (keyword-only): None, or fp32 ``[h_q]`` / ``[b, h_q]`` (packed: ``[n_seqs, h_q]``)
            on q's device; adds ``-slope · |i + offset - j|`` to each score (after the soft-cap).
        num_splits: split-KV hint (keyword-only; ignored when merging): 0 = the backend decides (the Triton
            backend splits the keys of decoding-shaped grids too small to fill the GPU), 1 = never split, n > 1 =
            up to n key ranges in parallel, combined by LSE (equal up to rounding; same n, same bits).
        dropout: attention dropout (keyword-only; :class:`ring_attn._contracts.Dropout`, whose ``rows``/``keys``
            describe this call: ``b · s_q`` / ``s_k`` dense, ``t_q`` / ``max_len_k`` packed), or None. The LSE is
            the softmax's before dropout; the backward needs the same ``dropout``.
        pages: a paged KV cache (keyword-only, packed ``seqs`` only; :class:`ring_attn._contracts.KVPages`,
            flash-attn's ``block_table``): k/v are ``[n_pages · page_size, h_kv, d]`` page rows and each
            sequence's keys are read through its row of the table (``seqs.starts_k`` is not read). Forward only.

    Returns:
        ``(out, lse)``: out shaped like q (contiguous) in ``out_dtype``; lse fp32 ``[b, h_q, s_q]`` (packed:
        ``[h_q, t_q]``), natural log; rows that see no key: out 0, lse ``-inf``.

    Raises:
        TypeError / ValueError (before anything runs) for q/k/v that do not fit together (rank, dtype, device,
        batch, heads, head dim), a non-numeric ``softmax_scale`` or non-int ``causal_offset``, a running out/lse
        that does not fit, or bad ``alibi_slopes``. ``seqs`` is trusted to describe q's and k's rows.
    """
    packed = seqs is not None
    softmax_scale = _check_block("attention_block_forward", q, k, v, packed, softmax_scale, causal, causal_offset)
    merge = out is not None or lse is not None
    if merge:
        if out is None or lse is None:
            raise ValueError("attention_block_forward: pass both out and lse to merge into, or neither")
        if out.dtype != torch.float32 or lse.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"running out/lse must be float32 / float32 or float64 to merge into, got {out.dtype} "
                            f"and {lse.dtype}")
        if out.shape != q.shape or lse.shape != lse_shape(q, packed):
            raise ValueError(f"running out {tuple(out.shape)} / lse {tuple(lse.shape)} do not match q "
                             f"{tuple(q.shape)}; expected {tuple(q.shape)} / {lse_shape(q, packed)}")
        for name, x in (("out", out), ("lse", lse)):
            if not last_dim_contiguous(x):
                raise ValueError(f"attention_block_forward: the running {name} needs a contiguous last dim to merge "
                                 f"into, got strides {x.stride()}")
    if pages is not None and not packed:
        raise ValueError("attention_block_forward: pages (a paged KV cache) need packed seqs")
    window, softcap = _mask_mode(window, softcap)
    alibi = _alibi(alibi_slopes, q, seqs)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    impl = forward_backend(q, packed, window=window, softcap=softcap, alibi=alibi is not None, merge=merge,
                           dropout=dropout is not None)
    if pages is not None and not backends.CAPABILITIES[(impl.NAME, "attention")].paged:
        k, v, seqs = _unpage(k, v, seqs, pages)
        pages = None
    kw = dict(softmax_scale=softmax_scale, causal=causal, causal_offset=causal_offset, window=window,
              softcap=softcap)
    if merge:
        for sl, part, part_alibi, part_pages in _batch_chunks(q, seqs, alibi, pages):
            impl.attention_forward(q[sl], k[sl], v[sl], out[sl], lse[sl], seqs=part, merge=True, **kw,
                                   alibi=part_alibi, dropout=_chunk_dropout(dropout, sl, q), pages=part_pages)
        return out, lse
    out_dtype = q.dtype if out_dtype is None else out_dtype
    fill = packed and not seqs.covers_all_q
    out = (torch.zeros if fill else torch.empty)(q.shape, dtype=out_dtype, device=q.device)
    lse = torch.full(lse_shape(q, packed), float("-inf"), dtype=torch.float32, device=q.device) if fill else \
        torch.empty(lse_shape(q, packed), dtype=torch.float32, device=q.device)
    for sl, part, part_alibi, part_pages in _batch_chunks(q, seqs, alibi, pages):
        impl.attention_forward(q[sl], k[sl], v[sl], out[sl], lse[sl], seqs=part, merge=False, **kw,
                               alibi=part_alibi, num_splits=num_splits, dropout=_chunk_dropout(dropout, sl, q),
                               pages=part_pages)
    return out, lse



def attention_delta(dout, out, dlse=None):
    """``delta = rowsum(dout · out) − dlse`` in fp32: ``[b, h, s]`` for dense ``[b, s, h, d]`` inputs,
    ``[h, t]`` for packed ``[t, h, d]``. Compute it once from the *final* output and reuse it for every
    block pair of a ring backward. ``dlse`` (optional, fp32, shaped like the result) is the gradient
    flowing into the LSE output."""
    check_tensor("out", out)
    if out.dim() not in (3, 4):
        raise ValueError(f"attention_delta: out must be [b, s, h, d] or packed [t, h, d], got shape "
                         f"{tuple(out.shape)}")
    packed = out.dim() == 3
    _check_rows("attention_delta", "dout", dout, "out's shape", out.shape)
    if dlse is not None:
        _check_rows("attention_delta", "dlse", dlse, "the LSE's shape", lse_shape(out, packed))
    delta = torch.empty(lse_shape(out, packed), dtype=torch.float32, device=out.device)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    impl = backends.select("attention", out.device, out.dtype, out.shape[-1], varlen=packed)
    if dlse is not None:  # an upstream gradient may be an expanded (stride-0) view; kernels need unit stride
        dlse = dlse.float().contiguous()
    impl.attention_delta(dout, out, delta, dlse)
    return delta


def attention_block_backward(dout, q, k, v, lse, delta, dq, dk, dv, softmax_scale: float, causal: bool,
                             causal_offset: Optional[int] = None, seqs: Optional[VarlenSeqs] = None,
                             accumulate: bool = True, *, window: tuple[int, int] = _NO_WINDOW,
                             softcap: float = 0.0, alibi_slopes=None, dropout: Optional[Dropout] = None) -> None:
    """Gradients of one block pair, from the *final* ``lse`` and ``delta`` (see :func:`attention_delta`).

    ``dq``/``dk``/``dv`` are caller-provided tensors shaped like q/k/v (any strides with a contiguous last
    dim, e.g. slices of larger accumulators). With ``accumulate=True`` (the ring) they must be fp32 and the
    block's gradients are *added*; with ``accumulate=False`` they are overwritten (any supported dtype; with
    packed ``seqs``, rows outside every sequence are left untouched).
    ``lse`` and ``delta`` are fp32 ``[b, h_q, s_q]`` (packed ``[h_q, t_q]``) with unit stride along the
    sequence. ``window``/``softcap`` (keyword-only) as in :func:`attention_block_forward`; pass the same values
    as to the forward; so for ``alibi_slopes`` (keyword-only, as in :func:`attention_block_forward`; the
    slopes get no gradient); so for ``dropout`` (keyword-only: the forward's, so the same probabilities are
    dropped). Deterministic: no atomics, fixed block sizes (unless ``RING_ATTN_BWD=fused``).
    The shapes and dtypes of q/k/v, dout, lse, delta and the gradient tensors are checked before anything runs
    (TypeError / ValueError naming the argument); ``seqs`` is trusted to describe q's and k's rows.
    """
    packed = seqs is not None
    softmax_scale = _check_block("attention_block_backward", q, k, v, packed, softmax_scale, causal,
                                 causal_offset)
    _check_rows("attention_block_backward", "dout", dout, "q's shape", q.shape)
    for name, x in (("lse", lse), ("delta", delta)):
        _check_rows("attention_block_backward", name, x, "[b, h_q, s_q], packed [h_q, t_q]", lse_shape(q, packed),
                    torch.float32)
    if accumulate:
        for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
            if g.dtype != torch.float32:
                raise TypeError(f"{name} accumulator must be float32 when accumulate=True, got {g.dtype}")
    for name, g, ref in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check_rows("attention_block_backward", name, g, f"{name[1:]}'s shape", ref.shape)
        if not last_dim_contiguous(g):
            raise ValueError(f"{name} must have a contiguous last dim, got strides {g.stride()}")
    q, k, v, dout = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, dout))
    lse, delta = (x if x.stride(-1) == 1 else x.contiguous() for x in (lse, delta))
    window, softcap = _mask_mode(window, softcap)
    alibi = _alibi(alibi_slopes, q, seqs)
    impl = backends.select("attention", q.device, q.dtype, q.shape[-1], varlen=seqs is not None, window=window,
                           softcap=softcap, alibi=alibi is not None, dropout=dropout is not None)
    for sl, part, part_alibi, _ in _batch_chunks(q, seqs, alibi):
        impl.attention_backward(dout[sl], q[sl], k[sl], v[sl], lse[sl], delta[sl], dq[sl], dk[sl], dv[sl],
                                softmax_scale=softmax_scale, causal=causal, causal_offset=causal_offset, seqs=part,
                                accumulate=accumulate, window=window, softcap=softcap, alibi=part_alibi,
                                dropout=_chunk_dropout(dropout, sl, q))
