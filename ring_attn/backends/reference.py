"""The reference backend: the launcher protocol (``ring_attn/backends/protocol.py``) over the plain-torch
implementations of ``ring_attn.reference``, in fp32 math (fp64 for fp64 RoPE) on any device.

Slow (the whole masked score matrix, in row chunks) but obviously right; the fallback wherever no faster
backend can run, and a debugging aid on GPUs (``RING_ATTN_BACKEND=reference``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ring_attn import reference as _ref
from ring_attn._contracts import VarlenSeqs

NAME = "reference"

__all__ = ["NAME", "attention_forward", "attention_delta", "attention_backward", "rope"]


def _segments(seqs: VarlenSeqs):
    return list(zip(seqs.starts_q.tolist(), seqs.lens_q.tolist(), seqs.starts_k.tolist(), seqs.lens_k.tolist()))


def _row(alibi: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """Slopes ``[1, h_q]`` of packed sequence ``n`` (None without ALiBi)."""
    return None if alibi is None else alibi[n:n + 1]


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                      *, softmax_scale: float, causal: bool, causal_offset: Optional[int],
                      seqs: Optional[VarlenSeqs], merge: bool, window: tuple[int, int],
                      softcap: float, alibi: Optional[torch.Tensor] = None, num_splits: int = 0,
                      dropout=None, pages=None) -> None:
    """Protocol ``attention_forward`` through :func:`ring_attn.reference.forward_fp32` (and ``merge_partial``);
    ``alibi``: fp32 slopes ``[n_batch, h_q]`` (row ``i``: batch entry or packed sequence ``i``) or None.
    ``num_splits``: ignored (one pass). ``dropout``: ``ring_attn._contracts.Dropout`` or None. ``pages`` must be
    None (no ``paged`` capability: the ops layer gathers a paged cache's rows before calling)."""
    del num_splits
    if pages is not None:
        raise NotImplementedError("reference backend: reads no page table (the ops layer gathers the pages first)")
    def put(o_dst, l_dst, o, l):
        if merge:
            _ref.merge_partial(o_dst, l_dst, o, l)
        else:
            o_dst.copy_(o)
            l_dst.copy_(l)

    if seqs is None:
        o, l = _ref.forward_fp32(q, k, v, softmax_scale, causal, causal_offset, window, softcap, alibi, dropout,
                                 lse_dtype=lse.dtype)
        put(out, lse, o, l)
        return
    for n, (a_q, n_q, a_k, n_k) in enumerate(_segments(seqs)):
        if n_q == 0:
            continue
        o, l = _ref.forward_fp32(q[None, a_q:a_q + n_q], k[None, a_k:a_k + n_k], v[None, a_k:a_k + n_k],
                                 softmax_scale, causal, causal_offset, window, softcap, _row(alibi, n), dropout, a_q,
                                 lse_dtype=lse.dtype)
        put(out[a_q:a_q + n_q], lse[:, a_q:a_q + n_q], o[0], l[0])


def attention_delta(dout: torch.Tensor, out: torch.Tensor, delta: torch.Tensor,
                    dlse: Optional[torch.Tensor]) -> None:
    """Protocol ``attention_delta``: ``delta = rowsum(dout · out) - dlse`` in fp32."""
    dout = dout.contiguous()  # the bits must not depend on the upstream gradient's layout (see attention_backward)
    dense = out.dim() == 4
    val = (dout.float() * out.float()).sum(-1)
    val = val.transpose(1, 2) if dense else val.transpose(0, 1)
    if dlse is not None:
        val = val - dlse
    delta.copy_(val)


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                       delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, *,
                       softmax_scale: float, causal: bool, causal_offset: Optional[int],
                       seqs: Optional[VarlenSeqs], accumulate: bool, window: tuple[int, int],
                       softcap: float, alibi: Optional[torch.Tensor] = None, dropout=None) -> None:
    """Protocol ``attention_backward`` through :func:`ring_attn.reference.backward_fp32` (``alibi`` and
    ``dropout`` as in :func:`attention_forward`). ``dout`` is made contiguous first: torch's matmuls round
    differently for other layouts, and torch.compile hands the backward a contiguous gradient where eager may
    pass a strided one, so the bits would differ between the two."""
    dout = dout.contiguous()

    def put(dst, val):
        if accumulate:
            dst += val
        else:
            dst.copy_(val)

    if seqs is None:
        gq, gk, gv = _ref.backward_fp32(dout, q, k, v, lse, delta, softmax_scale, causal, causal_offset,
                                        window, softcap, alibi, dropout)
        put(dq, gq)
        put(dk, gk)
        put(dv, gv)
        return
    segments = _segments(seqs)
    if not accumulate:  # overwrite the rows of every sequence; rows outside all sequences stay untouched
        for a_q, n_q, a_k, n_k in segments:
            dq[a_q:a_q + n_q] = 0
            dk[a_k:a_k + n_k] = 0
            dv[a_k:a_k + n_k] = 0
    for n, (a_q, n_q, a_k, n_k) in enumerate(segments):
        if n_q == 0 or n_k == 0:
            continue
        gq, gk, gv = _ref.backward_fp32(dout[None, a_q:a_q + n_q], q[None, a_q:a_q + n_q],
                                        k[None, a_k:a_k + n_k], v[None, a_k:a_k + n_k],
                                        lse[None, :, a_q:a_q + n_q], delta[None, :, a_q:a_q + n_q],
                                        softmax_scale, causal, causal_offset, window, softcap, _row(alibi, n),
                                        dropout, a_q)
        dq[a_q:a_q + n_q] += gq[0]
        dk[a_k:a_k + n_k] += gk[0]
        dv[a_k:a_k + n_k] += gv[0]


def _pairs(x: torch.Tensor, rotary_dim: int, interleaved: bool):
    """Views of the two members of every pair of ``x[..., :rotary_dim]``."""
    if interleaved:
        return x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
    half = rotary_dim // 2
    return x[..., :half], x[..., half:rotary_dim]


def rope(q4: torch.Tensor, k4: torch.Tensor, qo4: torch.Tensor, ko4: torch.Tensor, *, rotary_dim: int,
         interleaved: bool, backward: bool, copy_pass: bool, pos2: Optional[torch.Tensor],
         inv_freq: Optional[torch.Tensor], scaling: float, cos3: Optional[torch.Tensor],
         sin3: Optional[torch.Tensor], qy4: Optional[torch.Tensor], ky4: Optional[torch.Tensor],
         dtheta: Optional[torch.Tensor]) -> None:
    """Protocol ``rope`` in plain torch: fp32 math (fp64 for fp64 storage); angles formed in float64 and taken
    through float64 ``cos``/``sin`` (torch reduces large arguments accurately), then rounded to the math dtype."""
    B, S = q4.shape[:2]
    if B * S == 0:
        return
    compute = torch.float64 if q4.dtype == torch.float64 else torch.float32
    if cos3 is not None:  # table mode: c/s read at each element's own dim (HF layout)
        c1, c2 = (t.to(compute)[:, :, None, :] for t in _pairs(cos3, rotary_dim, interleaved))
        s1, s2 = (t.to(compute)[:, :, None, :] for t in _pairs(sin3, rotary_dim, interleaved))
    else:
        ang = _ref.rope_angles(pos2, inv_freq)[:, :, None, :]  # [B or 1, S, 1, half], float64
        c1 = c2 = (torch.cos(ang) * scaling).to(compute)
        s1 = s2 = (torch.sin(ang) * scaling).to(compute)
    if backward:  # the transpose of [[c1, -s1], [s2, c2]]
        s1, s2 = -s2, -s1
    acc = None
    for x4, o4, y4 in ((q4, qo4, qy4), (k4, ko4, ky4)):
        x1, x2 = (t.to(compute) for t in _pairs(x4, rotary_dim, interleaved))
        r1 = x1 * c1 - x2 * s1
        r2 = x2 * c2 + x1 * s2
        if dtheta is not None:  # x is the incoming gradient g, y the forward's output
            y1, y2 = (t.to(compute) for t in _pairs(y4, rotary_dim, interleaved))
            part = (x2 * y1 - x1 * y2).sum(2)  # [B, S, half]
            acc = part if acc is None else acc + part
        pass_through = x4[..., rotary_dim:].clone() if copy_pass and x4.shape[-1] > rotary_dim else None
        o1, o2 = _pairs(o4, rotary_dim, interleaved)
        o1.copy_(r1)
        o2.copy_(r2)
        if pass_through is not None:
            o4[..., rotary_dim:].copy_(pass_through)
    if dtheta is not None:
        dtheta.copy_(acc.reshape(B * S, -1))
