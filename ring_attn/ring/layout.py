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

The same permutation shards anything indexed by token (hidden states, positions for RoPE, labels), so apply
:func:`shard` to each of them, or use :func:`shard_positions` to get a rank's global positions directly.

Packed (varlen) sequences are sharded *per sequence*: every sequence of length ``L`` is split by the layout
as above (so ``L`` must be divisible by ``W``, or ``2W`` for zigzag) and rank ``r`` holds its parts of every
sequence, packed in the same order; its local ``cu_seqlens`` are the global ones divided by ``W``.

Pure functions (``*_for_rank``, ``*_index``, ``*_positions``) take ``rank``/``world_size`` explicitly and
need no process group; :func:`shard` / :func:`unshard` and the varlen pair read them from ``group``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = [
    "LAYOUTS",
    "check_layout",
    "check_divisible",
    "shard_index",
    "shard_positions",
    "shard_for_rank",
    "unshard_from_shards",
    "shard",
    "unshard",
    "check_varlen_divisible",
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
    """Global positions of ``rank``'s tokens (for RoPE): int64 ``[seqlen // world_size]``, ``offset`` added
    (e.g. the position of the first token when a sequence continues a cache)."""
    return shard_index(seqlen, rank, world_size, layout, device) + offset


def _dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard_for_rank(x: torch.Tensor, rank: int, world_size: int, dim: int = 1,
                   layout: str = "zigzag") -> torch.Tensor:
    """``rank``'s shard of the global tensor ``x`` along ``dim`` (a new contiguous tensor; same dtype)."""
    dim = _dim(x, dim)
    idx = shard_index(x.shape[dim], rank, world_size, layout, x.device)
    return x.index_select(dim, idx)


def _inverse_perm(seqlen: int, world_size: int, layout: str, device) -> torch.Tensor:
    """Concatenating the shards of ranks 0..W-1 puts global token ``perm[j]`` at position ``j``;
    this returns ``inv`` with ``gathered.index_select(dim, inv)`` = the global tensor."""
    perm = torch.cat([shard_index(seqlen, r, world_size, layout, device) for r in range(world_size)])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(seqlen, device=device)
    return inv


def unshard_from_shards(shards: Sequence[torch.Tensor], dim: int = 1, layout: str = "zigzag") -> torch.Tensor:
    """Inverse of :func:`shard_for_rank`: ``shards[r]`` is rank ``r``'s shard; returns the global tensor."""
    check_layout(layout)
    if len(shards) == 0:
        raise ValueError("shards must hold one tensor per rank, got an empty sequence")
    dim = _dim(shards[0], dim)
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"every rank's shard must have one shape; got {sorted(shapes)}")
    gathered = torch.cat(list(shards), dim=dim)
    return gathered.index_select(dim, _inverse_perm(gathered.shape[dim], len(shards), layout, gathered.device))


def _group_rank_world(group) -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized; call torch.distributed.init_process_group "
                           "first, or use shard_for_rank / unshard_from_shards")
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: torch.Tensor, dim: int = 1, group=None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of the global tensor ``x`` (identical on every rank of ``group``).

    Args:
        x: any tensor whose ``dim`` is the token dim, e.g. q/k/v ``[b, s, h, d]`` (``dim=1``), positions or
            labels ``[b, s]`` (``dim=1``) or ``[s]`` (``dim=0``).
        dim: the token dim.
        group: process group (default: the world).
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"``.

    Returns:
        ``x`` with ``x.shape[dim] // W`` tokens along ``dim`` (a copy), same dtype and device. No communication.

    Raises:
        ValueError: the layout cannot split ``x.shape[dim]`` over the group (the message says which padding
            fixes it), or an unknown layout.
    """
    rank, world = _group_rank_world(group)
    return shard_for_rank(x, rank, world, dim, layout)


def unshard(x_local: torch.Tensor, dim: int = 1, group=None, layout: str = "zigzag") -> torch.Tensor:
    """Gather every rank's shard and undo the layout's permutation: the global tensor, on every rank.

    ``x_local`` must have the same shape, dtype and device on every rank (collective: all ranks of ``group``
    must call it). Not differentiable. Returns a tensor with ``W · x_local.shape[dim]`` tokens along ``dim``.
    """
    import torch.distributed as dist

    rank, world = _group_rank_world(group)
    dim = _dim(x_local, dim)
    check_layout(layout)
    x_local = x_local.contiguous()
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local, group=group)
    return unshard_from_shards(parts, dim, layout)


# ---------------------------------------------------------------------------------------------------------
# Packed (varlen) sequences: each sequence sharded by the layout.


def _cu_list(cu_seqlens) -> list[int]:
    vals = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    if len(vals) < 2 or vals[0] != 0 or any(b < a for a, b in zip(vals[:-1], vals[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and have n_seqs + 1 >= 2 entries; "
                         f"got {vals[:8]}{'...' if len(vals) > 8 else ''}")
    return [int(v) for v in vals]


def check_varlen_divisible(cu_seqlens, world_size: int, layout: str) -> list[int]:
    """Validate that ``layout`` can split every sequence; returns the global cu_seqlens as a list."""
    vals = _cu_list(cu_seqlens)
    for i, (a, b) in enumerate(zip(vals[:-1], vals[1:])):
        check_divisible(b - a, world_size, layout, what=f"sequence {i} (cu_seqlens[{i}:{i + 2}] = [{a}, {b}]) "
                        f"has length")
    return vals


def varlen_local_cu_seqlens(cu_seqlens: torch.Tensor, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """Local ``cu_seqlens`` of every rank (the same on all ranks): the global ones divided by ``world_size``;
    int32 on the device of ``cu_seqlens``. Raises ``ValueError`` when a sequence cannot be split."""
    check_layout(layout)
    vals = check_varlen_divisible(cu_seqlens, world_size, layout)
    device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else None
    return torch.tensor([v // world_size for v in vals], dtype=torch.int32, device=device)


def varlen_shard_index(cu_seqlens, rank: int, world_size: int, layout: str = "zigzag",
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """Packed global token indices held by ``rank``, in local order: int64 ``[total // world_size]``."""
    check_layout(layout)
    _check_world(rank, world_size)
    vals = check_varlen_divisible(cu_seqlens, world_size, layout)
    parts = [a + shard_index(b - a, rank, world_size, layout, device) for a, b in zip(vals[:-1], vals[1:])]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


def varlen_positions(cu_seqlens, rank: int, world_size: int, layout: str = "zigzag",
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """Position of each of ``rank``'s packed tokens within its own sequence (restarting at 0 for every
    sequence; what RoPE needs): int64 ``[total // world_size]``."""
    check_layout(layout)
    _check_world(rank, world_size)
    vals = check_varlen_divisible(cu_seqlens, world_size, layout)
    parts = [shard_index(b - a, rank, world_size, layout, device) for a, b in zip(vals[:-1], vals[1:])]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


def varlen_shard_for_rank(x: torch.Tensor, cu_seqlens, rank: int, world_size: int, dim: int = 0,
                          layout: str = "zigzag") -> torch.Tensor:
    """``rank``'s shard of packed ``x`` (token dim ``dim``, split by global ``cu_seqlens``)."""
    dim = _dim(x, dim)
    idx = varlen_shard_index(cu_seqlens, rank, world_size, layout, x.device)
    if idx.numel() * world_size != x.shape[dim]:
        raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim} but cu_seqlens ends at "
                         f"{idx.numel() * world_size}")
    return x.index_select(dim, idx)


def varlen_unshard_from_shards(shards: Sequence[torch.Tensor], cu_seqlens, dim: int = 0,
                               layout: str = "zigzag") -> torch.Tensor:
    """Inverse of :func:`varlen_shard_for_rank` given every rank's shard."""
    if len(shards) == 0:
        raise ValueError("shards must hold one tensor per rank, got an empty sequence")
    world = len(shards)
    dim = _dim(shards[0], dim)
    gathered = torch.cat(list(shards), dim=dim)
    perm = torch.cat([varlen_shard_index(cu_seqlens, r, world, layout, gathered.device) for r in range(world)])
    if perm.numel() != gathered.shape[dim]:
        raise ValueError(f"shards hold {gathered.shape[dim]} tokens but cu_seqlens ends at {perm.numel()}")
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=gathered.device)
    return gathered.index_select(dim, inv)


def shard_varlen(x: torch.Tensor, cu_seqlens, dim: int = 0, group=None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of packed ``x`` ``[total, ...]``: every sequence of the global ``cu_seqlens`` split
    by ``layout``. Pair with :func:`varlen_local_cu_seqlens` for the local boundaries.

    Raises ``ValueError`` when a sequence's length is not a multiple of ``W`` (``2W`` for zigzag), naming the
    sequence and the padding that fixes it.
    """
    rank, world = _group_rank_world(group)
    return varlen_shard_for_rank(x, cu_seqlens, rank, world, dim, layout)


def unshard_varlen(x_local: torch.Tensor, cu_seqlens, dim: int = 0, group=None,
                   layout: str = "zigzag") -> torch.Tensor:
    """Gather packed shards from every rank of ``group`` and restore global order (collective; not
    differentiable)."""
    import torch.distributed as dist

    _rank, world = _group_rank_world(group)
    x_local = x_local.contiguous()
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local, group=group)
    return varlen_unshard_from_shards(parts, cu_seqlens, dim, layout)
