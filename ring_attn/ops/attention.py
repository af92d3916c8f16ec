"""Blockwise (flash) attention: the public functions, their custom ops and autograd.

Public (re-exported by ``ring_attn``):

* :func:`flash_attn_func` — dense ``[b, s, h, d]`` attention with autograd.
* :func:`flash_attn_varlen_func` — packed ``[t, h, d]`` sequences described by ``cu_seqlens``.

Lower level, for the ring (documented, stable; defined in ``ring_attn.ops.attention_block`` and re-exported
here): :func:`attention_block_forward`, :func:`attention_block_backward`, :func:`attention_delta`, and
:class:`VarlenSeqs` (``ring_attn._contracts``).

Conventions (``docs/design.md``): query head ``h`` reads kv head ``h // (h_q // h_kv)``; K/V are never
repeated. Causal: query ``i`` sees key ``j`` when ``j <= i + offset``, with ``offset = s_k - s_q``
(bottom-right) unless given. LSE is fp32, natural log; a row that sees no key has ``lse = -inf`` and output 0.

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
    VarlenSeqs,
    check_cu_seqlens,
    check_cu_seqlens_form,
    check_qkv,
    check_scale,
)
from ring_attn.ops.attention_block import (
    attention_block_backward,
    attention_block_forward,
    attention_delta,
    lse_shape,
)

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
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


@torch.library.custom_op("ring_attn::flash_attn_forward", mutates_args=())
def _flash_attn_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                           max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                           causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if cu_seqlens_q is not None:  # value checks need a host read; done here, outside any traced graph
        check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", q.device)
        check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", q.device)
    seqs = _op_seqs(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return attention_block_forward(q, k, v, softmax_scale, causal, None, seqs)


@_flash_attn_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    packed = cu_seqlens_q is not None
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(lse_shape(q, packed), dtype=torch.float32)


@torch.library.custom_op("ring_attn::flash_attn_backward", mutates_args=())
def _flash_attn_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
                            cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                            max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                            causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs = _op_seqs(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    delta = attention_delta(dout, out, dlse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    attention_block_backward(dout, q, k, v, lse, delta, dq, dk, dv, softmax_scale, causal, None, seqs,
                             accumulate=False)
    return dq, dk, dv


@_flash_attn_backward_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.meta = (max_q, max_k, scale, causal)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale, causal = ctx.meta
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.ring_attn.flash_attn_backward(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q,
                                                         max_k, scale, causal)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("ring_attn::flash_attn_forward", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Public functions


def flash_attn_func(q, k, v, causal: bool = False, softmax_scale: Optional[float] = None,
                    return_lse: bool = False):
    """Exact attention over dense batches, computed blockwise (FlashAttention-2 algorithm) with autograd.

    Args:
        q: ``[batch, seqlen_q, heads_q, head_dim]``; float16, bfloat16 or float32. Any strides with a contiguous
            last dim (e.g. a view of a fused qkv projection) are used without copies.
        k, v: ``[batch, seqlen_k, heads_kv, head_dim]``, same dtype and device; ``heads_q % heads_kv == 0``
            (GQA/MQA: query head ``h`` reads kv head ``h // (heads_q // heads_kv)``; K/V are never repeated).
            ``head_dim`` is a multiple of 8 up to 256.
        causal: mask so query ``i`` sees keys ``j <= i + seqlen_k - seqlen_q`` (bottom-right aligned, as in
            flash-attn >= 2.1). A query that sees no key gets output 0 and ``lse = -inf``.
        softmax_scale: default ``1 / sqrt(head_dim)``.
        return_lse: also return the log-sum-exp.

    Returns:
        ``out`` ``[batch, seqlen_q, heads_q, head_dim]`` in the input dtype; with ``return_lse``, also ``lse``
        float32 ``[batch, heads_q, seqlen_q]``, natural log of the softmax denominator (differentiable).

    Raises:
        TypeError / ValueError naming the argument for wrong types, ranks, dtypes, devices, head counts or
        head dims, before any kernel runs.
    """
    _h_q, _h_kv, d = check_qkv(q, k, v, packed=False)
    scale = check_scale(softmax_scale, d)
    out, lse = torch.ops.ring_attn.flash_attn_forward(q, k, v, None, None, q.shape[1], k.shape[1], scale,
                                                      bool(causal))
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                           causal: bool = False, softmax_scale: Optional[float] = None, return_lse: bool = False):
    """Exact attention over packed sequences of different lengths, with autograd.

    Args:
        q: ``[total_q, heads_q, head_dim]``: sequence ``i`` is rows ``cu_seqlens_q[i] : cu_seqlens_q[i+1]``.
        k, v: ``[total_k, heads_kv, head_dim]``, split by ``cu_seqlens_k``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[n_seqs + 1]`` on q's device, starting at 0, non-decreasing,
            ending at the token count. Zero-length sequences are allowed.
        max_seqlen_q, max_seqlen_k: the longest sequence in each (an upper bound is fine).
        causal, softmax_scale, return_lse: as in :func:`flash_attn_func`; causal is bottom-right aligned
            per sequence.

    Returns:
        ``out`` ``[total_q, heads_q, head_dim]``; with ``return_lse`` also ``lse`` float32 ``[heads_q, total_q]``.

    Raises:
        as :func:`flash_attn_func`, plus ValueError/TypeError for malformed ``cu_seqlens`` (wrong dtype, not
        starting at 0, decreasing, last entry not the token count, a sequence longer than ``max_seqlen``).
    """
    _h_q, _h_kv, d = check_qkv(q, k, v, packed=True)
    scale = check_scale(softmax_scale, d)
    check_cu_seqlens_form("cu_seqlens_q", cu_seqlens_q)
    check_cu_seqlens_form("cu_seqlens_k", cu_seqlens_k)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.shape[0]}; both must be n_seqs + 1")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    out, lse = torch.ops.ring_attn.flash_attn_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                      max_seqlen_k, scale, bool(causal))
    return (out, lse) if return_lse else out
