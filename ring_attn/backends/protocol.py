"""The launcher protocol every backend module implements (``ring_attn.backends.<name>``).

A backend is a module with the four functions below. The ops layer (``ring_attn.ops``) validates every
argument, allocates outputs, handles autograd and chunking, and then calls exactly one backend function per
launch; backends do no argument checking beyond what they need to stay memory-safe. Which backend runs is
decided per call by ``ring_attn.backends.select`` from the capability table in ``ring_attn.backends``.

Conventions shared by every function
------------------------------------
* Dense attention tensors are ``[b, s, h, d]``; packed (varlen) tensors are ``[t, h, d]`` and come with a
  ``seqs`` (:class:`ring_attn._contracts.VarlenSeqs`): sequence ``i`` is q rows ``starts_q[i] :
  starts_q[i] + lens_q[i]`` attending to k/v rows ``starts_k[i] : starts_k[i] + lens_k[i]`` (int32 tensors on
  q's device; ``max_len_q``/``max_len_k`` are host ints bounding every length).
* Every q/k/v/out/dout/dq/dk/dv tensor has a contiguous last dim; all other strides are arbitrary (views of a
  fused qkv projection, slices of larger accumulators). LSE-like tensors (``lse``, ``delta``, ``dlse``) are
  fp32 ``[b, h_q, s_q]`` (packed ``[h_q, t_q]``) with unit stride along the sequence.
* GQA/MQA: query head ``h`` reads kv head ``h // (h_q // h_kv)``; K/V are never repeated in memory.
* Visibility. With ``off = causal_offset`` when given, else ``len_k - len_q`` of the sequence (bottom-right
  alignment), key ``j`` is visible to query ``i`` iff all of
  ``(not causal or j <= i + off)``, ``(left < 0 or j >= i + off - left)``, ``(right < 0 or j <= i + off + right)``
  hold, where ``(left, right) = window`` (flash-attn's ``window_size``; ``(-1, -1)`` = no window).
  Key blocks that hold no visible key must not be visited (that is the point of a causal/window kernel).
* Scores: ``s = softmax_scale * q·k``; with ``softcap > 0``, ``s = softcap * tanh(s / softcap)`` (Gemma 2).
  ``lse = log(sum_j exp(s_j))`` over visible keys (natural log, fp32); ``out = sum_j exp(s_j - lse) v_j``.
  A row with no visible key has ``out = 0`` and ``lse = -inf`` (never NaN), and zero gradients.
* ALiBi (flash-attn's ``alibi_slopes``): ``alibi`` is None or fp32 ``[n_batch, h_q]`` on q's device with any
  strides (the ops layer expands ``[h_q]`` slopes with a batch stride of 0), ``n_batch`` the batch (dense) or
  the number of packed sequences (row ``i`` for sequence ``i``). It adds ``-alibi[b, h] · |i + off - j|`` to
  the score (after the soft-cap, before masking), ``off`` as for visibility. The bias has no derivative with
  respect to q/k/v: the backward recomputes ``p`` with it and ``ds`` is otherwise unchanged. A backend without
  ``alibi`` in its capabilities is never called with slopes.
* Math is fp32 (fp64 where a backend supports fp64 storage); storage dtypes are fp16/bf16/fp32.

Functions
---------
``attention_forward(q, k, v, out, lse, *, softmax_scale, causal, causal_offset, seqs, merge, window, softcap,
alibi, num_splits, dropout, pages)``
    Writes ``out`` (shaped like q; q's dtype or fp32) and ``lse``. Packed: only rows inside a sequence are
    written. ``merge=True``: ``out`` (fp32) and ``lse`` (fp32 or fp64) are running results of earlier key blocks
    for the same queries; this block is merged in place by LSE weighting (``new = logaddexp(lse, lse_blk)``,
    ``out = out·exp(lse - new) + out_blk·exp(lse_blk - new)``); a row that sees no key here is left unchanged.
    With an fp64 ``lse`` the block's ``lse_blk = max + log(sum)`` is added, and ``new`` formed, in fp64 (the
    weights' exponents are small and may be fp32): the ring's merged result is then as precise as one pass.
    ``num_splits`` (never with ``merge``): a scheduling hint, flash-attn's split-KV: 0 = the backend decides,
    1 = one pass over the keys, n > 1 = up to n key ranges computed in parallel and combined by LSE. Results
    agree up to rounding; a backend may ignore it (the CPU backends do). ``dropout``: None, or a
    ``ring_attn._contracts.Dropout`` (attention dropout; the mask is a pure function of its seed and each
    element's place, so every backend draws the same one): probabilities after the LSE are multiplied by the
    keep-mask and ``1 / (1 - p)``; a backend without ``dropout`` in its capabilities is never called with it.
    ``pages`` (only for a backend with ``paged`` in its capabilities; packed only): None, or a
    ``ring_attn._contracts.KVPages``: k/v are then the pages of a paged KV cache flattened to rows, and key ``j``
    of sequence ``i`` is row ``block_table[i, j // page_size] · page_size + j % page_size`` (``seqs.starts_k``
    is not read).

``attention_delta(dout, out, delta, dlse)``
    ``delta = rowsum(dout · out) - dlse`` in fp32 (``dlse`` may be None), written into ``delta`` (LSE layout).
    Dense or packed, judged by ``out.dim()`` (4 or 3).

``attention_backward(dout, q, k, v, lse, delta, dq, dk, dv, *, softmax_scale, causal, causal_offset, seqs,
accumulate, window, softcap, alibi, dropout)``
    Gradients of the block pair from the *final* ``lse`` and ``delta``: ``p = exp(s - lse)``,
    ``ds = p · (dout·vᵀ - delta)``, times ``1 - tanh²(s_raw / softcap)`` with a softcap, then
    ``dq = softmax_scale · ds·k``, ``dk = softmax_scale · dsᵀ·q`` (summed over the query heads of a kv head),
    ``dv = pᵀ·dout``. ``accumulate=True``: dq/dk/dv are fp32 and the gradients are *added* (a ring step);
    ``accumulate=False``: they are overwritten (any storage dtype; packed: rows outside every sequence are
    left untouched). Must be deterministic: the same inputs give bitwise-identical results. With the forward's
    ``dropout``: ``dv = (p ∘ keep / (1-p))ᵀ·dout`` and ``dout·vᵀ`` is multiplied by ``keep / (1-p)`` before
    ``ds`` (``delta`` is the dropped output's).

``rope(q4, k4, qo4, ko4, *, rotary_dim, interleaved, backward, copy_pass, pos2, inv_freq, scaling, cos3, sin3,
qy4, ky4, dtheta)``
    One rotary launch over ``B*S`` tokens. ``q4``/``k4`` (inputs; in backward, incoming gradients) and
    ``qo4``/``ko4`` (results; may alias the inputs) are 4-D ``[B, S, H, D]`` views with any strides (a stride
    of 0 may appear for size-1 dims; the last stride need not be 1); q and k head counts may differ.
    Pair ``f < rotary_dim/2`` is dims ``(f, f + rotary_dim/2)`` (half-split) or ``(2f, 2f+1)`` (interleaved);
    dims ``rotary_dim .. D-1`` pass through (copied when ``copy_pass``, untouched otherwise).
    Angle mode (``pos2`` int32/int64 ``[B or 1, S]``, ``inv_freq`` fp32/fp64 ``[rotary_dim/2]``): the angle
    ``pos · inv_freq[f]`` is formed in float64 and reduced modulo 2π before fp32 ``sin``/``cos`` (error
    ≲ 2e-7 rad for positions up to 2^24); ``c = scaling·cos``, ``s = scaling·sin``.
    Table mode (``cos3``/``sin3`` ``[B or 1, S, rotary_dim]``, HF layout, halves duplicated): c/s read at each
    element's own dim. Forward: ``[y1, y2] = [[c1, -s1], [s2, c2]] · [x1, x2]``; ``backward``: the transpose,
    ``[[c1, s2], [-s1, c2]]``. With ``dtheta`` (fp32/fp64 ``[B*S, rotary_dim/2]``, angle-mode backward only),
    also writes per token ``sum over q and k heads of (g2·y1 - g1·y2)`` using the forward outputs
    ``qy4``/``ky4`` (the caller multiplies by positions and reduces). Results are rounded to ``qo4``'s dtype.

A backend declares what it supports in ``ring_attn.backends.CAPABILITIES``; the dispatcher never calls a
backend with inputs outside its declared capabilities.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch


class Backend(Protocol):
    """Structural type of a backend module (see the module docstring for the semantics)."""

    def attention_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, *, softmax_scale: float, causal: bool,
                          causal_offset: Optional[int], seqs, merge: bool, window: tuple[int, int],
                          softcap: float, alibi: Optional[torch.Tensor] = None, num_splits: int = 0,
                          dropout=None, pages=None) -> None: ...

    def attention_delta(self, dout: torch.Tensor, out: torch.Tensor, delta: torch.Tensor,
                        dlse: Optional[torch.Tensor]) -> None: ...

    def attention_backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           lse: torch.Tensor, delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                           dv: torch.Tensor, *, softmax_scale: float, causal: bool,
                           causal_offset: Optional[int], seqs, accumulate: bool, window: tuple[int, int],
                           softcap: float, alibi: Optional[torch.Tensor] = None, dropout=None) -> None: ...

    def rope(self, q4: torch.Tensor, k4: torch.Tensor, qo4: torch.Tensor, ko4: torch.Tensor, *,
             rotary_dim: int, interleaved: bool, backward: bool, copy_pass: bool,
             pos2: Optional[torch.Tensor], inv_freq: Optional[torch.Tensor], scaling: float,
             cos3: Optional[torch.Tensor], sin3: Optional[torch.Tensor], qy4: Optional[torch.Tensor],
             ky4: Optional[torch.Tensor], dtheta: Optional[torch.Tensor]) -> None: ...
