"""How a global sequence is split over the ranks of a ring: ``"contiguous"``, ``"zigzag"``, ``"striped"``.

For a sequence of ``S`` tokens on ``W`` ranks (docs/design.md), rank ``r`` holds ``S / W`` tokens:

* ``contiguous``: tokens ``[r·S/W, (r+1)·S/W)``. Needs ``S % W == 0``. Causal work is unbalanced (rank
  ``W-1`` does ``W`` times the work of rank 0); fine for non-causal attention.
* ``zigzag``: the sequence is cut into ``2W`` chunks and rank ``r`` holds chunks ``r`` and ``2W-1-r`` (in that
  order). Needs ``S % (2W) == 0``. Balanced causal work: the default.
* ``striped``: token ``t`` lives on rank ``t % W``; local token ``i`` of rank ``r`` is global token ``i·W + r``.
  Needs ``S % W == 0``.

Within a rank's shard global positions always increase with the local index, so causal attention of a
shard against itself is ordinary causal attention with offset 0.

Any length. A length the layout cannot split is padded at the *end* of the sequence, with ``pad_value``, to
:func:`padded_length` (the next multiple of ``W``, ``2W`` for zigzag) by :func:`shard` /
:func:`shard_for_rank`; :func:`unshard` drops the padding again when given the real ``seqlen``. Because the
padding sits after every real token, causal attention never lets a real query see it; non-causal ring
attention masks it when told the real length (``ring_attn_func(..., seqlen=S)``). In every layout a rank's
real tokens are a prefix of its shard (for zigzag: a prefix of each of its two chunks), which is what lets
the ring mask padding with per-piece key counts instead of a mask tensor (:func:`valid_counts`).

Forgetting ``seqlen=`` in a non-causal call must not silently attend to the padding, so the shards remember
where they came from, without being anything but ordinary tensors: :func:`shard_info` gives the real and
padded length of any tensor :func:`shard` / :func:`shard_for_rank` returned (or a view of one), from a
registry of weak references keyed by the tensor's identity (nothing is attached to the tensor, nothing is
kept alive). The ring reads it from ``q``, ``k``, ``v``: exact, whatever else was sharded before or since.
Tensors *computed* from shards (``q = proj(shard(hidden))``) carry nothing; for them the ring falls back to
:func:`recorded_padding`, the real length of the most recent sequence sharded to that size in this process.

The same permutation shards anything indexed by token (hidden states, positions for RoPE, labels), so apply
:func:`shard` to each of them, or use :func:`shard_positions` to get a rank's global positions directly.

Packed (varlen) sequences are sharded *per sequence*: every sequence of length ``L`` is padded at its end
to ``padded_length(L)`` (nothing is added when ``W`` (``2W`` for zigzag) divides ``L``) and split by the
layout as above; rank ``r`` holds its parts of every sequence, packed in the same order; its local
``cu_seqlens`` are the padded global ones divided by ``W`` (:func:`varlen_local_cu_seqlens`). The real
``cu_seqlens`` say where the padding is, so the varlen functions need no extra argument.

Pure functions (``*_for_rank``, ``*_index``, ``*_positions``) take ``rank``/``world_size`` explicitly and
need no process group; :func:`shard` / :func:`unshard` and the varlen pair read them from ``group``.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Optional, Sequence

import torch

from ring_attn.ring.comm import all_gather_ints

__all__ = [
    "LAYOUTS",
    "check_layout",
    "check_divisible",
    "padded_length",
    "valid_counts",
    "ShardInfo",
    "shard_info",
    "recorded_padding",
    "shard_index",
    "shard_positions",
    "shard_for_rank",
    "unshard_from_shards",
    "shard",
    "unshard",
    "check_varlen_divisible",
    "varlen_padded_cu_seqlens",
    "varlen_shard_index",
    "varlen_positions",
    "varlen_local_cu_seqlens",
    "varlen_shard_for_rank",
    "varlen_unshard_from_shards",
    "shard_varlen",
    "unshard_varlen",
]

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: str) -> str:
    """Return ``layout`` if it names a layout; raise ``ValueError`` listing the layouts otherwise."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _check_world(rank: int, world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def _multiple(world_size: int, layout: str) -> int:
    return 2 * world_size if layout == "zigzag" else world_size


def check_divisible(seqlen: int, world_size: int, layout: str, what: str = "sequence length") -> None:
    """Raise ``ValueError`` if ``layout`` cannot split ``seqlen`` tokens over ``world_size`` ranks, saying
    how much padding would fix it."""
    check_layout(layout)
    m = _multiple(world_size, layout)
    if seqlen % m:
        pad = (-seqlen) % m
        rule = f"2 * world_size = {m}" if layout == "zigzag" else f"world_size = {m}"
        raise ValueError(
            f"{what} {seqlen} cannot be split by layout {layout!r} over {world_size} ranks: it must be a "
            f"multiple of {rule}; pad it with {pad} token(s) to {seqlen + pad} (e.g. with a pad token whose "
            f"label is ignored)")


def padded_length(seqlen: int, world_size: int, layout: str) -> int:
    """The length :func:`shard` pads ``seqlen`` tokens to: the smallest multiple of ``world_size``
    (``2 * world_size`` for zigzag) that is ``>= seqlen``."""
    check_layout(layout)
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 0:
        raise ValueError(f"seqlen must be an int >= 0, got {seqlen!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    m = _multiple(world_size, layout)
    return seqlen + (-seqlen) % m


def valid_counts(seqlen: int, rank: int, world_size: int, layout: str) -> tuple[int, int, int]:
    """How many of ``rank``'s tokens are real (not padding) when a ``seqlen``-token sequence is padded to
    :func:`padded_length` and sharded: ``(whole shard, first half, second half)``.

    The real tokens of a shard are always a prefix of it, and for zigzag also a prefix of each chunk (the
    halves): a rank's second chunk holds real tokens only if its first chunk is all real. The halves are
    ``(n // 2, n - n // 2)`` tokens of the ``n``-token shard for every layout (only zigzag's halves mean
    anything to the ring).
    """
    _check_world(rank, world_size)
    n = padded_length(seqlen, world_size, layout) // world_size
    half = n // 2
    if layout == "contiguous":
        total = min(max(seqlen - rank * n, 0), n)
    elif layout == "striped":  # local token i is global token i*W + rank
        total = min(max(-(-(seqlen - rank) // world_size), 0), n)
    else:  # zigzag: chunks rank and 2W-1-rank, each of n // 2 tokens
        first = min(max(seqlen - rank * half, 0), half)
        second = min(max(seqlen - (2 * world_size - 1 - rank) * half, 0), half)
        return first + second, first, second
    return total, min(total, half), max(total - half, 0)


class ShardInfo(NamedTuple):
    """What :func:`shard` / :func:`shard_for_rank` knew when it made a tensor (see :func:`shard_info`)."""

    layout: str
    world_size: int
    seqlen: int  # the real length of the sharded dim
    padded: int  # padded_length(seqlen, world_size, layout): the global length the shards hold


# id(tensor) -> (weak reference to it, ShardInfo). Identity, not content: a tensor is in it only while alive
# (the weakref callback drops the entry before the id can be reused), and equal-looking tensors are not
# confused. Nothing is attached to the tensors themselves, so they pickle, copy and compile as ordinary ones.
_made: dict = {}


def _remember(x: torch.Tensor, info: ShardInfo) -> None:
    key = id(x)

    def forget(ref, key=key):
        if _made.get(key, (None,))[0] is ref:
            del _made[key]

    _made[key] = (weakref.ref(x, forget), info)


def shard_info(x) -> Optional[ShardInfo]:
    """The :class:`ShardInfo` ``(layout, world_size, seqlen, padded)`` of a tensor made by :func:`shard` /
    :func:`shard_for_rank`, or of a view of one (``.view``, ``.transpose``, ``.unbind``, slicing; also
    after ``.requires_grad_()``, which returns the same tensor); None for any other tensor, including one
    computed from a shard (``x * 1``, ``x.clone()``, ``x.to(other_dtype)``, ``linear(x)``), and for
    non-tensors. ``seqlen < padded`` means the shards hold ``padded - seqlen`` padding tokens."""
    if not isinstance(x, torch.Tensor):
        return None
    for t in (x, x._base):  # a view's _base is the tensor that owns the storage (never itself a view)
        if t is None:
            continue
        entry = _made.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
    return None


_recorded: dict = {}


def _record_padding(layout: str, world_size: int, seqlen: int, padded: int) -> None:
    if seqlen == padded:
        _recorded.pop((layout, world_size, padded), None)
    else:
        _recorded[(layout, world_size, padded)] = seqlen


def recorded_padding(layout: str, world_size: int, padded: int) -> Optional[int]:
    """The real length of the most recent sequence that :func:`shard` / :func:`shard_for_rank` split into
    ``padded`` tokens for this layout and world size in this process, if it was padded; None if it was not
    (it really had ``padded`` tokens) or nothing was.

    Only a fallback: the ring consults it for a non-causal call without ``seqlen=`` whose ``q``, ``k`` and
    ``v`` have no :func:`shard_info` (tensors computed from shards, e.g. projections of sharded hidden
    states, whose real length only the caller knows). It assumes they come from the most recent sequence
    sharded to their size, which holds for a program that shards a batch and then runs it; a program that
    shards several sequences of one padded size ahead should pass ``seqlen=`` (always correct)."""
    return _recorded.get((layout, world_size, padded))


def shard_index(seqlen: int, rank: int, world_size: int, layout: str = "zigzag",
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Global token indices held by ``rank``, in local order: int64 ``[seqlen // world_size]``.

    ``shard_index(...)[i]`` is the global index of local token ``i``. Raises ``ValueError`` when the layout
    cannot split ``seqlen`` (see :func:`check_divisible`) or rank/world are invalid.
    """
    check_layout(layout)
    _check_world(rank, world_size)
    check_divisible(seqlen, world_size, layout)
    n = seqlen // world_size
    if layout == "contiguous":
        return torch.arange(rank * n, (rank + 1) * n, device=device)
    if layout == "striped":
        return torch.arange(n, device=device) * world_size + rank
    c = seqlen // (2 * world_size)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c, device=device)])


def shard_positions(seqlen: int, rank: int, world_size: int, layout: str = "zigzag", offset: int = 0,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """Global positions of ``rank``'s tokens (for RoPE): int64 ``[padded_length(seqlen) // world_size]``,
    ``offset`` added (e.g. the position of the first token when a sequence continues a cache). Any
    ``seqlen``: padding tokens (see :func:`shard`) get the positions ``seqlen, seqlen + 1, ...`` after the
    real ones, which real tokens never attend to."""
    return shard_index(padded_length(seqlen, world_size, layout), rank, world_size, layout, device) + offset


def _dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def _pad_select(x: torch.Tensor, dim: int, src: torch.Tensor, pad_value) -> torch.Tensor:
    """``x.index_select(dim, src)`` where ``src < 0`` marks padding, filled with ``pad_value``."""
    pad = src < 0
    out = x.index_select(dim, src.clamp_min(0))
    if bool(pad.any()):
        shape = [1] * x.dim()
        shape[dim] = -1
        out = out.masked_fill(pad.view(shape), pad_value)
    return out


def shard_for_rank(x: torch.Tensor, rank: int, world_size: int, dim: int = 1, layout: str = "zigzag",
                   pad_value=0) -> torch.Tensor:
    """``rank``'s shard of the global tensor ``x`` along ``dim`` (a new contiguous tensor; same dtype).

    Any length: ``x`` is first padded at the end of ``dim`` with ``pad_value`` to :func:`padded_length`
    (e.g. ``pad_value=-100`` for labels, so padding is ignored by the loss), so every rank gets
    ``padded_length(S) // world_size`` tokens. The result is remembered (weakly) with its real length
    ``S``: :func:`shard_info`.
    """
    dim = _dim(x, dim)
    s = x.shape[dim]
    padded = padded_length(s, world_size, layout)
    idx = shard_index(padded, rank, world_size, layout, x.device)
    _record_padding(layout, world_size, s, padded)
    if padded == s:
        out = x.index_select(dim, idx)
    else:
        out = _pad_select(x, dim, torch.where(idx < s, idx, -1), pad_value)
    _remember(out, ShardInfo(layout, world_size, s, padded))
    return out


def _inverse_perm(seqlen: int, world_size: int, layout: str, device) -> torch.Tensor:
    """Concatenating the shards of ranks 0..W-1 puts global token ``perm[j]`` at position ``j``;
    this returns ``inv`` with ``gathered.index_select(dim, inv)`` = the global tensor."""
    perm = torch.cat([shard_index(seqlen, r, world_size, layout, device) for r in range(world_size)])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(seqlen, device=device)
    return inv


def _check_seqlen(seqlen, padded: int, world_size: int, layout: str) -> int:
    if seqlen is None:
        return padded
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or padded_length(max(seqlen, 0), world_size,
                                                                                  layout) != padded:
        m = _multiple(world_size, layout)
        raise ValueError(f"seqlen must be the real global length of the sharded sequence, an int in "
                         f"({padded - m}, {padded}] for {padded} padded tokens with layout {layout!r} on "
                         f"{world_size} ranks; got {seqlen!r}")
    return seqlen


def unshard_from_shards(shards: Sequence[torch.Tensor], dim: int = 1, layout: str = "zigzag",
                        seqlen: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`shard_for_rank`: ``shards[r]`` is rank ``r``'s shard; returns the global tensor,
    cut to the real length ``seqlen`` when given (dropping the padding :func:`shard_for_rank` added)."""
    check_layout(layout)
    if len(shards) == 0:
        raise ValueError("shards must hold one tensor per rank, got an empty sequence")
    dim = _dim(shards[0], dim)
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"every rank's shard must have one shape; got {sorted(shapes)}")
    gathered = torch.cat(list(shards), dim=dim)
    padded = gathered.shape[dim]
    seqlen = _check_seqlen(seqlen, padded, len(shards), layout)
    inv = _inverse_perm(padded, len(shards), layout, gathered.device)
    return gathered.index_select(dim, inv[:seqlen])


def _group_rank_world(group) -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized; call torch.distributed.init_process_group "
                           "first, or use shard_for_rank / unshard_from_shards")
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: torch.Tensor, dim: int = 1, group=None, layout: str = "zigzag", pad_value=0) -> torch.Tensor:
    """This rank's shard of the global tensor ``x`` (identical on every rank of ``group``).

    Args:
        x: any tensor whose ``dim`` is the token dim, e.g. q/k/v ``[b, s, h, d]`` (``dim=1``), positions or
            labels ``[b, s]`` (``dim=1``) or ``[s]`` (``dim=0``). Any length ``S``.
        dim: the token dim.
        group: process group (default: the world).
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"``.
        pad_value: fills the padding when the layout cannot split ``S`` (the sequence is padded at its end
            to :func:`padded_length`, the next multiple of ``W``, ``2W`` for zigzag). Use ``-100`` (the
            loss's ``ignore_index``) for labels. Causal ring attention never lets a real query see padding;
            non-causal ring attention needs the real length: ``ring_attn_func(..., seqlen=S)`` (called
            without it on these shards, or on tensors computed from them, it raises ValueError).

    Returns:
        ``x`` with ``padded_length(S) // W`` tokens along ``dim`` (a copy), same dtype and device: an
        ordinary tensor, whose real length :func:`shard_info` knows while it lives. No communication.

    Raises:
        ValueError: an unknown layout or an out-of-range ``dim``.
    """
    rank, world = _group_rank_world(group)
    return shard_for_rank(x, rank, world, dim, layout, pad_value)


_AGREE_LEN = 17  # int64 codes of an unshard call's signature: [failed?, dim, dtype, seqlen, cu digest, ndim, layout,
#                  shape]
_GATHER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64,
                  torch.bool, torch.uint8, torch.int8, torch.int16)


def _gather_signature(x: torch.Tensor, dim: int, seqlen, cu: Optional[list[int]], layout: str) -> list[int]:
    dtype = _GATHER_DTYPES.index(x.dtype) if x.dtype in _GATHER_DTYPES else 99
    digest = 0 if cu is None else (hash(tuple(cu)) & 0x7FFFFFFFFFFFFFFF)
    shape = list(x.shape)[: _AGREE_LEN - 7] + [-1] * max(0, _AGREE_LEN - 7 - x.dim())
    return [0, dim, dtype, -1 if seqlen is None else int(seqlen), digest, x.dim(), LAYOUTS.index(layout)] + shape


def _show_signature(sig: list[int]) -> str:
    if sig[0]:
        return "invalid arguments (raised on that rank)"
    dtype = _GATHER_DTYPES[sig[2]] if sig[2] < len(_GATHER_DTYPES) else "other"
    text = f"shape {tuple(sig[7:7 + sig[5]])} {dtype} dim={sig[1]} layout={LAYOUTS[sig[6]]!r}"
    if sig[3] >= 0:
        text += f" seqlen={sig[3]}"
    if sig[4]:
        text += f" cu_seqlens digest {sig[4] & 0xFFFFFFFF:08x}"
    return text


def _agree_before_gather(name: str, group, x_local, make_sig, failed: Optional[BaseException]) -> None:
    """One small all_gather of what the ranks must agree on before the data gather (``make_sig()``), so that
    ranks passing different shapes, dtypes, seqlen or cu_seqlens, or one rank whose own checks raised
    ``failed`` (it sends a failed signature, then raises), all raise instead of hanging or aborting in the
    gather."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    dev = x_local.device if isinstance(x_local, torch.Tensor) else torch.device("cpu")
    sigs = all_gather_ints(group, backend, dev, [1] * _AGREE_LEN if failed is not None else make_sig(), failed)
    if any(s != sigs[0] for s in sigs):
        ranks = "; ".join(f"rank {i}: {_show_signature(s)}" for i, s in enumerate(sigs))
        raise ValueError(f"{name}: every rank must pass a shard of the same shape and dtype, with the same dim, "
                         f"layout, seqlen and cu_seqlens; {ranks}")


def unshard(x_local: torch.Tensor, dim: int = 1, group=None, layout: str = "zigzag",
            seqlen: Optional[int] = None) -> torch.Tensor:
    """Gather every rank's shard and undo the layout's permutation: the global tensor, on every rank.

    ``x_local`` must have the same shape, dtype and device on every rank (collective: all ranks of ``group``
    must call it). Not differentiable. Returns a tensor with ``seqlen`` tokens along ``dim`` (the real
    length, dropping the padding :func:`shard` added), or all ``W · x_local.shape[dim]`` when ``seqlen`` is
    None. Raises ``ValueError`` when ``seqlen`` cannot be the real length of these shards, and on every rank
    when the ranks pass different shapes, dtypes, ``dim``, ``layout`` or ``seqlen`` (one small all_gather first).
    """
    import torch.distributed as dist

    rank, world = _group_rank_world(group)
    try:  # this rank's own checks; a failure still joins the signature gather, so no other rank waits for it
        if not isinstance(x_local, torch.Tensor):
            raise TypeError(f"x_local must be a torch.Tensor, got {type(x_local).__name__}")
        dim = _dim(x_local, dim)
        check_layout(layout)
        _check_seqlen(seqlen, world * x_local.shape[dim], world, layout)
        failed = None
    except (TypeError, ValueError) as exc:
        failed = exc
    _agree_before_gather("unshard", group, x_local, lambda: _gather_signature(x_local, dim, seqlen, None, layout),
                         failed)
    x_local = x_local.contiguous()
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local, group=group)
    return unshard_from_shards(parts, dim, layout, seqlen)


# ---------------------------------------------------------------------------------------------------------
# Packed (varlen) sequences: each sequence sharded by the layout.


def _cu_list(cu_seqlens) -> list[int]:
    vals = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    if len(vals) < 2 or vals[0] != 0 or any(b < a for a, b in zip(vals[:-1], vals[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and have n_seqs + 1 >= 2 entries; "
                         f"got {vals[:8]}{'...' if len(vals) > 8 else ''}")
    return [int(v) for v in vals]


def check_varlen_divisible(cu_seqlens, world_size: int, layout: str) -> list[int]:
    """Validate that ``layout`` can split every sequence without padding; returns the global cu_seqlens
    as a list. (The varlen functions pad instead; this is for callers that want no padding.)"""
    vals = _cu_list(cu_seqlens)
    for i, (a, b) in enumerate(zip(vals[:-1], vals[1:])):
        check_divisible(b - a, world_size, layout, what=f"sequence {i} (cu_seqlens[{i}:{i + 2}] = [{a}, {b}]) "
                        f"has length")
    return vals


def varlen_padded_cu_seqlens(cu_seqlens, world_size: int, layout: str = "zigzag") -> list[int]:
    """Global boundaries after every sequence is padded at its end to :func:`padded_length` (equal to
    ``cu_seqlens`` when the layout splits every length): a list of ``n_seqs + 1`` ints."""
    vals = _cu_list(cu_seqlens)
    out = [0]
    for a, b in zip(vals[:-1], vals[1:]):
        out.append(out[-1] + padded_length(b - a, world_size, layout))
    return out


def varlen_local_cu_seqlens(cu_seqlens: torch.Tensor, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """Local ``cu_seqlens`` of every rank (the same on all ranks): the padded global ones
    (:func:`varlen_padded_cu_seqlens`) divided by ``world_size``; int32 on the device of ``cu_seqlens``."""
    check_layout(layout)
    vals = varlen_padded_cu_seqlens(cu_seqlens, world_size, layout)
    device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else None
    return torch.tensor([v // world_size for v in vals], dtype=torch.int32, device=device)


def _varlen_local(cu_seqlens, rank: int, world_size: int, layout: str, device):
    """For each of ``rank``'s packed tokens: (index into the padded packed tensor, position within its
    sequence, index into the unpadded packed tensor or -1 for padding)."""
    check_layout(layout)
    _check_world(rank, world_size)
    vals = _cu_list(cu_seqlens)
    pvals = varlen_padded_cu_seqlens(vals, world_size, layout)
    idx, pos, src = [], [], []
    for a, b, pa, pb in zip(vals[:-1], vals[1:], pvals[:-1], pvals[1:]):
        p = shard_index(pb - pa, rank, world_size, layout, device)
        idx.append(pa + p)
        pos.append(p)
        src.append(torch.where(p < b - a, a + p, -1))
    if not pos:
        z = torch.zeros(0, dtype=torch.int64, device=device)
        return z, z, z
    return torch.cat(idx), torch.cat(pos), torch.cat(src)


def varlen_shard_index(cu_seqlens, rank: int, world_size: int, layout: str = "zigzag",
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """Packed token indices held by ``rank``, in local order: int64 ``[padded_total // world_size]``. They
    index the packed tensor after every sequence is padded to :func:`padded_length`
    (:func:`varlen_padded_cu_seqlens`), which is the packed tensor itself when no sequence needs padding."""
    return _varlen_local(cu_seqlens, rank, world_size, layout, device)[0]


def varlen_positions(cu_seqlens, rank: int, world_size: int, layout: str = "zigzag",
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """Position of each of ``rank``'s packed tokens within its own sequence (restarting at 0 for every
    sequence; what RoPE needs): int64 ``[padded_total // world_size]``. Padding tokens get positions
    ``>= L`` of their sequence, after its real tokens."""
    return _varlen_local(cu_seqlens, rank, world_size, layout, device)[1]


def varlen_shard_for_rank(x: torch.Tensor, cu_seqlens, rank: int, world_size: int, dim: int = 0,
                          layout: str = "zigzag", pad_value=0) -> torch.Tensor:
    """``rank``'s shard of packed ``x`` (token dim ``dim``, split by global ``cu_seqlens``); a sequence the
    layout cannot split is padded at its end with ``pad_value`` first."""
    dim = _dim(x, dim)
    vals = _cu_list(cu_seqlens)
    if vals[-1] != x.shape[dim]:
        raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim} but cu_seqlens ends at {vals[-1]}")
    src = _varlen_local(vals, rank, world_size, layout, x.device)[2]
    return _pad_select(x, dim, src, pad_value)


def varlen_unshard_from_shards(shards: Sequence[torch.Tensor], cu_seqlens, dim: int = 0,
                               layout: str = "zigzag") -> torch.Tensor:
    """Inverse of :func:`varlen_shard_for_rank` given every rank's shard (padding dropped)."""
    if len(shards) == 0:
        raise ValueError("shards must hold one tensor per rank, got an empty sequence")
    world = len(shards)
    dim = _dim(shards[0], dim)
    gathered = torch.cat(list(shards), dim=dim)
    vals = _cu_list(cu_seqlens)
    pvals = varlen_padded_cu_seqlens(vals, world, layout)
    perm = torch.cat([varlen_shard_index(vals, r, world, layout, gathered.device) for r in range(world)])
    if perm.numel() != gathered.shape[dim]:
        raise ValueError(f"shards hold {gathered.shape[dim]} tokens but cu_seqlens (padded for layout "
                         f"{layout!r} on {world} ranks) needs {perm.numel()}")
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=gathered.device)
    keep = torch.cat([torch.arange(pa, pa + (b - a), device=gathered.device)
                      for a, b, pa in zip(vals[:-1], vals[1:], pvals[:-1])] or
                     [torch.zeros(0, dtype=torch.int64, device=gathered.device)])
    return gathered.index_select(dim, inv[keep])


def shard_varlen(x: torch.Tensor, cu_seqlens, dim: int = 0, group=None, layout: str = "zigzag",
                 pad_value=0) -> torch.Tensor:
    """This rank's shard of packed ``x`` ``[total, ...]``: every sequence of the global ``cu_seqlens`` split
    by ``layout``, after padding it at its end with ``pad_value`` to :func:`padded_length` when the layout
    cannot split its length. Pair with :func:`varlen_local_cu_seqlens` for the local boundaries;
    :func:`ring_attn.ring.attention.ring_attn_varlen_func` takes the real global ``cu_seqlens`` and masks
    the padding itself.
    """
    rank, world = _group_rank_world(group)
    return varlen_shard_for_rank(x, cu_seqlens, rank, world, dim, layout, pad_value)


def unshard_varlen(x_local: torch.Tensor, cu_seqlens, dim: int = 0, group=None,
                   layout: str = "zigzag") -> torch.Tensor:
    """Gather packed shards from every rank of ``group`` and restore global order, dropping padding
    (collective; not differentiable). Returns ``[cu_seqlens[-1], ...]`` along ``dim``. Raises on every rank
    when the ranks pass different shapes, dtypes, ``dim``, ``layout`` or ``cu_seqlens`` (one small all_gather
    first)."""
    import torch.distributed as dist

    _rank, world = _group_rank_world(group)
    try:
        if not isinstance(x_local, torch.Tensor):
            raise TypeError(f"x_local must be a torch.Tensor, got {type(x_local).__name__}")
        dim = _dim(x_local, dim)
        check_layout(layout)
        cu = _cu_list(cu_seqlens)
        failed = None
    except (TypeError, ValueError) as exc:
        failed = exc
    _agree_before_gather("unshard_varlen", group, x_local,
                         lambda: _gather_signature(x_local, dim, None, cu, layout), failed)
    x_local = x_local.contiguous()
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local, group=group)
    return varlen_unshard_from_shards(parts, cu_seqlens, dim, layout)
