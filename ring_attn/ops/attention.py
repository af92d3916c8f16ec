"""Blockwise (flash) attention: the public functions, their custom ops and autograd.

Public (re-exported by ``ring_attn``):

* :func:`flash_attn_func` — dense ``[b, s, h, d]`` attention with autograd.
* :func:`flash_attn_varlen_func` — packed ``[t, h, d]`` sequences described by ``cu_seqlens``.
* :func:`flash_attn_qkvpacked_func`, :func:`flash_attn_kvpacked_func`, :func:`flash_attn_varlen_qkvpacked_func`,
  :func:`flash_attn_varlen_kvpacked_func` — the same on packed ``qkv`` / ``kv`` tensors (views, no copies).

Every function has flash-attn's (2.6/2.7) signature: the same positional order, names, defaults and return
conventions (``return_attn_probs=True`` gives ``(out, softmax_lse, None)``), so code written for flash-attn means
the same thing here. ``window_size`` (sliding window), ``softcap`` (Gemma 2) and ``alibi_slopes`` (ALiBi) are
implemented, and so is ``dropout_p`` (attention dropout: the mask is regenerated in the backward from a seed
drawn from torch's default CPU generator, so ``torch.manual_seed`` reproduces a call; see
``ring_attn._contracts.Dropout``), and so is a paged KV cache (``flash_attn_varlen_func``'s ``block_table``;
forward only, as in flash-attn: NotImplementedError when a gradient is wanted). Our extra, ``return_lse``, is
keyword-only.

Lower level, for the ring (documented, stable; defined in ``ring_attn.ops.attention_block`` and re-exported
here): :func:`attention_block_forward`, :func:`attention_block_backward`, :func:`attention_delta`, and
:class:`VarlenSeqs` (``ring_attn._contracts``).

Conventions (``docs/design.md``): query head ``h`` reads kv head ``h // (h_q // h_kv)``; K/V are never
repeated. Causal: query ``i`` sees key ``j`` when ``j <= i + offset``, with ``offset = s_k - s_q``
(bottom-right) unless given; ``window_size=(left, right)`` keeps keys ``i + offset - left ..= i + offset + right``
(a negative side is unbounded; causal means right = 0). LSE is fp32, natural log; a row that sees no key has
``lse = -inf`` and output 0.

Backends (``ring_attn.backends``): chosen per call from the capability table — Triton on CUDA (and on CPU
under ``TRITON_INTERPRET=1``), the native CPU extension when built, else the fp32 torch reference. Same
contracts either way.
"""
from __future__ import annotations

from typing import Optional

import torch

from ring_attn._contracts import (
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    Dropout,
    KVPages,
    VarlenSeqs,
    check_alibi_slopes,
    check_block_table,
    check_cu_seqlens,
    check_cu_seqlens_form,
    check_dropout,
    check_flag,
    check_max_seqlen,
    check_pages,
    check_pages_used,
    check_qkv,
    check_scale,
    check_softcap,
    check_tensor,
    check_window,
    flash_attn_window,
)
from ring_attn.backends import check_deterministic
from ring_attn.ops._dispatch import traced
from ring_attn.ops.attention_block import (
    attention_block_backward,
    attention_block_forward,
    attention_delta,
    lse_shape,
)

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "attention_block_forward",
    "attention_block_backward",
    "attention_delta",
    "VarlenSeqs",
    "SUPPORTED_DTYPES",
    "MAX_HEAD_DIM",
]


# ---------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (fake implementations give shapes), differentiable via
# register_autograd. Dense when cu_seqlens_q is None.


def _op_seqs(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    if cu_seqlens_q is None:
        return None
    return VarlenSeqs.from_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def _call_dropout(q, k, seqs: Optional[VarlenSeqs], dropout_p: float, seed: int) -> Optional[Dropout]:
    """The call's :class:`Dropout` (rows: dense ``b · s_q``, packed ``t_q``; keys: ``s_k`` / the longest key
    sequence)."""
    if dropout_p <= 0:
        return None
    if seqs is None:
        return Dropout(dropout_p, seed, q.shape[0] * q.shape[1], k.shape[1])
    return Dropout(dropout_p, seed, q.shape[0], int(seqs.max_len_k))


def attention_forward_seqs(q, k, v, seqs: Optional[VarlenSeqs], softmax_scale: float, causal: bool,
                           window: tuple[int, int], softcap: float, alibi_slopes, dropout_p: float):
    """The forward behind every public attention function, on validated arguments: dense ``[b, s, h, d]`` when
    ``seqs`` is None, else packed ``[t, h, d]`` sequences. Returns ``(out, lse, seed)``: ``seed`` is an int64
    CPU tensor ``[1]``, the dropout seed drawn here (at run time, not when a graph is traced, so every call gets
    a fresh one) for :func:`attention_backward_seqs`; 0 without dropout. Also what ``ring_attn.ops.padding``
    runs on the gathered rows."""
    seed = Dropout.draw_seed() if dropout_p > 0 else 0
    out, lse = attention_block_forward(q, k, v, softmax_scale, causal, None, seqs, window=window, softcap=softcap,
                                       alibi_slopes=alibi_slopes,
                                       dropout=_call_dropout(q, k, seqs, dropout_p, seed))
    return out, lse, torch.tensor([seed], dtype=torch.int64)


def _grad_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient for ``x``: ``x``'s layout (a permuted view's too), except that the last dim is
    contiguous, as the kernels write it (flash-attn makes such inputs contiguous, so its gradients are)."""
    return torch.empty_like(x) if x.stride(-1) == 1 or x.shape[-1] == 1 else \
        torch.empty_like(x, memory_format=torch.contiguous_format)


def attention_backward_seqs(dout, q, k, v, out, lse, dlse, seqs: Optional[VarlenSeqs], softmax_scale: float,
                            causal: bool, window: tuple[int, int], softcap: float, alibi_slopes, dropout_p: float,
                            seed: torch.Tensor):
    """``(dq, dk, dv)`` of :func:`attention_forward_seqs` (``dlse``: the gradient into the LSE output, or
    None; ``seed``: the forward's)."""
    delta = attention_delta(dout, out, dlse)
    dq, dk, dv = _grad_like(q), _grad_like(k), _grad_like(v)
    attention_block_backward(dout, q, k, v, lse, delta, dq, dk, dv, softmax_scale, causal, None, seqs,
                             accumulate=False, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                             dropout=_call_dropout(q, k, seqs, dropout_p, int(seed[0])))
    return dq, dk, dv


def _forward_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                  causal: bool, window_left: int, window_right: int, softcap: float, alibi_slopes,
                  dropout_p: float):
    """:func:`attention_forward_seqs` in the custom op's arguments; runs inside the op (traced calls) or directly
    (eager, :class:`_Eager`)."""
    if cu_seqlens_q is not None:  # value checks need a host read; done here, outside any traced graph
        check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", q.device)
        check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", q.device)
    seqs = _op_seqs(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return attention_forward_seqs(q, k, v, seqs, softmax_scale, causal, (window_left, window_right), softcap,
                                  alibi_slopes, dropout_p)


def _backward_impl(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                   max_seqlen_k: int, softmax_scale: float, causal: bool, window_left: int, window_right: int,
                   softcap: float, alibi_slopes, dropout_p: float, seed):
    """``(dq, dk, dv)`` of :func:`_forward_impl` (``dlse``: the gradient into the LSE output, or None)."""
    seqs = _op_seqs(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return attention_backward_seqs(dout, q, k, v, out, lse, dlse, seqs, softmax_scale, causal,
                                   (window_left, window_right), softcap, alibi_slopes, dropout_p, seed)


@torch.library.custom_op("ring_attn::flash_attn_forward", mutates_args=())
def _flash_attn_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                           max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                           causal: bool, window_left: int, window_right: int,
                           softcap: float, alibi_slopes: Optional[torch.Tensor],
                           dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                         window_left, window_right, softcap, alibi_slopes, dropout_p)


@_flash_attn_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap, alibi_slopes, dropout_p):
    packed = cu_seqlens_q is not None
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(lse_shape(q, packed), dtype=torch.float32), torch.empty(1, dtype=torch.int64)


@torch.library.custom_op("ring_attn::flash_attn_backward", mutates_args=())
def _flash_attn_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
                            cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                            max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                            causal: bool, window_left: int, window_right: int, softcap: float,
                            alibi_slopes: Optional[torch.Tensor], dropout_p: float,
                            seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p, seed)


@_flash_attn_backward_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      causal, window_left, window_right, softcap, alibi_slopes, dropout_p, seed):
    return _grad_like(q), _grad_like(k), _grad_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *meta, alibi, dropout_p = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, seed)
    ctx.meta = tuple(meta)  # max_q, max_k, scale, causal, window_left, window_right, softcap
    ctx.dropout_p = dropout_p


def _backward(ctx, dout, dlse, dseed):
    q, k, v, out, lse, cu_q, cu_k, alibi, seed = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.ring_attn.flash_attn_backward(dout, q, k, v, out, lse, dlse, cu_q, cu_k, *ctx.meta,
                                                         alibi, ctx.dropout_p, seed)
    # no gradient for cu_seqlens, the options, the ALiBi slopes (flash-attn gives the slopes none either) and
    # dropout_p
    return (dq, dk, dv) + (None,) * (2 + len(ctx.meta) + 2)


torch.library.register_autograd("ring_attn::flash_attn_forward", _backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The custom op's forward and backward as a plain autograd Function, for eager calls (see
    ``ring_attn.ops._dispatch``): less host time per call, the same functions, the same bits."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse, seed = _forward_impl(*inputs)
        _setup_context(ctx, inputs, (out, lse, seed))  # what the op's autograd saves
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k, alibi, seed = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward_impl(dout, q, k, v, out, lse, dlse, cu_q, cu_k, *ctx.meta, alibi, ctx.dropout_p,
                                    seed)
        return (dq, dk, dv) + (None,) * (2 + len(ctx.meta) + 2)


def _attention(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool, left: int, right: int,
               cap: float, alibi, p: float):
    """``(out, lse)`` of the public functions: the custom op when traced, else :class:`_Eager` (the same
    implementation with less host overhead), or the forward alone when no gradient is wanted."""
    if traced(q, k, v, cu_q, alibi):
        out, lse, _seed = torch.ops.ring_attn.flash_attn_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal,
                                                                 left, right, cap, alibi, p)
        return out, lse
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _Eager.apply(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, left, right, cap, alibi, p)
    out, lse, _seed = _forward_impl(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, left, right, cap, alibi, p)
    return out, lse


# ---------------------------------------------------------------------------------------------------------
# Argument checks shared by the public functions (all before any kernel launch)


def _check_options(d: int, dropout_p, softmax_scale, causal, window_size, softcap, deterministic,
                   return_attn_probs, return_lse):
    """Validate flash-attn's options (``alibi_slopes`` is checked by the caller, which knows the batch);
    returns ``(scale, causal, (left, right), softcap, dropout_p)``."""
    scale = check_scale(softmax_scale, d)
    p = check_dropout(dropout_p)
    causal = check_flag("causal", causal)
    window = check_window(window_size)
    cap = check_softcap(softcap)
    # every backward is deterministic here, except the opt-in RING_ATTN_BWD=fused, which contradicts True
    check_deterministic(check_flag("deterministic", deterministic))
    check_flag("return_attn_probs", return_attn_probs)
    check_flag("return_lse", return_lse)
    return scale, causal, window, cap, p


def _result(out, lse, return_attn_probs, return_lse):
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out


def _unbind_packed(name: str, x, n: int, dim: int, layout: str):
    """Views ``x.unbind(dim)`` of a packed tensor (no copies; autograd flows back into ``x``)."""
    check_tensor(name, x)
    if x.dim() != dim + 3 or x.shape[dim] != n:
        raise ValueError(f"{name} must be {dim + 3}-D {layout}, got shape {tuple(x.shape)}")
    return x.unbind(dim)


# ---------------------------------------------------------------------------------------------------------
# Public functions (flash-attn's signatures)

_COMMON_DOC = """
        dropout_p: attention dropout probability in [0, 1): each attention probability (after the softmax, whose
            LSE is returned undropped) is zeroed with probability ``dropout_p`` and the rest scaled by
            ``1 / (1 - dropout_p)``, as flash-attn does (pass 0.0 in evaluation). The mask comes from a seed drawn
            from torch's default CPU generator (``torch.manual_seed`` reproduces a call) and is regenerated in the
            backward. Bits differ from flash-attn's (another random stream). Every backend runs it.
        softmax_scale: default ``1 / sqrt(head_dim)``.
        causal: query ``i`` sees keys ``j <= i + seqlen_k - seqlen_q`` (bottom-right aligned, as flash-attn
            >= 2.1). A query that sees no key gets output 0 and ``lse = -inf``.
        window_size: ``(left, right)`` sliding window (Mistral, Qwen2): query ``i`` sees keys
            ``i + seqlen_k - seqlen_q - left ..= i + seqlen_k - seqlen_q + right``; -1 (any negative) is
            unbounded; with ``causal`` the right side is 0. As in flash-attn's code, a side ``>= seqlen_k``
            (varlen: ``max_seqlen_k``) is unbounded too, and a window bounded on the left only has ``seqlen_k``
            as its right side (both show only when ``seqlen_q > seqlen_k + 1``). Key blocks outside the window
            are never visited.
        softcap: ``> 0``: scores become ``softcap * tanh(scores / softcap)`` (Gemma 2); 0.0 is off.
        alibi_slopes: ALiBi: None, or float32 ``[heads_q]`` or ``[batch, heads_q]`` (varlen: ``[n_seqs, heads_q]``)
            on q's device; adds ``-slope * |i + seqlen_k - seqlen_q - j|`` to the score of query ``i`` and key
            ``j`` (after the softcap, before masking; per sequence in varlen). The slopes get no gradient.
        deterministic: the backward is bitwise deterministic either way; True under the opt-in
            ``RING_ATTN_BWD=fused`` (unordered atomics) is refused with ValueError.
        return_attn_probs: return ``(out, softmax_lse, None)``: flash-attn's ``S_dmask`` (the dropout pattern,
            for its tests) is not materialised and is None (``ring_attn.reference.dropout_keep`` computes it).
        return_lse (keyword-only, ours): return ``(out, lse)``."""


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, return_lse=False):
    """Exact attention over dense batches, computed blockwise (FlashAttention-2 algorithm) with autograd;
    flash-attn's ``flash_attn_func`` signature.

    Args:
        q: ``[batch, seqlen_q, heads_q, head_dim]``; float16, bfloat16 or float32. Any strides with a contiguous
            last dim (e.g. a view of a fused qkv projection) are used without copies. ``head_dim`` 1..256.
        k, v: ``[batch, seqlen_k, heads_kv, head_dim]``, same dtype and device; ``heads_q % heads_kv == 0``
            (GQA/MQA: query head ``h`` reads kv head ``h // (heads_q // heads_kv)``; K/V are never repeated).
{common}

    Returns:
        ``out`` ``[batch, seqlen_q, heads_q, head_dim]`` in the input dtype; with ``return_lse`` ``(out, lse)``;
        with ``return_attn_probs`` ``(out, lse, None)``. ``lse``: float32 ``[batch, heads_q, seqlen_q]``, natural
        log of the softmax denominator (differentiable).

    Raises:
        TypeError / ValueError naming the argument for wrong types, ranks, dtypes, devices, head counts, head
        dims, option values (``dropout_p`` outside [0, 1)) or ``alibi_slopes`` (dtype, shape, device); all before
        any kernel runs.
    """
    h_q, _h_kv, d = check_qkv(q, k, v, packed=False)
    scale, causal, window, cap, p = _check_options(d, dropout_p, softmax_scale, causal, window_size, softcap,
                                                   deterministic, return_attn_probs, return_lse)
    check_alibi_slopes(alibi_slopes, q.device, q.shape[0], h_q, "batch")
    window = flash_attn_window(window, k.shape[1], q.shape[1])
    out, lse = _attention(q, k, v, None, None, q.shape[1], k.shape[1], scale, causal, window[0], window[1], cap,
                          alibi_slopes, p)
    return _result(out, lse, return_attn_probs, return_lse)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, return_lse=False):
    """Exact attention over packed sequences of different lengths, with autograd; flash-attn's
    ``flash_attn_varlen_func`` signature.

    Args:
        q: ``[total_q, heads_q, head_dim]``: sequence ``i`` is rows ``cu_seqlens_q[i] : cu_seqlens_q[i+1]``.
        k, v: ``[total_k, heads_kv, head_dim]``, split by ``cu_seqlens_k``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[n_seqs + 1]`` on q's device, starting at 0, non-decreasing,
            ending at the token count. Zero-length sequences are allowed.
        max_seqlen_q, max_seqlen_k: the longest sequence in each (an upper bound is fine): an int, a numpy
            integer or a one-element integer tensor.
{common}
            Causal alignment and windows are per sequence.
        block_table: None, or int32 ``[n_seqs, max_num_blocks_per_seq]`` on q's device: k and v are then a
            paged cache ``[num_blocks, page_block_size, heads_kv, head_dim]`` and key ``j`` of sequence ``i``
            is row ``j % page_block_size`` of page ``block_table[i, j // page_block_size]`` (``cu_seqlens_k``
            gives the lengths, not rows of k). Forward only, without dropout, as in flash-attn; any
            page size (flash-attn 2 needs a multiple of 256).

    Returns:
        ``out`` ``[total_q, heads_q, head_dim]``; with ``return_lse`` ``(out, lse)``; with ``return_attn_probs``
        ``(out, lse, None)``. ``lse``: float32 ``[heads_q, total_q]``.

    Raises:
        as :func:`flash_attn_func`, plus ValueError/TypeError for malformed ``cu_seqlens`` (wrong dtype, not
        starting at 0, decreasing, last entry not the token count, a sequence longer than ``max_seqlen``) or
        ``max_seqlen`` (negative, float, bool); with ``block_table``, ValueError for a malformed table or one
        naming a page outside the cache, NotImplementedError when a gradient is wanted or ``dropout_p > 0``.
    """
    paged = block_table is not None
    if paged:  # a paged cache [n_pages, page, h_kv, d], checked as such and seen as its rows [n_pages·page, h_kv, d]
        k, v, page = _page_rows(k, v)
    h_q, _h_kv, d = check_qkv(q, k, v, packed=True)
    scale, causal, window, cap, p = _check_options(d, dropout_p, softmax_scale, causal, window_size, softcap,
                                                   deterministic, return_attn_probs, return_lse)
    check_cu_seqlens_form("cu_seqlens_q", cu_seqlens_q)
    check_cu_seqlens_form("cu_seqlens_k", cu_seqlens_k)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.shape[0]}; both must be n_seqs + 1")
    # an upper bound is fine, and none is needed past the token count: the grids are sized by these (a bound of
    # 2^40 made the native backend loop for minutes over 7 tokens)
    max_q = min(check_max_seqlen("max_seqlen_q", max_seqlen_q), q.shape[0])
    max_k = check_max_seqlen("max_seqlen_k", max_seqlen_k)
    window = flash_attn_window(window, max_k, max_q)
    if not paged:
        max_k = min(max_k, k.shape[0])
    check_alibi_slopes(alibi_slopes, q.device, cu_seqlens_q.shape[0] - 1, h_q, "n_seqs")
    if paged:
        out, lse = _paged_varlen(q, k, v, page, block_table, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, causal,
                                 window, cap, alibi_slopes, p)
    else:
        out, lse = _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, causal, window[0],
                              window[1], cap, alibi_slopes, p)
    return _result(out, lse, return_attn_probs, return_lse)


_VARLEN = "flash_attn_varlen_func"


def _page_rows(k, v):
    """``(k_rows, v_rows, page)``: a paged cache ``[n_pages, page, h_kv, d]`` checked and viewed as its rows
    ``[n_pages · page, h_kv, d]`` (views: ``check_pages`` guarantees the pages follow each other)."""
    for arg, x in (("k", k), ("v", v)):
        check_tensor(arg, x)
        if x.dim() != 4:
            raise ValueError(f"{_VARLEN}: with block_table, {arg} must be a paged cache [num_blocks, "
                             f"page_block_size, heads_kv, head_dim], got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{_VARLEN}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    check_pages("k", k, _VARLEN)
    check_pages("v", v, _VARLEN)
    return k.flatten(0, 1), v.flatten(0, 1), k.shape[1]


@torch.compiler.disable  # host reads (lengths, the table check) and no autograd: eager under torch.compile
def _paged_varlen(q, k_rows, v_rows, page: int, block_table, cu_seqlens_q, cu_seqlens_k, max_q: int, max_k: int,
                  scale: float, causal: bool, window, cap: float, alibi_slopes, p: float):
    """``(out, lse)`` of :func:`flash_attn_varlen_func` over a paged cache whose arguments the caller has checked
    (``k_rows``/``v_rows``: the pages' rows, from :func:`_page_rows`): what only a paged call checks, then one
    forward reading the pages in place."""
    if p > 0:
        raise NotImplementedError(f"{_VARLEN}: dropout_p={p} with block_table: a paged KV cache is forward-only "
                                  f"(inference), as in flash-attn; pass dropout_p=0.0")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k_rows, v_rows)):
        raise NotImplementedError(f"{_VARLEN}: no gradient flows through a paged KV cache (block_table), as in "
                                  f"flash-attn; call it under torch.no_grad() or with tensors that do not require "
                                  f"grad")
    n = cu_seqlens_q.shape[0] - 1
    block_table = check_block_table(block_table, n, q.device, _VARLEN)
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_q, "max_seqlen_q", q.device)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, None, max_k, "max_seqlen_k", q.device)
    seqs = VarlenSeqs.from_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_q, max_k)
    capacity = block_table.shape[1] * page
    longest = int(seqs.lens_k.max()) if n else 0
    if longest > capacity:
        raise ValueError(f"{_VARLEN}: cu_seqlens_k has a sequence of {longest} keys, but block_table holds "
                         f"{block_table.shape[1]} pages of {page} rows ({capacity} keys) per sequence")
    check_pages_used(block_table, seqs.lens_k, page, k_rows.shape[0] // page, _VARLEN, sync=True)
    with torch.no_grad():
        return attention_block_forward(q, k_rows, v_rows, scale, causal, None,
                                       seqs._replace(max_len_k=min(max_k, capacity)), window=window, softcap=cap,
                                       alibi_slopes=alibi_slopes, pages=KVPages(block_table, page))


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              return_lse=False):
    """:func:`flash_attn_func` on a packed ``qkv`` ``[batch, seqlen, 3, heads, head_dim]`` (flash-attn's
    ``flash_attn_qkvpacked_func``). q, k, v are views of ``qkv`` (no copies); gradients flow back into ``qkv``.
    Other arguments, returns and raises as :func:`flash_attn_func`."""
    q, k, v = _unbind_packed("qkv", qkv, 3, 2, "[batch, seqlen, 3, heads, head_dim]")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, return_lse=return_lse)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             return_lse=False):
    """:func:`flash_attn_func` with a packed ``kv`` ``[batch, seqlen_k, 2, heads_kv, head_dim]`` (flash-attn's
    ``flash_attn_kvpacked_func``; GQA/MQA when ``heads_kv < heads_q``). k, v are views of ``kv`` (no copies).
    Other arguments, returns and raises as :func:`flash_attn_func`."""
    k, v = _unbind_packed("kv", kv, 2, 2, "[batch, seqlen_k, 2, heads_kv, head_dim]")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, return_lse=return_lse)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, return_lse=False):
    """:func:`flash_attn_varlen_func` on a packed ``qkv`` ``[total, 3, heads, head_dim]`` with one
    ``cu_seqlens``/``max_seqlen`` for queries and keys (flash-attn's ``flash_attn_varlen_qkvpacked_func``).
    q, k, v are views of ``qkv`` (no copies). Other arguments, returns and raises as
    :func:`flash_attn_varlen_func`."""
    q, k, v = _unbind_packed("qkv", qkv, 3, 1, "[total_tokens, 3, heads, head_dim]")
    try:
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                      softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                      return_attn_probs, return_lse=return_lse)
    except (TypeError, ValueError, NotImplementedError) as exc:  # name the arguments this caller passed
        text = str(exc)
        for ours, theirs in (("cu_seqlens_q", "cu_seqlens"), ("cu_seqlens_k", "cu_seqlens"),
                             ("max_seqlen_q", "max_seqlen"), ("max_seqlen_k", "max_seqlen")):
            text = text.replace(ours, theirs)
        if text == str(exc):
            raise
        raise type(exc)(text).with_traceback(exc.__traceback__) from None


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    return_lse=False):
    """:func:`flash_attn_varlen_func` with a packed ``kv`` ``[total_k, 2, heads_kv, head_dim]`` (flash-attn's
    ``flash_attn_varlen_kvpacked_func``). k, v are views of ``kv`` (no copies). Other arguments, returns and
    raises as :func:`flash_attn_varlen_func`."""
    k, v = _unbind_packed("kv", kv, 2, 1, "[total_k, 2, heads_kv, head_dim]")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, return_lse=return_lse)


for _f in (flash_attn_func, flash_attn_varlen_func):
    if _f.__doc__:  # None under python -OO
        _f.__doc__ = _f.__doc__.format(common=_COMMON_DOC.strip("\n"))
del _f
