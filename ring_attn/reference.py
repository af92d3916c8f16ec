"""Plain-torch implementations of every op: the float64 oracle for tests, and the CPU fallback.

Nothing here is fast. Everything here is meant to be obviously right: it follows the contracts of docs/design.md
literally (layouts, GQA mapping, bottom-right causal alignment, LSE in natural log, ``lse = -inf`` and output 0
for a row that sees no key) so the kernels can be checked against it.

Attention section
-----------------
Dense tensors: q ``[b, s_q, h_q, d]``, k/v ``[b, s_k, h_kv, d]``. Varlen tensors: ``[t, h, d]`` with
per-sequence ``starts``/``lens`` (int) along the token dim: sequence ``i`` of q is rows
``starts_q[i] : starts_q[i] + lens_q[i]`` and attends to rows ``starts_k[i] : starts_k[i] + lens_k[i]`` of k/v.
``cu_seqlens`` is the special case ``starts = cu[:-1]``, ``lens = cu[1:] - cu[:-1]``.
Causal: query ``i`` sees key ``j`` when ``j <= i + causal_offset``; ``causal_offset=None`` means
``s_k - s_q`` (bottom-right alignment, per sequence in varlen). A sliding ``window=(left, right)`` and Gemma 2's
``softcap`` follow ``ring_attn/backends/protocol.py`` exactly (defaults: off). ALiBi (flash-attn's
``alibi_slopes``): the score of query ``i`` and key ``j`` gets ``-slope[h] * |i + off - j|`` added (after the
softcap, before masking), with the same ``off`` as the causal diagonal.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "attention",
    "attention_varlen",
    "attention_padded",
    "forward_fp32",
    "merge_partial",
    "backward_fp32",
    "cross_entropy_sum",
    "philox4",
    "dropout_keep",
]

# Rows of queries processed at once by the fp32 CPU fallback, so [rows, s_k] scores stay bounded.
_FALLBACK_SCORE_ELEMENTS = 1 << 24


_M32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a · b`` for uint32 values held in int64 tensors (no int64 overflow: ``b`` is
    split into 16-bit halves)."""
    lo_part = a * (b & 0xFFFF)   # < 2^48
    hi_part = a * (b >> 16)      # < 2^48
    low = (lo_part + ((hi_part & 0xFFFF) << 16)) & _M32
    high = ((lo_part >> 16) + hi_part) >> 16
    return high, low


def philox4(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """Philox-4x32 random words of Triton's ``tl.randint4x(seed, offsets)``: counter ``(offset_lo, offset_hi, 0,
    0)``, key ``(seed_lo, seed_hi)``, ``n_rounds`` rounds. ``offsets``: int64 tensor (>= 0). Returns the four
    uint32 words as int64, stacked on a new last dimension (``[..., 4]``; word 0 is ``tl.randint``'s)."""
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(c2, 0xCD9E8D57)
        hi_a, lo_a = _mulhilo(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def _first_counter(dropout, head, row):
    """The Philox counter of key 0..3 of (query head, row) (:class:`ring_attn._contracts.Dropout`)."""
    return (head * dropout.rows + (row + dropout.row0)) * dropout.groups


def dropout_keep(dropout, head: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Bool keep-mask of :class:`ring_attn._contracts.Dropout` ``dropout`` at broadcastable int64 query heads,
    query rows (in the call's row space, before ``row0``) and key indices: word ``col mod 4`` of the Philox
    counter ``(head · rows + row + row0) · groups + col div 4``."""
    head, row, col = torch.broadcast_tensors(torch.as_tensor(head), torch.as_tensor(row), torch.as_tensor(col))
    words = philox4(dropout.seed, _first_counter(dropout, head, row) + col // 4)
    return torch.gather(words, -1, (col % 4).unsqueeze(-1)).squeeze(-1) >= dropout.threshold


def _visible_mask(s_q: int, s_k: int, causal: bool, causal_offset: int | None, device,
                  window=(-1, -1)) -> torch.Tensor | None:
    """Bool ``[s_q, s_k]``, True where query i may see key j; None when everything is visible.

    With ``off = causal_offset`` (default ``s_k - s_q``, bottom-right), key j is visible to query i iff
    ``(not causal or j <= i + off)``, ``(left < 0 or j >= i + off - left)`` and ``(right < 0 or
    j <= i + off + right)`` where ``(left, right) = window`` (flash-attn's ``window_size``).
    """
    left, right = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    if not causal and left < 0 and right < 0:
        return None
    offset = s_k - s_q if causal_offset is None else causal_offset
    i = torch.arange(s_q, device=device)[:, None] + offset
    j = torch.arange(s_k, device=device)[None, :]
    mask = torch.ones((s_q, s_k), dtype=torch.bool, device=device)
    if causal:
        mask &= j <= i
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def _softcap(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """Gemma 2's logit soft-capping ``softcap * tanh(s / softcap)`` (identity when ``softcap <= 0``)."""
    return s if not softcap or softcap <= 0 else torch.tanh(s / softcap) * softcap


def _alibi_bias(slopes: torch.Tensor, b: int, h_q: int, s_q: int, s_k: int, causal_offset: int | None,
                row0: int, rows: int, dtype) -> torch.Tensor:
    """ALiBi bias ``[b, h_q, rows, s_k]``: ``-slope[b, h] * |i + off - j|`` for query rows
    ``row0 .. row0 + rows - 1`` (``off = causal_offset``, default ``s_k - s_q``). ``slopes``: ``[h_q]`` or
    ``[b, h_q]``."""
    offset = s_k - s_q if causal_offset is None else causal_offset
    i = torch.arange(row0, row0 + rows, device=slopes.device, dtype=dtype)[:, None]
    j = torch.arange(s_k, device=slopes.device, dtype=dtype)[None, :]
    dist = (i + offset - j).abs()  # [rows, s_k]
    sl = slopes.to(dtype).expand(b, h_q)  # (h_q,) broadcasts over the batch
    return -sl[:, :, None, None] * dist


def _dense_scores(q, k, softmax_scale, causal, causal_offset, compute_dtype, row0=0, s_q_total=None,
                  window=(-1, -1), softcap=0.0, alibi=None):
    """Scores ``[b, h_q, rows, s_k]`` in ``compute_dtype`` (soft-capped when ``softcap > 0``, plus the ALiBi
    bias when ``alibi`` slopes ``[h_q]`` / ``[b, h_q]`` are given; masked entries are -inf).

    ``row0``/``s_q_total`` let a caller pass a slab of query rows while keeping the causal alignment of the
    whole query sequence.
    """
    b, rows, h_q, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    group = h_q // h_kv
    qf = q.to(compute_dtype).transpose(1, 2)  # [b, h_q, rows, d]
    kf = k.to(compute_dtype).transpose(1, 2)  # [b, h_kv, s_k, d]
    kf = kf.repeat_interleave(group, dim=1)  # the oracle may repeat; kernels never do
    s = _softcap(torch.matmul(qf, kf.transpose(-1, -2)) * softmax_scale, softcap)
    s_q = rows if s_q_total is None else s_q_total
    if alibi is not None:
        s = s + _alibi_bias(alibi, b, h_q, s_q, s_k, causal_offset, row0, rows, compute_dtype)
    mask = _visible_mask(s_q, s_k, causal, causal_offset, q.device, window)
    if mask is not None:
        s = s.masked_fill(~mask[row0 : row0 + rows], float("-inf"))
    return s


def _keep(dropout, b: int, h_q: int, s_q: int, r0: int, r1: int, s_k: int, row_base: int, device) -> torch.Tensor:
    """Dropout keep-mask ``[b, h_q, r1 - r0, s_k]`` of query rows ``r0 .. r1`` of every batch entry; batch entry
    ``bi``'s row ``i`` is row ``row_base + bi·s_q + i`` of the call (:class:`ring_attn._contracts.Dropout`)."""
    head = torch.arange(h_q, device=device, dtype=torch.int64)[None, :, None, None]
    row = (row_base + torch.arange(b, device=device, dtype=torch.int64)[:, None] * s_q +
           torch.arange(r0, r1, device=device, dtype=torch.int64)[None, :])[:, None, :, None]
    # keys 0 .. s_k-1: each counter's four words are four adjacent keys, so draw per counter and flatten
    groups = torch.arange((s_k + 3) // 4, device=device, dtype=torch.int64)[None, None, None, :]
    return philox4(dropout.seed, _first_counter(dropout, head, row) + groups).flatten(-2)[..., :s_k] >= \
        dropout.threshold


def attention(q, k, v, softmax_scale=None, causal=False, causal_offset=None, compute_dtype=torch.float64,
              window=(-1, -1), softcap=0.0, alibi_slopes=None, dropout=None, row_base=0):
    """Dense attention. Returns ``(out [b, s_q, h_q, d], lse [b, h_q, s_q])``, both in ``compute_dtype``.

    ``window=(left, right)`` limits each query to keys ``i + off - left .. i + off + right`` (-1: unbounded;
    see :func:`_visible_mask`); ``softcap > 0`` caps scores as ``softcap * tanh(s / softcap)`` (Gemma 2).
    ``alibi_slopes`` (``[h_q]`` or ``[b, h_q]``, flash-attn's ALiBi) adds ``-slope * |i + off - j|`` to the
    (capped) score of query ``i`` and key ``j``; no gradient flows to the slopes.

    ``dropout`` (:class:`ring_attn._contracts.Dropout`, or None): the probabilities (after the LSE) are
    multiplied by its keep-mask and ``1 / (1 - p)``; batch entry ``bi``'s query ``i`` is row
    ``row_base + bi·s_q + i`` of the call.

    Differentiable with torch autograd (the oracle's gradients come from here). With ``compute_dtype`` equal
    to the input dtype this is "plain torch in the same low precision", the baseline of the accuracy rule.
    """
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    if k.shape[1] == 0:  # no keys at all: every row sees nothing (out 0, lse -inf; zero gradient for q)
        b, s_q, h_q = q.shape[:3]
        out = q.to(compute_dtype)[..., :1] * 0 + v.to(compute_dtype).new_zeros((b, s_q, h_q, v.shape[-1]))
        return out, torch.full((b, h_q, s_q), float("-inf"), dtype=compute_dtype, device=q.device)
    alibi = None if alibi_slopes is None else alibi_slopes.detach()
    s = _dense_scores(q, k, scale, causal, causal_offset, compute_dtype, window=window, softcap=softcap,
                      alibi=alibi)
    m = s.amax(dim=-1, keepdim=True).detach()  # softmax is shift-invariant: detaching m is exact
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout is not None:
        b, s_q, h_q = q.shape[:3]
        p = p * _keep(dropout, b, h_q, s_q, 0, s_q, k.shape[1], row_base, q.device) * dropout.scale
    group = q.shape[2] // k.shape[2]
    vf = v.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    out = torch.matmul(p.to(compute_dtype), vf).transpose(1, 2)
    lse = (torch.log(denom) + m).squeeze(-1)  # log(0) = -inf for rows that see no key
    return out, lse


def attention_padded(q, k, v, keep, softmax_scale=None, causal=False, compute_dtype=torch.float64, window=(-1, -1),
                     softcap=0.0):
    """Attention over a padded batch, one row at a time: row ``b``'s real queries (``keep[b, -s_q:]``) attend to
    its real keys (``keep[b]``, bool ``[b, s_k]``) as one sequence, causal bottom-right aligned within it.
    Returns ``out [b, s_q, h_q, d]`` in ``compute_dtype`` with zeros at padded query positions (differentiable
    with torch autograd)."""
    b, s_q = q.shape[:2]
    rows = []
    for i in range(b):
        iq = keep[i, -s_q:].nonzero().reshape(-1)
        ik = keep[i].nonzero().reshape(-1)
        o, _ = attention(q[i:i + 1, iq], k[i:i + 1, ik], v[i:i + 1, ik], softmax_scale, causal,
                         compute_dtype=compute_dtype, window=window, softcap=softcap)
        full = o.new_zeros((1, s_q) + tuple(o.shape[2:]))
        rows.append(full.index_copy(1, iq, o))
    return torch.cat(rows, 0)


def _segments(starts, lens):
    return [(int(a), int(n)) for a, n in zip(starts.tolist(), lens.tolist())]


def attention_varlen(q, k, v, starts_q, lens_q, starts_k, lens_k, softmax_scale=None, causal=False,
                     causal_offset=None, compute_dtype=torch.float64, window=(-1, -1), softcap=0.0,
                     alibi_slopes=None):
    """Varlen attention on packed ``[t, h, d]`` tensors, one sequence at a time. ``alibi_slopes``: ``[h_q]``
    or ``[n_seqs, h_q]`` (sequence ``i`` uses row ``i``), as in :func:`attention`.

    Returns ``(out [t_q, h_q, d], lse [h_q, t_q])`` in ``compute_dtype``; rows of q outside every sequence get
    0 and -inf.
    """
    t_q, h_q, d = q.shape
    out = q.new_zeros((t_q, h_q, d), dtype=compute_dtype)
    lse_t = torch.full((t_q, h_q), float("-inf"), dtype=compute_dtype, device=q.device)
    pieces_out, pieces_lse, rows = [], [], []
    for n, ((a_q, n_q), (a_k, n_k)) in enumerate(zip(_segments(starts_q, lens_q), _segments(starts_k, lens_k))):
        if n_q == 0:
            continue
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[n]
        o, l = attention(q[None, a_q : a_q + n_q], k[None, a_k : a_k + n_k], v[None, a_k : a_k + n_k],
                         softmax_scale, causal, causal_offset, compute_dtype, window, softcap, slopes)
        pieces_out.append(o[0])
        pieces_lse.append(l[0].transpose(0, 1))
        rows.append(torch.arange(a_q, a_q + n_q, device=q.device))
    if rows:  # index_put (not in-place) keeps autograd through the pieces
        idx = torch.cat(rows)
        out = out.index_put((idx,), torch.cat(pieces_out))
        lse_t = lse_t.index_put((idx,), torch.cat(pieces_lse))
    return out, lse_t.transpose(0, 1)


# ---------------------------------------------------------------------------------------------------------
# CPU fallback: the same math as the kernels (fp32, final-LSE backward), bounded memory.


def _row_chunks(rows: int, s_k: int, heads: int, batch: int):
    step = max(1, _FALLBACK_SCORE_ELEMENTS // max(1, s_k * heads * batch))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


@torch.no_grad()
def forward_fp32(q, k, v, softmax_scale, causal, causal_offset, window=(-1, -1), softcap=0.0, alibi=None,
                 dropout=None, row_base=0, lse_dtype=torch.float32):
    """Dense forward in fp32 math, chunked over query rows. Returns fp32 ``out`` and ``lse`` in ``lse_dtype``
    (float64: ``max + log(sum)`` added without rounding to fp32, for a merge into a running fp64 LSE).
    ``window``/``softcap``/``dropout``/``row_base`` as in :func:`attention`; ``alibi``: slopes ``[h_q]`` or
    ``[b, h_q]`` (or None)."""
    b, s_q, h_q, d = q.shape
    s_k = k.shape[1]
    out = torch.empty((b, s_q, h_q, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, h_q, s_q), dtype=lse_dtype, device=q.device)
    offset = s_k - s_q if causal_offset is None else causal_offset
    if s_k == 0:  # no keys: every row sees nothing
        return out.zero_(), lse.fill_(float("-inf"))
    group = h_q // k.shape[2]
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    for r0, r1 in _row_chunks(s_q, s_k, h_q, b):
        s = _dense_scores(q[:, r0:r1], k, softmax_scale, causal, offset, torch.float32, r0, s_q, window, softcap,
                          alibi)
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        e = torch.exp(s - m)
        denom = e.sum(dim=-1, keepdim=True)
        if dropout is not None:  # the LSE is the softmax's before dropout
            e = e * _keep(dropout, b, h_q, s_q, r0, r1, s_k, row_base, q.device) * dropout.scale
        out[:, r0:r1] = (torch.matmul(e, vf) / torch.where(denom == 0, 1.0, denom)).transpose(1, 2)
        lse[:, :, r0:r1] = (torch.log(denom).to(lse_dtype) + m.to(lse_dtype)).squeeze(-1)
    return out, lse


@torch.no_grad()
def merge_partial(out_acc, lse_acc, out_blk, lse_blk) -> None:
    """Fold a partial result into a running one, in place (out fp32, lse fp32 or fp64, both lse alike; views
    are fine): ``lse' = log(e^lse_acc + e^lse_blk)``, ``out' = (e^lse_acc·out_acc + e^lse_blk·out_blk) / e^lse'``.
    out: ``[..., s, h, d]``; lse: ``[..., h, s]``. Rows that have seen no key on either side stay 0 / -inf.
    The weights are fp32 (their exponents are differences, small where they matter)."""
    new = torch.logaddexp(lse_acc, lse_blk)
    safe = new.masked_fill(torch.isneginf(new), 0.0)  # both -inf: weights exp(-inf) = 0, not NaN
    w_acc = torch.exp((lse_acc - safe).float()).transpose(-1, -2).unsqueeze(-1)
    w_blk = torch.exp((lse_blk - safe).float()).transpose(-1, -2).unsqueeze(-1)
    out_acc.mul_(w_acc).add_(out_blk * w_blk)
    lse_acc.copy_(new)


@torch.no_grad()
def backward_fp32(dout, q, k, v, lse, delta, softmax_scale, causal, causal_offset, window=(-1, -1), softcap=0.0,
                  alibi=None, dropout=None, row_base=0):
    """Dense backward from the *final* ``lse`` and ``delta = rowsum(dout * out)`` (both fp32 ``[b, h_q, s_q]``).

    Returns fp32 ``(dq, dk, dv)`` shaped like q, k, v. Rows with ``lse = -inf`` contribute nothing.
    Formulas: ``P = exp(S·scale − lse)``, ``dV = Pᵀ dO``, ``dP = dO Vᵀ``, ``dS = P ∘ (dP − delta)``,
    ``dQ = dS K · scale``, ``dK = dSᵀ Q · scale``; GQA sums dK/dV over the query heads of a group.
    ``window`` masks as in :func:`attention`; with ``softcap > 0``, ``S = c·tanh(S_raw / c)`` and ``dS`` is
    multiplied by ``1 - tanh²(S_raw / c)``. ``alibi`` slopes (``[h_q]`` / ``[b, h_q]``) add their bias to
    ``S`` after the cap (it has no derivative with respect to q/k/v, so ``dS`` is unchanged). ``dropout``
    (with ``row_base``, as in :func:`attention`): ``dV = (P ∘ keep / (1-p))ᵀ dO`` and ``dP`` is multiplied
    by ``keep / (1-p)``; ``delta`` is the dropped output's.
    """
    b, s_q, h_q, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    group = h_q // h_kv
    offset = s_k - s_q if causal_offset is None else causal_offset
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)  # [b, h_q, s_k, d]
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    dq = torch.empty((b, s_q, h_q, d), dtype=torch.float32, device=q.device)
    dk_full = torch.zeros((b, h_q, s_k, d), dtype=torch.float32, device=q.device)
    dv_full = torch.zeros((b, h_q, s_k, d), dtype=torch.float32, device=q.device)
    safe_lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
    for r0, r1 in _row_chunks(s_q, s_k, h_q, b):
        s = _dense_scores(q[:, r0:r1], k, softmax_scale, causal, offset, torch.float32, r0, s_q, window)
        if softcap and softcap > 0:
            t = torch.tanh(s / softcap)  # masked entries: tanh(-inf) = -1, so put -inf back (p = 0 there)
            s = torch.where(torch.isneginf(s), s, t * softcap)
        if alibi is not None:  # after the cap; masked entries stay -inf
            s = s + _alibi_bias(alibi, b, h_q, s_q, s_k, offset, r0, r1 - r0, torch.float32)
        p = torch.exp(s - safe_lse[:, :, r0:r1, None])
        do = dout[:, r0:r1].float().transpose(1, 2)  # [b, h_q, rows, d]
        dp = torch.matmul(do, vf.transpose(-1, -2))
        if dropout is not None:
            keep = _keep(dropout, b, h_q, s_q, r0, r1, s_k, row_base, q.device) * dropout.scale
            dv_full += torch.matmul((p * keep).transpose(-1, -2), do)
            dp = dp * keep
        else:
            dv_full += torch.matmul(p.transpose(-1, -2), do)
        ds = p * (dp - delta[:, :, r0:r1, None])
        if softcap and softcap > 0:
            ds = ds * (1.0 - t * t)
        dq[:, r0:r1] = (torch.matmul(ds, kf) * softmax_scale).transpose(1, 2)
        dk_full += torch.matmul(ds.transpose(-1, -2), q[:, r0:r1].float().transpose(1, 2)) * softmax_scale
    dk = dk_full.view(b, h_kv, group, s_k, d).sum(2).transpose(1, 2)
    dv = dv_full.view(b, h_kv, group, s_k, d).sum(2).transpose(1, 2)
    return dq, dk, dv


# =========================================================================================================
# RoPE section (oracle for ring_attn/ops/rope.py, and its CPU fallback)
# =========================================================================================================
# q ``[b, s, h, d]`` or packed ``[t, h, d]``; positions ``[s]``, ``[b, s]`` (``[1, s]`` broadcasts) or ``[t]``;
# ``inv_freq`` ``[r / 2]`` for rotary dim ``r``. Pair ``i`` of a head is ``(x[i], x[i + r/2])`` (half-split,
# HF / GPT-NeoX) or ``(x[2i], x[2i + 1])`` (interleaved, GPT-J / Meta); it rotates by the angle
# ``position * inv_freq[i]``: ``y1 = a (x1 cos - x2 sin)``, ``y2 = a (x2 cos + x1 sin)`` with ``a`` the
# attention scaling. Dims ``r .. d-1`` pass through unchanged.


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Angles ``positions[..., None] * inv_freq`` formed in float64 (exact for integer positions below 2^29
    and float32 ``inv_freq``). Differentiable with respect to ``inv_freq``."""
    return positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)


def rope_pairs(x: torch.Tensor, rotary_dim: int, interleaved: bool):
    """``(x1, x2, x_pass)``: the two members of every rotating pair ``[..., r/2]`` and the pass-through dims."""
    rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        return rot[..., 0::2], rot[..., 1::2], x_pass
    return rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :], x_pass


def rope_unpairs(y1: torch.Tensor, y2: torch.Tensor, x_pass: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Inverse of :func:`rope_pairs`."""
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return torch.cat((y, x_pass.to(y.dtype)), dim=-1)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool,
                compute_dtype=torch.float64) -> torch.Tensor:
    """Rotate every pair of ``x`` by the angle whose (scaled) cos/sin are given, ``[..., r/2]`` broadcastable
    against ``x[..., :r/2]``. Math in ``compute_dtype``; result in ``compute_dtype``."""
    x1, x2, x_pass = rope_pairs(x.to(compute_dtype), rotary_dim, interleaved)
    cos, sin = cos.to(compute_dtype), sin.to(compute_dtype)
    return rope_unpairs(x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_pass, interleaved)


def rope(q, k, positions, inv_freq, attention_scaling=1.0, interleaved=False, rotary_dim=None,
         compute_dtype=torch.float64):
    """RoPE on q and k. Returns ``(q_rot, k_rot)`` in ``compute_dtype``.

    Angles are formed in float64 and cos/sin taken in float64 (torch's float64 sin/cos reduce large arguments
    accurately), then rounded to ``compute_dtype``: with ``compute_dtype=float64`` this is the oracle; with
    ``float32`` it is the CPU fallback of ``ops/rope.py``. Differentiable (also with respect to ``inv_freq``).
    """
    rotary_dim = 2 * inv_freq.shape[-1] if rotary_dim is None else rotary_dim
    ang = rope_angles(positions, inv_freq)[..., None, :]  # [(b,) s, 1, r/2]
    cos, sin = torch.cos(ang) * attention_scaling, torch.sin(ang) * attention_scaling
    return (rope_rotate(q, cos, sin, rotary_dim, interleaved, compute_dtype),
            rope_rotate(k, cos, sin, rotary_dim, interleaved, compute_dtype))


def rotary_emb(x, cos, sin, positions, interleaved=False, compute_dtype=torch.float64):
    """flash-attn's rotary embedding from tables (the oracle of ``ring_attn.layers.rotary.apply_rotary_emb`` and
    of ``flash_attn_with_kvcache``'s ``rotary_cos``/``rotary_sin``): ``x`` ``[..., h, d]`` whose leading dims
    match the int ``positions``; each token rotates its first ``2 · cos.shape[1]`` dims by row
    ``positions[...]`` of ``cos``/``sin`` ``[seqlen_ro, r/2]``. Result in ``compute_dtype``."""
    c, s = cos.to(compute_dtype)[positions][..., None, :], sin.to(compute_dtype)[positions][..., None, :]
    return rope_rotate(x, c, s, 2 * cos.shape[1], interleaved, compute_dtype)


def rope_table(positions, inv_freq, attention_scaling=1.0, dtype=torch.float32):
    """HF-style cos/sin tables ``[..., r]`` (angles in float32, halves duplicated), rounded to ``dtype``: what
    peers read, and the plain-torch baseline of the accuracy rule."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def rope_cos_sin(q, k, cos, sin, unsqueeze_dim=1, compute_dtype=None):
    """HF's ``apply_rotary_pos_emb`` (half-split, tables ``[b, s, r]`` covering the first ``r`` dims; the rest
    pass through), with math in ``compute_dtype`` (default: the promoted dtype of q and cos, as HF)."""
    compute_dtype = compute_dtype or torch.promote_types(q.dtype, cos.dtype)
    cos = cos.unsqueeze(unsqueeze_dim).to(compute_dtype)
    sin = sin.unsqueeze(unsqueeze_dim).to(compute_dtype)
    r = cos.shape[-1]

    def one(x):
        x = x.to(compute_dtype)
        rot, x_pass = x[..., :r], x[..., r:]
        half = torch.cat((-rot[..., r // 2 :], rot[..., : r // 2]), dim=-1)
        return torch.cat((rot * cos + half * sin, x_pass), dim=-1)

    return one(q), one(k)


# ---------------------------------------------------------------------------------------------------------
# Loss (ring_attn/ops/loss.py)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, logit_scale: float = 1.0,
                      softcap: float = 0.0) -> torch.Tensor:
    """float64 ``sum over rows with target != ignore_index of -log softmax(x)[target]``, where
    ``x = softcap * tanh(logit_scale * logits / softcap)`` (``softcap=0``: ``x = logit_scale * logits``).
    The whole ``[N, V]`` matrix at once, differentiable: the oracle of ``cross_entropy_sum`` (``logits``) and of
    ``linear_cross_entropy_sum`` (``logits = hidden @ weight.T`` formed in float64 by the caller)."""
    x = logits.double() * logit_scale
    if softcap:
        x = torch.tanh(x / softcap) * softcap
    return torch.nn.functional.cross_entropy(x, targets.long(), ignore_index=ignore_index, reduction="sum")

