"""Attention over a padded batch: ``[b, s, h, d]`` tensors and a 2-D key-padding mask, as one custom op.

:func:`padded_attention` is what a padded batch needs (HuggingFace's ``attention_mask``: left padding in batched
generation, right padding in training): the real tokens of every row are gathered into packed sequences, the
varlen kernels run, and the result is scattered back (zeros at padded query rows). Whether the mask pads at all,
and where, needs host reads of the mask; they happen *inside* the custom op, so under ``torch.compile`` the op is
one opaque node of the graph (no graph break), and eagerly the plan is built once per mask tensor (cached on it,
so every layer of a forward shares it). An all-ones mask takes the dense kernels (the same call, and bits, as
``flash_attn_func``).

Queries are the last ``s_q`` key positions (true with a growing cache), so bottom-right causal alignment per row
is exact even for masks with holes; a sliding window counts positions, so it needs each row's real tokens
contiguous (left or right padding).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ring_attn._contracts import (
    Dropout,
    VarlenSeqs,
    check_dropout,
    check_flag,
    check_qkv,
    check_scale,
    check_softcap,
    check_window,
)
from ring_attn.ops._dispatch import traced
from ring_attn.ops.attention import attention_backward_seqs, attention_forward_seqs

__all__ = ["padded_attention", "unpad_plan", "UnpadPlan", "tensor_cache"]

_CACHE_TAG = "_ring_attn_derived"  # attribute on a mask tensor: what is derived from it (see tensor_cache)


def tensor_cache(t: torch.Tensor) -> dict:
    """A dict stored on the tensor object ``t`` (what is derived from it once, e.g. per forward); emptied when
    ``t`` has been modified in place since (its version counter moved), so a mask buffer a caller rewrites
    between forwards is analysed again. Writes that bypass the version counter (through ``t.data``, ``t.numpy()``
    or another tensor sharing its storage without being a view of it) are not seen: the cached result is used."""
    cache = getattr(t, _CACHE_TAG, None)
    if cache is None or cache.get("version") != t._version:
        cache = {"version": t._version}
        setattr(t, _CACHE_TAG, cache)
    return cache


class UnpadPlan(NamedTuple):
    """How a padded batch becomes packed sequences: the real query and key rows of ``[b·s, ...]``, their
    ``cu_seqlens`` (int32) and longest lengths, whether some row's real tokens are not contiguous, and whether
    nothing is padded at all (``dense``: the other fields are then unused)."""
    idx_q: torch.Tensor
    idx_k: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    holes: bool
    dense: bool


def unpad_plan(keep: torch.Tensor, s_q: int) -> UnpadPlan:
    """:class:`UnpadPlan` of the bool keep-mask ``keep`` ``[b, s_k]`` (True = real token) with the last ``s_q``
    positions as queries: one host read, once per mask tensor (cached on it, see :func:`tensor_cache`)."""
    cache = None if torch.compiler.is_compiling() else tensor_cache(keep)
    if cache is not None and ("unpad", s_q) in cache:
        return cache[("unpad", s_q)]
    b, s_k = keep.shape
    if keep.numel() == 0 or s_q == 0:  # nothing to attend or no query: the dense call of empty shapes
        none = keep.new_zeros(0, dtype=torch.int64)
        cu = keep.new_zeros(b + 1, dtype=torch.int32)
        return UnpadPlan(none, none, cu, cu, 0, 0, False, True)
    cols = torch.arange(s_k, device=keep.device).expand(b, s_k)
    first = torch.where(keep, cols, s_k).min(1).values
    last = torch.where(keep, cols, -1).max(1).values
    len_q, len_k = keep[:, -s_q:].sum(1), keep.sum(1)
    holes = ((last - first + 1 != len_k) & (len_k > 0)).any()
    max_q, max_k, has_holes, total_k = torch.stack([len_q.max(), len_k.max(), holes.long(), len_k.sum()]).tolist()
    zero = len_q.new_zeros(1)
    plan = UnpadPlan(keep[:, -s_q:].reshape(-1).nonzero().reshape(-1), keep.reshape(-1).nonzero().reshape(-1),
                     torch.cat([zero, len_q.cumsum(0)]).to(torch.int32),
                     torch.cat([zero, len_k.cumsum(0)]).to(torch.int32),
                     int(max_q), int(max_k), bool(has_holes), int(total_k) == b * s_k)
    if cache is not None:
        cache[("unpad", s_q)] = plan
    return plan


def _plan_for(keep, s_q: int, window: tuple[int, int]) -> UnpadPlan:
    plan = unpad_plan(keep, s_q)
    if window != (-1, -1) and plan.holes:
        raise NotImplementedError(
            f"a sliding window (window_size={window}) with an attention_mask that has holes inside a row: "
            f"ring_attn supports left or right padding with sliding windows")
    return plan


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The rows ``idx`` of ``x`` ``[b, s, h, d]`` flattened to ``[b·s, h, d]``: ``[len(idx), h, d]``."""
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3]).index_select(0, idx)


def _scatter(packed: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``packed`` ``[len(idx), h, d]`` written at rows ``idx`` of zeros shaped like ``like`` ``[b, s, h, d]``."""
    b, s, h, d = like.shape
    return packed.new_zeros(b * s, h, d).index_copy(0, idx, packed).reshape(b, s, h, d)


def _padded_forward_impl(q, k, v, keep, softmax_scale: float, causal: bool, window_left: int, window_right: int,
                         softcap: float, dropout_p: float):
    """``(out [b, s_q, h, d]`` with zeros at padded query rows, ``lse`` fp32 ``[b, h, s_q]`` with -inf there,
    ``seed``: int64 CPU ``[1]``, drawn at run time for dropout, 0 without): the forward op's body, also run
    directly by :class:`_EagerPadded`."""
    window = (window_left, window_right)
    b, s_q, h, d = q.shape
    plan = _plan_for(keep, s_q, window)
    if plan.dense:
        return attention_forward_seqs(q, k, v, None, softmax_scale, causal, window, softcap, None, dropout_p)
    if plan.max_q == 0:  # every query row padded
        seed = Dropout.draw_seed() if dropout_p > 0 else 0
        return q.new_zeros(q.shape), torch.full((b, h, s_q), float("-inf"), dtype=torch.float32, device=q.device), \
            torch.tensor([seed], dtype=torch.int64)
    seqs = VarlenSeqs.from_cu_seqlens(plan.cu_q, plan.cu_k, plan.max_q, plan.max_k)
    o, l, seed = attention_forward_seqs(_rows(q, plan.idx_q), _rows(k, plan.idx_k), _rows(v, plan.idx_k), seqs,
                                        softmax_scale, causal, window, softcap, None, dropout_p)
    lse = torch.full((h, b * s_q), float("-inf"), dtype=torch.float32, device=q.device) \
        .index_copy(1, plan.idx_q, l).reshape(h, b, s_q).permute(1, 0, 2).contiguous()
    return _scatter(o, plan.idx_q, q), lse, seed


@torch.library.custom_op("ring_attn::padded_attention_forward", mutates_args=())
def _padded_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                       softmax_scale: float, causal: bool, window_left: int, window_right: int,
                       softcap: float, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _padded_forward_impl(q, k, v, keep, softmax_scale, causal, window_left, window_right, softcap,
                                dropout_p)


@_padded_forward_op.register_fake
def _(q, k, v, keep, softmax_scale, causal, window_left, window_right, softcap, dropout_p):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32), torch.empty(1, dtype=torch.int64)


def _padded_backward_impl(dout, q, k, v, out, lse, keep, softmax_scale: float, causal: bool, window_left: int,
                          window_right: int, softcap: float, dropout_p: float, seed):
    """``(dq, dk, dv)`` of :func:`_padded_forward_impl`: the backward op's body, also run by
    :class:`_EagerPadded`."""
    window = (window_left, window_right)
    b, s_q, h, d = q.shape
    plan = _plan_for(keep, s_q, window)
    if plan.dense:
        return attention_backward_seqs(dout, q, k, v, out, lse, None, None, softmax_scale, causal, window, softcap,
                                       None, dropout_p, seed)
    if plan.max_q == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    seqs = VarlenSeqs.from_cu_seqlens(plan.cu_q, plan.cu_k, plan.max_q, plan.max_k)
    lp = lse.permute(1, 0, 2).reshape(h, b * s_q).index_select(1, plan.idx_q)
    dqp, dkp, dvp = attention_backward_seqs(_rows(dout, plan.idx_q), _rows(q, plan.idx_q), _rows(k, plan.idx_k),
                                            _rows(v, plan.idx_k), _rows(out, plan.idx_q), lp, None, seqs,
                                            softmax_scale, causal, window, softcap, None, dropout_p, seed)
    return _scatter(dqp, plan.idx_q, q), _scatter(dkp, plan.idx_k, k), _scatter(dvp, plan.idx_k, v)


@torch.library.custom_op("ring_attn::padded_attention_backward", mutates_args=())
def _padded_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, keep: torch.Tensor, softmax_scale: float,
                        causal: bool, window_left: int, window_right: int, softcap: float, dropout_p: float,
                        seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _padded_backward_impl(dout, q, k, v, out, lse, keep, softmax_scale, causal, window_left, window_right,
                                 softcap, dropout_p, seed)


@_padded_backward_op.register_fake
def _(dout, q, k, v, out, lse, keep, softmax_scale, causal, window_left, window_right, softcap, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, keep, *meta = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, keep, seed)
    ctx.meta = tuple(meta)  # scale, causal, window_left, window_right, softcap, dropout_p


def _backward(ctx, dout, dlse, dseed):
    q, k, v, out, lse, keep, seed = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.ring_attn.padded_attention_backward(dout.contiguous(), q, k, v, out, lse, keep,
                                                                *ctx.meta, seed)
    return (dq, dk, dv, None) + (None,) * len(ctx.meta)


torch.library.register_autograd("ring_attn::padded_attention_forward", _backward, setup_context=_setup_context)


class _EagerPadded(torch.autograd.Function):
    """The custom ops' forward and backward as a plain autograd Function, for eager calls (see
    ``ring_attn.ops._dispatch``): less host time per call, the same functions, the same bits."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse, seed = _padded_forward_impl(*inputs)
        _setup_context(ctx, inputs, (out, lse, seed))  # what the op's autograd saves
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, keep, seed = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _padded_backward_impl(dout.contiguous(), q, k, v, out, lse, keep, *ctx.meta, seed)
        return (dq, dk, dv, None) + (None,) * len(ctx.meta)


def padded_attention(q, k, v, key_padding_mask, dropout_p=0.0, softmax_scale=None, causal=False,
                     window_size=(-1, -1), softcap=0.0):
    """Attention over a padded batch, with autograd: only the real tokens of each row attend and are attended to.

    Args:
        q: ``[batch, seqlen_q, heads_q, head_dim]``; float16, bfloat16 or float32. The queries are the last
            ``seqlen_q`` of the ``seqlen_k`` positions (a prefix cache or none).
        k, v: ``[batch, seqlen_k, heads_kv, head_dim]``, same dtype and device; ``heads_q % heads_kv == 0``.
        key_padding_mask: ``[batch, seqlen_k]`` bool or integer tensor on q's device, nonzero = real token
            (HuggingFace's 2-D ``attention_mask``); the last ``seqlen_q`` columns are the queries'. What is
            derived from it is cached on the tensor until it is modified in place; a write that bypasses autograd's
            version counter (``mask.data[...] = ...``, through ``mask.numpy()``) is not seen: pass a new tensor.
        dropout_p, softmax_scale, causal, window_size, softcap: as in :func:`ring_attn.flash_attn_func`, applied
            per row to its real tokens (causal: bottom-right aligned per row; a window needs each row's real
            tokens contiguous, i.e. left or right padding).

    Returns:
        ``out`` ``[batch, seqlen_q, heads_q, head_dim]`` in the input dtype, zeros at padded query positions (whose
        gradients are ignored).

    Raises:
        TypeError / ValueError naming the argument (as :func:`ring_attn.flash_attn_func`, and the mask's dtype,
        shape and device) before any kernel; NotImplementedError for a window over a row with holes (raised when
        the op runs: finding holes needs the mask's values).
    """
    _h_q, _h_kv, d = check_qkv(q, k, v, packed=False)
    scale = check_scale(softmax_scale, d)
    p = check_dropout(dropout_p)
    causal = check_flag("causal", causal)
    window = check_window(window_size)
    cap = check_softcap(softcap)
    m = key_padding_mask
    if not isinstance(m, torch.Tensor) or m.dtype.is_floating_point or m.is_complex():
        raise TypeError(f"key_padding_mask must be a bool or integer tensor, got "
                        f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
    if tuple(m.shape) != (k.shape[0], k.shape[1]):
        raise ValueError(f"key_padding_mask must be [batch, seqlen_k] = {(k.shape[0], k.shape[1])}, got "
                         f"{tuple(m.shape)}")
    if m.device != q.device:
        raise ValueError(f"key_padding_mask is on {m.device}, q on {q.device}; expected one device")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"seqlen_q ({q.shape[1]}) must not exceed seqlen_k ({k.shape[1]}): the queries are the "
                         f"last seqlen_q key positions")
    keep = m if m.dtype == torch.bool else m != 0
    args = (q, k, v, keep, scale, causal, window[0], window[1], cap, p)
    if traced(q, k, v, keep):  # compile, export, FakeTensor, dispatch modes, subclasses: the custom op
        return torch.ops.ring_attn.padded_attention_forward(*args)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerPadded.apply(*args)
    return _padded_forward_impl(*args)[0]
