"""Ring attention: exact attention over a sequence sharded across the ranks of a process group.

Rank ``r`` of a ``W``-rank group holds its shard of q, k, v (layout in :mod:`ring_attn.ring.layout`). The K/V
shards travel around the ring: at step ``i`` rank ``r`` holds the K/V of rank ``src = (r - i) mod W``, and
the exchange for step ``i + 1`` (send to ``r + 1``, receive from ``r - 1``) is posted *before* step ``i``'s
attention and completed after it, so the transfer hides behind compute. Two receive buffers are allocated
once per call and alternate (step 0 computes on the caller's own K/V).

Forward. Each (query shard, key shard) pair is classified once, per layout, into pieces that are fully
visible, causal (a diagonal with an explicit offset), or skipped, so no step computes work the mask
discards (``_plan``). Every piece is merged into the running ``(out, lse)`` (out fp32, lse fp64; zero and
``-inf`` before the first) by LSE weighting, in the attention kernel's epilogue
(``attention_block_forward(..., out=, lse=)``)::

    lse_new = log(exp(lse_acc) + exp(lse_blk))
    out_acc = out_acc · exp(lse_acc − lse_new) + out_blk · exp(lse_blk − lse_new)

(rows that have seen nothing keep ``lse = −inf`` and weight 0), so nothing is rounded to 16 bits between
steps, and the weights carry no fp32 rounding of a large LSE (the kernel forms ``lse_blk = max + log(sum)``
in fp64). The output is cast to the input dtype once, at the end; the LSE to fp32.

Backward. ``delta = rowsum(dout · out) − dlse`` is formed once from the final output; then the same ring
runs again, recomputing each piece from q, the visiting K/V and the *final* lse (no per-step activations
are kept). dq accumulates locally in fp32. The fp32 dK/dV accumulator of a K/V shard travels with it: rank
``r`` adds its contribution for the visiting shard and passes the accumulator on, and after ``W`` hops it
is back at its owner. The order of every sum is fixed, so gradients are bitwise deterministic.

Causal classification (``src`` = owner of the visiting K/V, ``r`` = this rank; local positions increase
with the local index in every layout, so "causal" below is ordinary causal attention at that offset):

* contiguous: ``src == r`` causal (offset 0); ``src < r`` full; ``src > r`` skipped.
* zigzag (rank r holds chunks ``r`` and ``2W−1−r`` of ``2W``): ``src == r`` causal (offset 0);
  ``src < r``: all queries see the first half of the keys (chunk ``src``) fully and nothing of the second;
  ``src > r``: only the second half of the queries (chunk ``2W−1−r``) sees keys, all of them, fully.
  Every step after the first is half a block of work, on every rank.
* striped (token ``t`` on rank ``t mod W``): query ``i`` sees key ``j`` iff ``jW + src ≤ iW + r``, i.e.
  ``j ≤ i`` when ``src ≤ r`` (offset 0) and ``j ≤ i − 1`` when ``src > r`` (offset −1).

Sliding windows (``window_size``) are over global positions: each piece gets the true offset between its
global query and key positions and a window in the kernel's terms (``_window_plan``); pieces the window
misses are skipped. Zigzag splits every pair into its (query half, key half) pieces, each one affine run.

Varlen: every sequence is sharded by the layout (:func:`ring_attn.ring.layout.shard_varlen`), so the same
classification applies per sequence; halves of sequences are addressed with
:class:`ring_attn._contracts.VarlenSeqs` without copying.

GQA: K/V travel with ``h_kv`` heads, never repeated. Peak memory per rank: q, k, v, out, the fp32
accumulators and two K/V receive buffers (plus, in backward, two fp32 dK/dV buffers and one dK/dV block
buffer): O(b · s_local · h · d), independent of ``W``.

World size 1: after the same checks, the call is the single-device op (``flash_attn_func`` /
``flash_attn_varlen_func``): no communication and no fp32 round trips, so a one-rank ring costs what the
plain kernel costs.

Consistency: at every call the ranks exchange a fixed-size signature (shapes, dtypes, causal, layout, scale,
varlen boundaries, window, softcap, ALiBi or none) with one small ``all_gather`` before any K/V moves; if any
rank differs, every rank raises ``ValueError`` listing each rank's inputs (no mismatched P2P, no hang). On
NCCL a signature already seen on the group is compared on the device (a device-side assert on a mismatch, no
host sync) unless ``RING_ATTN_VALIDATE=every`` (:func:`validate_mode`). A rank whose own arguments fail
its checks joins the exchange and raises; the others raise ``ValueError`` naming it.
``validate=False`` skips the check.
"""
from __future__ import annotations

import hashlib
import operator
import os
import struct
import weakref
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from ring_attn._contracts import (VarlenSeqs, check_alibi_slopes, check_cu_seqlens_form, check_qkv, check_scale,
                                  check_softcap)
from ring_attn.backends import check_deterministic, forced as forced_backend
from ring_attn.ops.attention import (
    attention_block_backward,
    attention_block_forward,
    attention_delta,
    flash_attn_func,
    flash_attn_varlen_func,
    lse_shape,
)
from ring_attn.ring.comm import RingComm, all_gather_ints
from ring_attn.ring.layout import (
    LAYOUTS,
    check_layout,
    padded_length,
    recorded_padding,
    shard_info,
    valid_counts,
    varlen_padded_cu_seqlens,
)

__all__ = ["ring_attn_func", "ring_attn_varlen_func"]

_ALL = slice(None)


# ---------------------------------------------------------------------------------------------------------
# The plan: which pieces of (local queries) x (visiting keys) are computed, per layout.


class _Piece(NamedTuple):
    q_part: str  # "all" | "first" | "second" (half of the local rows / of every sequence)
    k_part: str  # "all" | "first" | "second"
    causal: bool
    offset: Optional[int]
    window: tuple[int, int] = (-1, -1)
    alibi_shift: int = 0  # striped ALiBi: global distance = W * |i + offset - j| + alibi_shift (_alibi_plan)


_NO_WINDOW = (-1, -1)


def _plan(layout: str, causal: bool, rank: int, src: int, window: tuple[int, int] = _NO_WINDOW, world: int = 0,
          n_local: int = 0) -> list[_Piece]:
    """Pieces of the (rank's queries, src's keys) pair; empty when nothing is visible.

    Sliding windows (``window_size``; ``world`` and ``n_local``, the local rows per sequence, are needed then)
    are computed HERE and nowhere else (:func:`_window_plan`; ``backends/protocol.py``: key ``j`` visible to
    query ``i`` iff ``j <= i + off`` when causal, ``j >= i + off - left`` and ``j <= i + off + right``, with
    ``off`` the piece's ``causal_offset`` and a negative bound meaning unbounded). Recipe (checked by brute
    force against global masks for contiguous and striped, W 1..4, windows up to 9):
    for a piece whose rows satisfy ``global(k_j) - global(q_i) = (j - i) - D`` with one constant ``D``, the
    visible keys are ``lo <= j - i <= hi`` with ``hi = min(D if causal, D + right if right >= 0)`` and
    ``lo = D - left`` (if ``left >= 0``). Skip the piece when ``lo > hi`` or the band misses the block
    (``lo > n_k - 1`` or ``hi < -(n_q - 1)``); else launch it causal with ``off = hi`` and window
    ``(hi - lo, -1)`` (no ``lo``: ``(-1, -1)``; no ``hi``: not causal, ``off = lo``, window ``(0, -1)``).
    Per layout, ``D``:

    * contiguous: ``D = (rank - src) * s_local``;
    * zigzag: ``"all"`` rows span two chunks (``rank`` and ``2W-1-rank``) that are not one affine run, so with
      a window every pair splits into up to four (q chunk, k chunk) pieces (q/k parts ``"first"`` /
      ``"second"``, addressed like the existing halves), ``D = (chunk_q - chunk_k) * s_local / 2``;
    * striped (global = ``i*W + rank``): not affine in ``D`` but the same recipe holds with
      ``hi = min(floor((rank - src) / W) if causal, floor((rank - src + right) / W))`` and
      ``lo = ceil((rank - src - left) / W)``;
    * varlen: ``s_local`` differs per sequence, so contiguous/zigzag ``D`` is per sequence: the sequences are
      grouped by local row count and each group is planned and launched on its own (:func:`_pieces`).
    * softcap needs nothing here: a per-score transform, passed unchanged to every piece (``_kernel_options``).
    """
    if tuple(window) != _NO_WINDOW:
        return _window_plan(layout, causal, rank, src, window, world, n_local)
    if not causal:
        return [_Piece("all", "all", False, None)]
    if src == rank:
        return [_Piece("all", "all", True, 0)]
    if layout == "contiguous":
        return [_Piece("all", "all", False, None)] if src < rank else []
    if layout == "zigzag":
        return [_Piece("all", "first", False, None)] if src < rank else [_Piece("second", "all", False, None)]
    # striped
    return [_Piece("all", "all", True, 0 if src < rank else -1)]


def _band_misses(lo: Optional[int], hi: Optional[int], n_q: int, n_k: int) -> bool:
    """Whether no key of the ``n_q x n_k`` block lies in the band ``lo <= j - i <= hi`` (None: unbounded)."""
    return ((hi is not None and lo is not None and lo > hi) or (lo is not None and lo > n_k - 1)
            or (hi is not None and hi < -(n_q - 1)))


def _band_piece(q_part: str, k_part: str, causal: bool, d_hi: Optional[int], d_right: Optional[int],
                d_lo: Optional[int], n_q: int, n_k: int) -> list[_Piece]:
    """The piece for local rows where key ``j`` is visible to query ``i`` iff ``lo <= j - i <= hi``, with
    ``hi = min(d_hi if causal, d_right)`` and ``lo = d_lo`` (None: unbounded); ``[]`` when the band misses the
    ``n_q x n_k`` block. Launched causal with ``offset = hi`` and window ``(hi - lo, -1)``; without ``hi``:
    not causal, ``offset = lo``, window ``(0, -1)``; a band covering the whole block runs unmasked."""
    his = [x for x in ((d_hi if causal else None), d_right) if x is not None]
    hi = min(his) if his else None
    lo = d_lo
    if _band_misses(lo, hi, n_q, n_k):
        return []
    if hi is not None and hi >= n_k - 1:
        hi = None
    if lo is not None and lo <= -(n_q - 1):
        lo = None
    if hi is None and lo is None:
        return [_Piece(q_part, k_part, False, None)]
    if hi is None:
        return [_Piece(q_part, k_part, False, lo, (0, -1))]
    return [_Piece(q_part, k_part, True, hi, (-1, -1) if lo is None else (hi - lo, -1))]


def _chunk_pairs(layout: str, rank: int, src: int, world: int, n_local: int) -> list[tuple[str, str, int, int]]:
    """The (query chunk, key chunk) runs of a (rank, src) pair for the contiguous and zigzag layouts, as
    ``(q_part, k_part, rows per chunk, D)`` with ``global(k_j) - global(q_i) = (j - i) - D`` inside the run:
    contiguous, one run (``D = (rank - src) * n_local``); zigzag, four (chunks ``rank`` and ``2W-1-rank`` of
    ``2W``, each ``n_local / 2`` rows, addressed as the ``"first"`` / ``"second"`` halves)."""
    if layout == "contiguous":
        return [("all", "all", n_local, (rank - src) * n_local)]
    h = n_local // 2
    chunk = {"first": lambda r: r, "second": lambda r: 2 * world - 1 - r}
    return [(qp, kp, h, (chunk[qp](rank) - chunk[kp](src)) * h) for qp in ("first", "second")
            for kp in ("first", "second")]


def _chunk_band(run: tuple[str, str, int, int], causal: bool, window: tuple[int, int]) -> list[_Piece]:
    """:func:`_band_piece` for one :func:`_chunk_pairs` run ``(q_part, k_part, n, D)`` under ``window``:
    visible keys ``D - left <= j - i <= min(D if causal, D + right)``; ``[]`` when none is."""
    q_part, k_part, n, d = run
    left, right = window
    return _band_piece(q_part, k_part, causal, d, d + right if right >= 0 else None, d - left if left >= 0 else None,
                       n, n)


def _window_plan(layout: str, causal: bool, rank: int, src: int, window: tuple[int, int], world: int,
                 n_local: int) -> list[_Piece]:
    """Pieces of the (rank's queries, src's keys) pair under a sliding window over *global* positions (see
    :func:`_plan`). ``n_local``: local rows per sequence (even for zigzag)."""
    left, right = window
    if layout == "striped":  # global position t * W + rank: j - i bounds by floor / ceil division
        delta = rank - src
        return _band_piece("all", "all", causal, delta // world, (delta + right) // world if right >= 0 else None,
                           -((left - delta) // world) if left >= 0 else None, n_local, n_local)
    return [p for run in _chunk_pairs(layout, rank, src, world, n_local) for p in _chunk_band(run, causal, window)]


def _alibi_plan(layout: str, causal: bool, rank: int, src: int, window: tuple[int, int], world: int,
                n_local: int) -> list[_Piece]:
    """Pieces of the (rank's queries, src's keys) pair under ALiBi: the bias ``-slope · |global(q_i) -
    global(k_j)|`` needs the *exact* distance, and the kernels' bias is ``-slope · |i + offset - j|`` with the
    piece's ``causal_offset``.

    * contiguous and zigzag: every piece is an affine run of rows (:func:`_chunk_pairs`) launched with
      ``offset = D`` (``global(k_j) - global(q_i) = (j - i) - D``) and the caller's own window: with that offset,
      ``causal`` and ``window=(left, right)`` mask exactly the global ``k <= q``, ``q - left <= k <= q + right``.
      Runs whose band misses the block are skipped (:func:`_chunk_band` decides).
    * striped (global position ``t * W + rank``): :func:`_striped_alibi_plan`; its pieces carry an
      ``alibi_shift`` and the ring launches them with slopes times ``W``."""
    if layout == "striped":
        return _striped_alibi_plan(causal, rank, src, window, world, n_local)
    pieces = []
    for run in _chunk_pairs(layout, rank, src, world, n_local):
        if _chunk_band(run, causal, window):  # some key is visible: the whole run, with its exact offset
            q_part, k_part, _, d = run
            pieces.append(_Piece(q_part, k_part, causal, d, window))
    return pieces


def _striped_alibi_plan(causal: bool, rank: int, src: int, window: tuple[int, int], world: int,
                        n_local: int) -> list[_Piece]:
    """Striped ALiBi pieces. With ``delta = rank - src``, ``global(q_i) - global(k_j) = W (i - j) + delta``: no
    integer offset gives that distance, but on each side of the diagonal it is affine. Keys at or before their
    query (``j - i <= hi0 = floor(delta / W)``) form one piece launched causal with ``offset = hi`` (``hi0``, or
    the window's right bound if lower), where the distance is ``W (i + hi - j) + (delta - W hi)``; keys after it
    (``j - i >= hi0 + 1``, non-causal calls only) one launched with ``offset = lo`` and window ``(0, right)``,
    distance ``W (j - i - lo) + (W lo - delta)``. So every visible pair's distance is
    ``W · |i + offset - j| + alibi_shift``: the ring launches the pieces with slopes times ``W`` and shifts each
    piece's LSE by ``-slope · alibi_shift`` (a per-row constant: the softmax within the piece is unchanged)."""
    delta, (left, right) = rank - src, window
    hi0 = delta // world
    lo_w = -((left - delta) // world) if left >= 0 else None  # ceil((delta - left) / W)
    hi_w = (delta + right) // world if right >= 0 else None
    pieces = []
    hi = hi0 if hi_w is None else min(hi0, hi_w)
    if not _band_misses(lo_w, hi, n_local, n_local):
        pieces.append(_Piece("all", "all", True, hi, (-1, -1) if lo_w is None else (hi - lo_w, -1),
                             delta - world * hi))
    if not causal:
        lo = hi0 + 1 if lo_w is None else max(hi0 + 1, lo_w)
        if not _band_misses(lo, hi_w, n_local, n_local):
            pieces.append(_Piece("all", "all", False, lo, (0, -1 if hi_w is None else hi_w - lo), world * lo - delta))
    return pieces


def _pieces(layout, causal, rank, src, window, world, addr, alibi: bool = False):
    """``(piece, group)`` pairs to launch for the (rank's queries, src's keys) pair: the plan, once per group
    of sequences with one local row count when a window or ALiBi makes offsets depend on it
    (``addr.groups()``)."""
    if alibi:
        return [(p, grp) for n, grp in addr.groups()
                for p in _alibi_plan(layout, causal, rank, src, window, world, n)]
    if tuple(window) == _NO_WINDOW:
        return [(p, None) for p in _plan(layout, causal, rank, src)]
    return [(p, grp) for n, grp in addr.groups() for p in _plan(layout, causal, rank, src, window, world, n)]


def _kernel_options(softcap: float, alibi: Optional[torch.Tensor] = None, layout: str = "", world: int = 1) -> dict:
    """Keyword arguments every piece's kernel call gets besides the piece's own (window and offset go per
    piece, see :func:`_plan`): ``softcap`` (a per-score transform) and the ALiBi slopes ``[n_batch, h_q]``
    (their distances come from the piece's offset, :func:`_alibi_plan`; times ``W`` for the striped layout,
    whose local rows are ``W`` global positions apart), the same for every piece."""
    opts = {"softcap": softcap} if softcap else {}
    if alibi is not None:
        opts["alibi_slopes"] = alibi * world if layout == "striped" else alibi
    return opts


def _alibi_row_slopes(addr, alibi: Optional[torch.Tensor], layout: str) -> Optional[torch.Tensor]:
    """The ALiBi slopes per LSE row (``addr.per_row``), made once per call, where pieces carry an
    ``alibi_shift`` (the striped layout); else None."""
    return addr.per_row(alibi) if alibi is not None and layout == "striped" else None


def _alibi_lse_shift(row_slopes: Optional[torch.Tensor], piece: _Piece) -> Optional[torch.Tensor]:
    """``slope · alibi_shift`` per LSE row for a striped ALiBi piece (None for every other piece): the piece's
    kernel leaves ``-slope · alibi_shift`` out of every score, so its true LSE is the kernel's minus this.
    ``row_slopes``: :func:`_alibi_row_slopes`."""
    if row_slopes is None or not piece.alibi_shift:
        return None
    return row_slopes * float(piece.alibi_shift)


class _Dense:
    """Addresses pieces of dense ``[b, s_local, h, d]`` shards by slicing the sequence dim."""

    seqs = None

    def __init__(self, s_local: int):
        self.half = s_local // 2
        self.n_local = s_local  # local rows per sequence (for windows)

    def _rows(self, part):
        return {"all": _ALL, "first": slice(None, self.half), "second": slice(self.half, None)}[part]

    def q(self, part):  # slice of q-like [b, s, h, d] tensors
        return (_ALL, self._rows(part))

    k = q

    def lse(self, part):  # slice of [b, h, s]
        return (_ALL, _ALL, self._rows(part))

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """``[b, h]`` values (per batch element and head) broadcast over the LSE's ``[b, h, s]``."""
        return values[:, :, None]

    def groups(self):
        """``[(local rows per sequence, group key)]``: one group (every batch element has ``s_local`` rows)."""
        return [(self.n_local, None)]

    def piece_seqs(self, piece, src=None, group=None):
        return None


class _Packed:
    """Addresses pieces of packed ``[t_local, h, d]`` shards with VarlenSeqs (no copies).

    Sequence ``i`` of real global length ``L_i`` is padded to ``padded_length(L_i)`` and holds
    ``n_i = padded / W`` local rows on every rank. Only its real tokens are attended to: they are a prefix
    of the shard and of each zigzag half (:func:`ring_attn.ring.layout.valid_counts`), so a piece's
    sequence ``i`` is q rows ``[start, start + real q count)`` against k rows ``[start, start + real k
    count)``, where the key counts are those of the rank the keys came from (``src``). Padding rows are in
    no sequence: their output is 0, their LSE ``-inf``, their gradients 0.
    """

    def __init__(self, real_lens: list[int], rank: int, world: int, layout: str, device):
        self._rank, self._world, self._layout, self._real = rank, world, layout, list(real_lens)
        self._n = [padded_length(n, world, layout) // world for n in real_lens]
        self.padded = any(n * world != r for n, r in zip(self._n, real_lens))
        starts, acc = [], 0
        for n in self._n:
            starts.append(acc)
            acc += n
        self._i32 = dict(dtype=torch.int32, device=device)
        self._starts = torch.tensor(starts, **self._i32)
        self._half = torch.tensor([n // 2 for n in self._n], **self._i32)
        self._max = {"all": max(self._n + [0]), "first": max([n // 2 for n in self._n] + [0]),
                     "second": max([n - n // 2 for n in self._n] + [0])}
        self._counts: dict = {}
        self._seqs: dict = {}
        # windows need one offset per launch: sequences are grouped by their local row count (see groups())
        self._n_t = torch.tensor(self._n, **self._i32)

    def _count(self, rank: int, part: str) -> torch.Tensor:
        """Real rows of every sequence in ``part`` of ``rank``'s shard: int32 ``[n_seqs]``."""
        key = (rank, part)
        if key not in self._counts:
            if self.padded:
                which = {"all": 0, "first": 1, "second": 2}[part]
                vals = [valid_counts(n, rank, self._world, self._layout)[which] for n in self._real]
            else:
                vals = [{"all": n, "first": n // 2, "second": n - n // 2}[part] for n in self._n]
            self._counts[key] = torch.tensor(vals, **self._i32)
        return self._counts[key]

    def q(self, part):
        return (_ALL,)

    k = q

    def lse(self, part):
        return (_ALL, _ALL)

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """``[n_seqs, h]`` values (per sequence and head) as the LSE's ``[h, t_local]`` (each local row takes its
        sequence's)."""
        return values.t().repeat_interleave(self._n_t, dim=1, output_size=sum(self._n))

    def groups(self):
        """``[(n, n or None)]``: the distinct local row counts ``n`` of the sequences (0 dropped); the group key
        is None when there is one group. A window's offsets depend on ``n``, so each group is planned and
        launched on its own (the other sequences get zero lengths in that launch)."""
        ns = sorted(set(n for n in self._n if n > 0))
        return [(n, None if len(ns) == 1 else n) for n in ns]

    def piece_seqs(self, piece, src=None, group=None):
        key = (piece.q_part, piece.k_part, src if self.padded else None, group)
        seqs = self._seqs.get(key)
        if seqs is None:
            q_rank, k_rank = self._rank, (src if self.padded else self._rank)
            q_start = self._starts + self._half if piece.q_part == "second" else self._starts
            k_start = self._starts + self._half if piece.k_part == "second" else self._starts
            lens_k = self._count(k_rank, piece.k_part)
            max_q, max_k = self._max[piece.q_part], self._max[piece.k_part]
            if group is not None:  # only the sequences with `group` local rows
                lens_k = torch.where(self._n_t == group, lens_k, 0).to(torch.int32)
                part_rows = {"all": group, "first": group // 2, "second": group - group // 2}
                max_q, max_k = part_rows[piece.q_part], part_rows[piece.k_part]
            # a sequence with no real key in this piece gets no query rows either: they would see nothing
            # (a merge leaves them as they are; the first piece zero-fills them), and no launch sees n_k = 0
            lens_q = torch.where(lens_k > 0, self._count(q_rank, piece.q_part), 0).to(torch.int32)
            seqs = self._seqs[key] = VarlenSeqs(q_start, lens_q, k_start, lens_k, max_q, max_k,
                                                piece.q_part == "all" and not self.padded and group is None)
        return seqs


# ---------------------------------------------------------------------------------------------------------
# Forward and backward rings (no autograd here).


def _ring_forward(q, k, v, scale, causal, layout, comm: RingComm, addr, window=_NO_WINDOW, softcap=0.0,
                  alibi=None):
    world, rank = comm.world_size, comm.rank
    opts = _kernel_options(softcap, alibi, layout, world)
    row_slopes = _alibi_row_slopes(addr, alibi, layout)
    bufs = [(torch.empty_like(k), torch.empty_like(v)) for _ in range(min(2, world - 1))]
    # every piece merges into the running result (rows that see nothing stay 0 / -inf). Its LSE is fp64, so
    # the merge weights carry no fp32 rounding of a large LSE: the merged result is as precise as one pass
    # over all the keys (an fp32 LSE gave dq 4x the one-device error at |LSE| ~ 1e3, twin keys on two ranks)
    out_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse_acc = torch.full(lse_shape(q, q.dim() == 3), float("-inf"), dtype=torch.float64, device=q.device)
    cur = (k, v)
    for step in range(world):
        src = (rank - step) % world
        handle = None
        if step + 1 < world:
            nxt = bufs[step % 2]
            handle = comm.exchange(list(cur), list(nxt))
        kk, vv = cur
        for piece, grp in _pieces(layout, causal, rank, src, window, world, addr, alibi is not None):
            qs, ks = addr.q(piece.q_part), addr.k(piece.k_part)
            lse_v = lse_acc[addr.lse(piece.q_part)]
            shift = _alibi_lse_shift(row_slopes, piece)
            if shift is not None:  # merge(acc, blk - shift) = merge(acc + shift, blk) - shift
                lse_v.add_(shift)
            attention_block_forward(q[qs], kk[ks], vv[ks], scale, piece.causal, piece.offset,
                                    addr.piece_seqs(piece, src, grp), out=out_acc[qs], lse=lse_v,
                                    window=piece.window, **opts)
            if shift is not None:
                lse_v.sub_(shift)
        if handle is not None:
            comm.wait(handle)
            cur = nxt
    return out_acc, lse_acc.float()


def _ring_backward(dout, q, k, v, out, lse, dlse, scale, causal, layout, comm: RingComm, addr, window=_NO_WINDOW,
                   softcap=0.0, alibi=None):
    world, rank = comm.world_size, comm.rank
    opts = _kernel_options(softcap, alibi, layout, world)
    row_slopes = _alibi_row_slopes(addr, alibi, layout)
    delta = attention_delta(dout, out, dlse)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv_bufs = [(torch.empty_like(k), torch.empty_like(v)) for _ in range(min(2, world - 1))]
    f32 = dict(dtype=torch.float32, device=k.device)
    # dK/dV accumulators that travel with K/V (two, alternating) and one block buffer
    dkv = [(torch.zeros(k.shape, **f32), torch.zeros(v.shape, **f32)) for _ in range(min(2, world))]
    blk = (torch.empty(k.shape, **f32), torch.empty(v.shape, **f32)) if world > 1 else None
    cur = (k, v)
    acc = 0  # index in dkv of the accumulator for the visiting shard
    dkv_handle = None
    for step in range(world):
        src = (rank - step) % world
        kv_handle = None
        if step + 1 < world:
            nxt = kv_bufs[step % 2]
            kv_handle = comm.exchange(list(cur), list(nxt), tag=0)
        kk, vv = cur
        if step == 0:
            dk_t, dv_t = dkv[acc]  # own shard: accumulate in place
        else:
            dk_t, dv_t = blk
            dk_t.zero_()
            dv_t.zero_()
        for piece, grp in _pieces(layout, causal, rank, src, window, world, addr, alibi is not None):
            qs, ks, ls = addr.q(piece.q_part), addr.k(piece.k_part), addr.lse(piece.q_part)
            shift = _alibi_lse_shift(row_slopes, piece)  # the LSE of the scores the piece's kernel forms
            lse_p = lse[ls] if shift is None else lse[ls] + shift
            attention_block_backward(dout[qs], q[qs], kk[ks], vv[ks], lse_p, delta[ls], dq[qs], dk_t[ks],
                                     dv_t[ks], scale, piece.causal, piece.offset,
                                     addr.piece_seqs(piece, src, grp), accumulate=True, window=piece.window,
                                     **opts)
        if step > 0:
            comm.wait(dkv_handle)  # the accumulator for src, from rank - 1
            dkv[acc][0].add_(dk_t)
            dkv[acc][1].add_(dv_t)
        if world > 1:  # pass the accumulator on; after the last step it reaches its owner
            dkv_handle = comm.exchange(list(dkv[acc]), list(dkv[1 - acc]), tag=1)
            acc = 1 - acc
        if kv_handle is not None:
            comm.wait(kv_handle)
            cur = nxt
    if dkv_handle is not None:
        comm.wait(dkv_handle)
    dk, dv = dkv[acc]
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# Checks: local ones before any collective; the signature check across ranks.

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
_SIG_LEN = 24
_SIG_MAGIC = 0x52494E47  # "RING": the first slot of every ring call signature
FAILED = -2  # a signature code no shape, flag or digest slot holds: "this rank's own checks failed"
# Per NCCL process group: the signatures already checked across its ranks (-> the signature as a device tensor,
# compared on the device at later calls). Weak keys: nothing here keeps a group
# (and gloo's worker threads) alive after the user drops it, so destroy_process_group really tears it down
# before interpreter exit (a gloo group torn down during finalisation can abort the process).
_validated: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring attention needs torch.distributed: call torch.distributed.init_process_group "
                           "first (a one-rank group is fine)")
    pg = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(pg)
    if rank < 0:
        raise ValueError("group: this process is not a member of the process group passed to the ring")
    return pg, rank, dist.get_world_size(pg)


def check_backend(pg, device):
    backend = str(dist.get_backend(pg)).lower()
    if device.type == "cuda" and backend == "gloo":
        raise ValueError("q is a CUDA tensor but the process group uses gloo, which cannot send CUDA tensors "
                         "point-to-point; use an NCCL group (or CPU tensors with gloo)")
    if device.type == "cpu" and backend == "nccl":
        raise ValueError("q is a CPU tensor but the process group uses NCCL; move q, k, v to this rank's GPU "
                         "(or use a gloo group for CPU tensors)")
    return backend


def _comm(pg, device) -> RingComm:
    # one per call, shared by its forward and backward (the autograd node holds it, and with it the group,
    # only as long as the graph lives); a cache would keep every group alive for the life of the process
    return RingComm(pg, device)


def _double_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_double(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", x))[0]


_MASK_SLOTS = slice(20, 24)  # window left, window right, softcap bits, ALiBi given (after the 2 extra slots)


def _signature(kind, q, k, v, causal, layout, scale, extra: list[int], window=_NO_WINDOW, softcap=0.0,
               alibi=None) -> list[int]:
    def dims(x):
        return list(x.shape) + [-1] * (4 - x.dim())

    sig = [_SIG_MAGIC, kind] + dims(q) + dims(k) + dims(v)
    sig += [_DTYPE_CODES[q.dtype], int(bool(causal)), LAYOUTS.index(layout), _double_bits(scale)] + extra
    sig = (sig + [0] * _SIG_LEN)[:_SIG_LEN]
    sig[_MASK_SLOTS] = [int(window[0]), int(window[1]), _double_bits(float(softcap)), int(alibi is not None)]
    return sig


def _describe(sig: list[int]) -> str:
    if sig[2] == FAILED:
        return "invalid arguments (raised on that rank)"

    def shape(xs):
        return "[" + ", ".join(str(x) for x in xs if x >= 0) + "]"

    dtype = {c: str(d).replace("torch.", "") for d, c in _DTYPE_CODES.items()}.get(sig[14], "?")
    left, right, softcap, alibi = sig[_MASK_SLOTS]
    text = (f"q {shape(sig[2:6])}, k {shape(sig[6:10])}, v {shape(sig[10:14])}, {dtype}, causal={bool(sig[15])}, "
            f"layout={LAYOUTS[sig[16]] if 0 <= sig[16] < len(LAYOUTS) else '?'}, "
            f"softmax_scale={_bits_double(sig[17]):.6g}, window_size=({left}, {right}), "
            f"softcap={_bits_double(softcap):g}, alibi_slopes={'given' if alibi else 'None'}")
    if sig[1] == 1:
        text += f", {sig[18]} sequences (cu_seqlens digest {sig[19] & 0xFFFFFFFF:08x})"
    else:
        text += f", seqlen={sig[18]}"
    return text


def validate_mode() -> str:
    """``RING_ATTN_VALIDATE``: ``first`` (default) or ``every``; set it alike on every rank.

    Every call compares the ranks' signatures with one small all-gather; the modes differ in how, on NCCL:
    ``first`` reads the gathered signatures on the host (the error lists every rank's inputs) the first time a
    signature is seen on the group, and at later calls compares them on the device, no host sync: a mismatch
    there fails a device-side assert on every rank (loud, never silent, never a hang) instead of a ValueError.
    ``every`` reads them on the host at every call (a host sync per call; a ValueError listing every rank's
    inputs). On gloo (CPU tensors) the host read costs nothing and every call is compared as under ``every``."""
    mode = os.environ.get("RING_ATTN_VALIDATE", "first") or "first"
    if mode not in ("first", "every"):
        raise ValueError(f"RING_ATTN_VALIDATE={mode!r}: expected 'first' (read each signature on the host once, "
                         f"then compare on the device) or 'every' (read on the host at every call)")
    return mode


def failed_signature(prefix: list[int], length: int) -> list[int]:
    """The signature a rank whose own checks failed sends, so that it still joins the exchange (and the others
    learn it failed instead of waiting for it): the caller's ``prefix`` (what kind of call), then
    :data:`FAILED` codes up to ``length``."""
    return list(prefix) + [FAILED] * (length - len(prefix))


def validate_across_ranks(name, pg, backend, device, sig: list[int], describe=None,
                          what: str = "shapes, dtype, causal, layout, softmax_scale, window_size, softcap and "
                                      "alibi_slopes or none", failed: Optional[BaseException] = None) -> None:
    """One all-gather of ``sig`` (int64 codes of what every rank must agree on) at every call, read on the host
    (or, on NCCL for a signature already checked on the group, compared on the device: see
    :func:`validate_mode`): ValueError on every rank, listing each rank's inputs (``describe(sig)``), when they
    differ. Collectives with mismatched sizes would hang or corrupt; this turns
    that into an error first. A rank whose own checks raised ``failed`` passes :func:`failed_signature` and
    raises ``failed`` after the exchange, so the others raise too instead of waiting for it."""
    describe = _describe if describe is None else describe
    mode = validate_mode() if failed is None else "every"  # (a failed rank joins whatever its environment says)
    seen = _validated.setdefault(pg, {})
    mine = seen.get(tuple(sig)) if failed is None and mode == "first" and backend == "nccl" else None
    if mine is not None:  # seen before on this group: compared on the device, no host sync
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(pg))]
        dist.all_gather(parts, mine, group=pg)
        torch._assert_async(torch.stack(parts).eq(mine).all(),
                            f"{name}: the ranks of the process group passed inconsistent inputs (every rank must "
                            f"pass the same {what}); RING_ATTN_VALIDATE=every lists each rank's inputs")
        return
    sigs = all_gather_ints(pg, backend, device, sig, failed)
    if any(s != sigs[0] for s in sigs):
        lines = "; ".join(f"rank {i}: {describe(s)}" for i, s in enumerate(sigs))
        raise ValueError(f"{name}: the ranks of the process group passed inconsistent inputs (every rank must "
                         f"pass the same {what}); {lines}")
    if backend == "nccl":
        seen[tuple(sig)] = torch.tensor(sig, dtype=torch.int64, device=device)


def failure_exchange_target(group, q):
    """``(pg, backend, device)`` for the signature exchange of a rank whose own checks failed, or None where even
    the group cannot be used (then every rank fails the same way: torch.distributed not initialized, ...)."""
    try:
        pg, _rank, _world = group_info(group)
        backend = str(dist.get_backend(pg)).lower()
    except Exception:  # noqa: BLE001 - the caller raises its own error
        return None
    if backend != "nccl":
        return pg, backend, torch.device("cpu")
    on_gpu = isinstance(q, torch.Tensor) and q.device.type == "cuda"
    return pg, backend, q.device if on_gpu else torch.device("cuda", torch.cuda.current_device())


def named_error(name: str, exc: BaseException) -> BaseException:
    """``exc`` with its message led by the public function's ``name`` (checks shared with other entry points,
    e.g. ``check_qkv``, do not know who called them), unless it already is."""
    text = str(exc)
    if text.startswith(name) or type(exc) not in (TypeError, ValueError, NotImplementedError):
        return exc
    return type(exc)(f"{name}: {text}").with_traceback(exc.__traceback__)


def raise_with_the_group(exc: BaseException, group, q, prefix: list[int], length: int) -> None:
    """Raise ``exc`` (this rank's own check failed) after joining the signature exchange that the other ranks'
    call makes with :func:`failed_signature` (``prefix``, ``length``: that call's signature kind and length, e.g.
    :func:`ring_signature_kind`), so every other rank raises ValueError naming this rank instead of waiting for it
    in the exchange. Without a usable group (then every rank fails alike) ``exc`` is raised at once."""
    joined = failure_exchange_target(group, q)
    if joined is None:
        raise exc
    pg, backend, device = joined
    validate_across_ranks("", pg, backend, device, failed_signature(prefix, length), failed=exc)
    raise exc  # not reached: the exchange raises ``exc`` itself


def ring_signature_kind(varlen: bool) -> tuple[list[int], int]:
    """``(prefix, length)`` of the signature :func:`ring_attn_func` (``varlen=False``) or
    :func:`ring_attn_varlen_func` exchanges: what a caller that fails before reaching them passes to
    :func:`raise_with_the_group`."""
    return [_SIG_MAGIC, int(varlen)], _SIG_LEN


def _validate_or_raise(name, validate, group, q, kind, make_sig, failed, alibi=None):
    """The cross-rank check of a ring call whose local checks ran: ``make_sig()`` where they passed,
    :func:`failed_signature` where they raised ``failed`` (which is raised after the exchange); then, once the
    signatures agree, the ALiBi slopes' values (:func:`validate_same_slopes`)."""
    if not validate:
        if failed is not None:
            raise failed
        return
    if failed is not None:
        raise_with_the_group(failed, group, q, *ring_signature_kind(bool(kind)))
    pg, backend, device, sig = make_sig()
    validate_across_ranks(name, pg, backend, device, sig)
    if alibi is not None and dist.get_world_size(pg) > 1:
        validate_same_slopes(name, pg, backend, alibi, alibi.numel())


def validate_same_slopes(name, pg, backend, slopes: Optional[torch.Tensor], length: int) -> None:
    """Every rank must pass the same ALiBi slopes (a rank's keys are scored with the slopes of the rank holding
    the queries, so different values would be silently mixed). Called on every rank of ``pg`` once the
    signatures agree that slopes are given. ``slopes``: this rank's validated fp32 slopes, ``length`` values in
    all (the same on every rank), or None for a rank whose slopes cannot be compared with the others' (the
    all-gather ring's per-local-sequence form). The values, with a flag for "compared", are all-gathered and
    compared bit for bit among the flagged ranks: on the host under gloo (ValueError naming the ranks and the
    first differing slope), on the device under NCCL (a device-side assert, no host sync)."""
    if slopes is not None:
        device = slopes.device
        mine = torch.cat([torch.ones(1, device=device), slopes.reshape(-1).float()])
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        mine = torch.zeros(1 + length, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(parts, mine, group=pg)
    table = torch.stack(parts)
    flags, bits = table[:, 0].eq(1), table[:, 1:].contiguous().view(torch.int32)
    if backend == "nccl":
        ref = bits[flags.to(torch.int8).argmax()]
        torch._assert_async((bits.eq(ref).all(1) | ~flags).all(),
                            f"{name}: the ranks of the process group passed different alibi_slopes values (every "
                            "rank must pass the same slopes)")
        return
    ranks = [r for r in range(len(parts)) if bool(flags[r])]
    differ = [r for r in ranks[1:] if not torch.equal(bits[r], bits[ranks[0]])]
    if differ:
        r0, r = ranks[0], differ[0]
        at = int((bits[r] != bits[r0]).nonzero()[0, 0])
        raise ValueError(f"{name}: the ranks of the process group passed different alibi_slopes values (every rank "
                         f"must pass the same slopes): ranks {differ} differ from rank {r0}, first at flat index "
                         f"{at} (rank {r0}: {table[r0, 1 + at].item():g}, rank {r}: {table[r, 1 + at].item():g})")


def _check_common(name, q, k, v, softmax_scale, layout, group, packed):
    _h_q, _h_kv, d = check_qkv(q, k, v, packed=packed)
    scale = check_scale(softmax_scale, d)
    check_layout(layout)
    pg, rank, world = group_info(group)
    backend = check_backend(pg, q.device)
    tok = 0 if packed else 1
    if k.shape[tok] != q.shape[tok]:
        raise ValueError(f"{name}: q and k must hold the same number of local tokens (each rank's shard of one "
                         f"sequence); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    return scale, pg, rank, world, backend


_ORDER = ("q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, "
          "return_attn_probs, group (flash-attn's order)")


def check_flash_args(name, dropout_p, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, group):
    """flash-attn's arguments, checked before anything else (no collective yet). Returns ``(causal, window,
    softcap)`` normalized. Supported values run; values naming a feature the ring does not have raise
    NotImplementedError; values of the wrong kind (often an argument in the wrong position) raise TypeError."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{name}: dropout_p must be a float, got {dropout_p!r}; the positional order is {_ORDER}"
                        + (" (causal is the 6th argument: pass causal=True)" if isinstance(dropout_p, bool) else ""))
    if dropout_p != 0:
        raise NotImplementedError(f"{name}: dropout_p={dropout_p} is not supported (attention dropout is not "
                                  f"implemented in the ring); pass dropout_p=0.0")
    if not isinstance(causal, (bool, int)) or causal not in (0, 1):
        raise TypeError(f"{name}: causal must be a bool, got {causal!r}; the positional order is {_ORDER}")
    causal = bool(causal)
    try:
        left, right = (int(w) for w in window_size)
        if any(isinstance(w, bool) or int(w) != w for w in window_size):
            raise TypeError
    except (TypeError, ValueError, OverflowError):  # (OverflowError: an infinite float)
        raise TypeError(f"{name}: window_size must be a pair of ints (left, right), -1 meaning unbounded; got "
                        f"{window_size!r}") from None
    # a side wider than any sequence (cu_seqlens are int32) is unbounded: -1, as is a negative one (it would not fit
    # the int64 signature the ranks compare)
    left, right = (-1 if not 0 <= left < 2**31 else left), (-1 if not 0 <= right < 2**31 else right)
    if causal and right >= 0:  # causal already hides every key to the right (flash-attn sets right = 0)
        right = -1
    try:
        softcap = check_softcap(softcap)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from None
    for arg, val in (("deterministic", deterministic), ("return_attn_probs", return_attn_probs)):
        if not isinstance(val, (bool, int)) or val not in (0, 1):
            raise TypeError(f"{name}: {arg} must be a bool, got {val!r}; the positional order is {_ORDER}")
    # the ring's forward and backward are bitwise deterministic, except under the opt-in RING_ATTN_BWD=fused,
    # which contradicts deterministic=True (refused here, before any collective)
    check_deterministic(bool(deterministic), name)
    # the other switches read during the call, checked now: a rank whose environment is malformed joins the
    # signature exchange as failed (it raised there, or inside the ring, with the other ranks waiting for it)
    validate_mode()
    forced_backend()
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name}: group must be a torch.distributed ProcessGroup or None, got {group!r}; the "
                        f"positional order is {_ORDER}")
    return causal, (left, right), float(softcap)


def _as_int(name, val) -> int:
    """An int, a numpy integer or a one-element integer tensor (flash-attn accepts all three)."""
    if isinstance(val, torch.Tensor) and val.numel() == 1 and not val.is_floating_point() and \
            val.dtype != torch.bool:
        return int(val.item())
    if isinstance(val, bool):
        raise TypeError(f"{name} must be an int, got {val!r}")
    try:
        return operator.index(val)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {val!r}") from None


def _check_seqlen(name, seqlen, padded: int, world: int, layout: str, causal: bool, qkv) -> int:
    """The real global length of dense shards holding ``padded`` tokens in all (see :func:`ring_attn.shard`):
    ``seqlen`` checked, or ``padded`` when it is None (after :func:`_refuse_unsaid_padding` for non-causal
    calls)."""
    m = 2 * world if layout == "zigzag" else world
    if seqlen is None:
        if not causal:
            _refuse_unsaid_padding(name, padded, world, layout, qkv)
        return padded
    seqlen = _as_int("seqlen", seqlen)
    if not padded - m < seqlen <= padded:
        raise ValueError(f"{name}: seqlen must be the real global sequence length of these shards, an int in "
                         f"({max(padded - m, 0)}, {padded}] ({padded} tokens in all = {world} ranks x "
                         f"{padded // world}, layout {layout!r} pads to a multiple of {m}); got {seqlen}")
    return seqlen


def _refuse_unsaid_padding(name, padded: int, world: int, layout: str, qkv) -> None:
    """Non-causal attention without ``seqlen=`` treats all ``padded`` tokens as real. Raise when they are
    known not to be, so that attending to padding is never silent:

    * ``q``, ``k`` or ``v`` is a tensor :func:`ring_attn.shard` made (or a view of one) for this layout, world
      size and length: its :func:`~ring_attn.ring.layout.shard_info` is exact, and the only thing consulted
      (a shard of a sequence that really has ``padded`` tokens passes, whatever was sharded before or since);
    * none of them is (tensors computed from shards): the most recent sequence ``shard`` split into
      ``padded`` tokens here (:func:`~ring_attn.ring.layout.recorded_padding`) was padded.

    Both are local facts of the rank's own calls, identical on every rank of an SPMD program, so every rank
    raises (before any collective) or none does."""
    known = []
    for arg, x in zip("qkv", qkv):
        info = shard_info(x)
        if info is not None and (info.layout, info.world_size, info.padded) == (layout, world, padded):
            if info.seqlen < padded:
                raise ValueError(
                    f"{name}: {arg} is a shard that ring_attn.shard made from a sequence of {info.seqlen} tokens, "
                    f"padded to {padded} (layout {layout!r}, {world} ranks); non-causal attention would attend "
                    f"to the padding. Pass seqlen={info.seqlen}")
            known.append(arg)
    if known:
        return
    seen = recorded_padding(layout, world, padded)
    if seen is not None:
        raise ValueError(
            f"{name}: q, k, v hold {padded} tokens in all and were not made by ring_attn.shard (computed from "
            f"shards?), so their real length is not known here; the most recent sequence ring_attn.shard split "
            f"into {padded} tokens (layout {layout!r}, {world} ranks) had {seen}, and non-causal attention would "
            f"attend to the padding. Pass seqlen={seen} (or seqlen={padded} if this sequence really has "
            f"{padded} tokens)")


def _check_alibi(name, alibi_slopes, layout, q, n_batch: int, batch_name: str) -> Optional[torch.Tensor]:
    """Validated ALiBi slopes as fp32 ``[n_batch, h_q]`` (see ``check_alibi_slopes``), or None. Raised before any
    collective."""
    if alibi_slopes is None:
        return None
    try:
        slopes = check_alibi_slopes(alibi_slopes, q.device, n_batch, q.shape[-2], batch_name)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from None
    return slopes


def _results(out, lse, return_lse, return_attn_probs):
    if return_attn_probs:  # flash-attn / ring-flash-attn: (out, softmax_lse, attention probabilities: none)
        return out, lse, None
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------------
# Autograd


class _RingAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, layout, comm, addr, window, softcap, alibi=None):
        k, v = k.contiguous(), v.contiguous()  # sent as-is
        out_acc, lse = _ring_forward(q, k, v, scale, causal, layout, comm, addr, window, softcap, alibi)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, causal, layout, comm, addr, window, softcap, alibi)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal, layout, comm, addr, window, softcap, alibi = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, dlse, scale, causal, layout, comm, addr, window,
                                    softcap, alibi)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None


def ring_attn_func(q, k, v, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
                   window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes=None,
                   deterministic: bool = False, return_attn_probs: bool = False, group=None, *,
                   layout: str = "zigzag", seqlen: Optional[int] = None, return_lse: bool = False,
                   validate: bool = True):
    """Exact attention over a sequence sharded across the ranks of ``group``, with autograd.

    Every rank of ``group`` calls this with its shard (collective). The global sequence of ``S`` tokens is
    split by ``layout`` (see :mod:`ring_attn.ring.layout`; :func:`ring_attn.shard` makes the shards, padding
    ``S`` to a length the layout can split). The positional order after ``q, k, v`` is flash-attn's
    (``flash_attn_func``), with ``group`` last, so calls written for flash-attn / ring-flash-attn mean the
    same here; ``ring_attn.compat`` has ring-flash-attn's exact names and signatures.

    Args:
        q: this rank's queries ``[batch, s_local, heads_q, head_dim]``, fp16/bf16/fp32; CUDA with an NCCL
            group, CPU with gloo.
        k, v: this rank's keys/values ``[batch, s_local, heads_kv, head_dim]``, same dtype/device;
            ``heads_q % heads_kv == 0`` (GQA/MQA: K/V circulate with ``heads_kv`` heads).
        dropout_p: must be 0 (dropout is not implemented: NotImplementedError otherwise).
        softmax_scale: default ``1 / sqrt(head_dim)``.
        causal: causal mask over *global* positions (query at global position ``i`` sees keys ``j <= i``).
        window_size: ``(left, right)`` sliding window over *global* positions (flash-attn's semantics: the query
            at ``i`` sees keys ``i - left ..= i + right``, -1 unbounded; with ``causal`` the right side is 0).
            Each (query shard, key shard) piece gets the true offset between its global query and key
            positions; pieces entirely outside the window are skipped.
        softcap: ``> 0``: scores ``softcap * tanh(s / softcap)`` (Gemma 2); 0 is off.
        alibi_slopes: ALiBi: None, or fp32 ``[heads_q]`` / ``[batch, heads_q]`` on q's device (varlen:
            ``[n_seqs, heads_q]``); adds ``-slope * |q - k|`` over *global* positions, exactly as single-device
            ``flash_attn_func`` on the whole sequence (each piece runs with its true offset; striped pieces with
            slopes times ``W`` and a shifted LSE), for every layout. The same values on every rank: with
            ``validate`` they are compared across ranks at every call (one small all-gather).
        deterministic: the ring's forward and backward are bitwise deterministic either way; True under the
            opt-in ``RING_ATTN_BWD=fused`` (unordered atomics) is refused with ValueError.
        return_attn_probs: return ``(out, lse, None)`` like flash-attn / ring-flash-attn (no probabilities).
        group: process group (default: the world); any subgroup or ``DeviceMesh`` dimension's group.
        layout: (keyword) ``"zigzag"`` (default), ``"contiguous"`` or ``"striped"``.
        seqlen: (keyword) the real global length ``S`` when :func:`ring_attn.shard` padded the sequence to
            ``W * s_local`` tokens: padding keys are then masked for every query, padding rows return 0 (LSE
            ``-inf``) and get zero gradients. Not needed for causal attention (padding sits after every real
            token, so no real query sees it), *required* for non-causal attention over padded shards. A
            non-causal call without it raises ValueError when ``q``, ``k`` or ``v`` is a padded shard
            (:func:`ring_attn.ring.layout.shard_info`, exact), or, for tensors computed from shards, when
            the most recent sequence ``shard`` split into ``W * s_local`` tokens in this process was padded
            (:func:`ring_attn.ring.layout.recorded_padding`). Passing it is always correct.
        return_lse: (keyword) return ``(out, lse)``.
        validate: (keyword) check with one small ``all_gather`` per call that every rank passes the same
            shapes/dtype/causal/layout/scale/seqlen/window/softcap and ALiBi or none (on NCCL, a signature
            already checked on ``group`` is compared on the device, without a host sync: see
            ``RING_ATTN_VALIDATE`` in :func:`validate_mode`). ``False`` skips it.

    Returns:
        ``out`` ``[batch, s_local, heads_q, head_dim]``: this rank's output shard in the input dtype; with
        ``return_lse`` ``(out, lse)``, with ``return_attn_probs`` ``(out, lse, None)``: ``lse`` float32
        ``[batch, heads_q, s_local]`` (natural log, over the whole sequence; differentiable). Backward gives
        this rank's dq, dk, dv (input dtype).

    Raises:
        NotImplementedError for ``dropout_p != 0``. TypeError /
        ValueError naming the argument: bad shapes, dtypes,
        ``alibi_slopes`` of the wrong dtype, shape or device,
        head counts, layout, an argument of the wrong kind (e.g. ``causal`` passed where ``dropout_p`` is),
        ``s_local`` odd with zigzag, a ``seqlen`` the shards cannot hold, non-causal attention without
        ``seqlen`` over shards known to be padded (see ``seqlen``), a CUDA tensor with a gloo group or
        a CPU tensor with NCCL. All before any K/V is exchanged; with ``validate=True`` a rank whose own
        arguments fail still joins the signature exchange, so every other rank raises ValueError naming it
        instead of waiting. ValueError on every rank when ranks pass inconsistent inputs (``validate=True``;
        see ``RING_ATTN_VALIDATE`` in :func:`validate_mode`). RuntimeError when torch.distributed is not
        initialized.
    """
    name = "ring_attn_func"
    alibi = None
    try:  # this rank's own checks; a failure still joins the signature exchange, so no other rank waits for it
        causal, window, softcap = check_flash_args(name, dropout_p, causal, window_size, softcap, alibi_slopes,
                                                    deterministic, return_attn_probs, group)
        scale, pg, rank, world, backend = _check_common(name, q, k, v, softmax_scale, layout, group, packed=False)
        b, s_local = q.shape[0], q.shape[1]
        alibi = _check_alibi(name, alibi_slopes, layout, q, b, "batch")
        if layout == "zigzag" and s_local % 2:
            raise ValueError(f"zigzag layout needs an even number of local tokens (global length a multiple of "
                             f"2 * world_size = {2 * world}); q has s_local = {s_local} ({tuple(q.shape)}); shard "
                             f"the global sequence with ring_attn.shard, which pads it")
        padded = s_local * world
        real = _check_seqlen(name, seqlen, padded, world, layout, causal, (q, k, v))
        failed = None
    except (TypeError, ValueError, NotImplementedError) as exc:
        failed = named_error(name, exc)
    _validate_or_raise(name, validate, group, q, 0, lambda: (
        pg, backend, q.device, _signature(0, q, k, v, causal, layout, scale, [real], window, softcap, alibi)),
        failed, alibi)
    want_lse = return_lse or return_attn_probs
    if real < padded:
        # every batch element is one sequence of `real` tokens padded to `padded`: the packed schedule masks
        # the padding (per-piece key counts; views, no copies for contiguous inputs)
        addr = _Packed([real] * b, rank, world, layout, q.device)
        flat = [x.reshape(b * s_local, *x.shape[2:]) for x in (q, k, v)]
        out, lse = _RingAttnFunction.apply(*flat, scale, causal, layout, _comm(pg, q.device), addr, window, softcap,
                                           alibi)
        out = out.view(q.shape)
        lse = lse.view(lse.shape[0], b, s_local).transpose(0, 1).contiguous()
    elif world == 1:  # the whole sequence is local: the single-device op, with no fp32 round trips
        res = flash_attn_func(q, k, v, causal=causal, softmax_scale=scale, window_size=window, softcap=softcap,
                              alibi_slopes=alibi_slopes, return_lse=want_lse)
        out, lse = res if want_lse else (res, None)
    else:
        out, lse = _RingAttnFunction.apply(q, k, v, scale, causal, layout, _comm(pg, q.device), _Dense(s_local),
                                           window, softcap, alibi)
    return _results(out, lse, return_lse, return_attn_probs)


def ring_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p: float = 0.0,
                          softmax_scale: Optional[float] = None, causal: bool = False,
                          window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes=None,
                          deterministic: bool = False, return_attn_probs: bool = False, group=None, *,
                          layout: str = "zigzag", return_lse: bool = False, validate: bool = True):
    """Ring attention over packed sequences of any lengths, each sharded by ``layout``.

    Positional order: ring-flash-attn's ``ring_flash_attn_varlen_func`` (``q, k, v, cu_seqlens, max_seqlen``,
    then flash-attn's), with one difference: ``cu_seqlens`` / ``max_seqlen`` here are *global* (the whole
    packed batch); ring-flash-attn's are local (``ring_attn.compat`` takes local ones, like it).

    Args:
        q: this rank's packed queries ``[t_local, heads_q, head_dim]``: for every sequence of the global
            ``cu_seqlens``, its tokens on this rank (as made by :func:`ring_attn.ring.layout.shard_varlen`),
            packed in sequence order. A sequence whose length ``L`` the layout cannot split is padded at its
            end to the next multiple of ``W`` (``2W`` for zigzag) by ``shard_varlen`` and the padding is
            masked here, so ``t_local = sum(padded L) / W``
            (:func:`ring_attn.ring.layout.varlen_local_cu_seqlens`).
        k, v: ``[t_local, heads_kv, head_dim]``, sharded the same way.
        cu_seqlens: *global*, real sequence boundaries, int32 ``[n_seqs + 1]`` (the same on every rank).
            Read once on the host.
        max_seqlen: the longest global sequence (an upper bound is fine); an int, numpy int or 1-element
            tensor.
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, group, layout, return_lse, validate: as in :func:`ring_attn_func`; causal is per
            sequence.

    Returns:
        ``out`` ``[t_local, heads_q, head_dim]`` in the input dtype (padding rows 0); with ``return_lse``
        ``(out, lse)``, with ``return_attn_probs`` ``(out, lse, None)``, lse float32 ``[heads_q, t_local]``.

    Raises:
        as :func:`ring_attn_func`, plus TypeError/ValueError for malformed ``cu_seqlens``, ``max_seqlen``
        below the longest sequence, or ``q`` whose token count is not the padded total / ``W``.
    """
    name = "ring_attn_varlen_func"
    alibi = None
    try:  # this rank's own checks; a failure still joins the signature exchange, so no other rank waits for it
        causal, window, softcap = check_flash_args(name, dropout_p, causal, window_size, softcap, alibi_slopes,
                                                    deterministic, return_attn_probs, group)
        scale, pg, rank, world, backend = _check_common(name, q, k, v, softmax_scale, layout, group, packed=True)
        check_cu_seqlens_form("cu_seqlens", cu_seqlens)
        pcu = varlen_padded_cu_seqlens(cu_seqlens, world, layout)  # validates the values (host read)
        cu = [int(c) for c in cu_seqlens.tolist()]
        lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
        alibi = _check_alibi(name, alibi_slopes, layout, q, len(lens), "n_seqs")
        max_seqlen = _as_int("max_seqlen", max_seqlen)
        if max_seqlen < max(lens):
            raise ValueError(f"{name}: max_seqlen must be >= the longest sequence ({max(lens)}), got {max_seqlen}")
        if pcu[-1] != q.shape[0] * world:
            padded = "" if pcu == cu else (f" after padding every sequence to a length layout {layout!r} can "
                                           f"split (padded cu_seqlens {pcu[:6]}{'...' if len(pcu) > 6 else ''})")
            raise ValueError(f"{name}: cu_seqlens {cu[:6]}{'...' if len(cu) > 6 else ''} means "
                             f"{pcu[-1] / world:g} local tokens on each of {world} ranks{padded}, but q has "
                             f"{q.shape[0]} ({tuple(q.shape)}); shard packed inputs with ring_attn.shard_varlen")
        failed = None
    except (TypeError, ValueError, NotImplementedError) as exc:
        failed = named_error(name, exc)

    def varlen_signature():
        digest = int.from_bytes(hashlib.blake2b(struct.pack(f"<{len(cu)}q", *cu), digest_size=8).digest(),
                                "little", signed=True)
        return pg, backend, q.device, _signature(1, q, k, v, causal, layout, scale, [len(lens), digest], window,
                                                 softcap, alibi)
    _validate_or_raise(name, validate, group, q, 1, varlen_signature, failed, alibi)
    want_lse = return_lse or return_attn_probs
    if world == 1 and pcu == cu:  # the whole sequence is local: the single-device op, no fp32 round trips
        res = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal,
                                     softmax_scale=scale, window_size=window, softcap=softcap,
                                     alibi_slopes=alibi_slopes, return_lse=want_lse)
        out, lse = res if want_lse else (res, None)
    else:
        out, lse = _RingAttnFunction.apply(q, k, v, scale, causal, layout, _comm(pg, q.device),
                                           _Packed(lens, rank, world, layout, q.device), window, softcap, alibi)
    return _results(out, lse, return_lse, return_attn_probs)


# ---------------------------------------------------------------------------------------------------------
# Lower-level pieces under stable public names, for benchmarks/bench_ring.py (it times one ring step and its
# compute alone, without autograd or argument checks). Not part of the package's public API.
ring_forward = _ring_forward
ring_backward = _ring_backward
plan = _plan
DenseAddress = _Dense
PackedAddress = _Packed
comm_for = _comm
