"""Ring attention: exact attention over a sequence sharded across the ranks of a process group.

Rank ``r`` of a ``W``-rank group holds its shard of q, k, v (layout in :mod:`ring_attn.ring.layout`). The K/V
shards travel around the ring: at step ``i`` rank ``r`` holds the K/V of rank ``src = (r - i) mod W``, and
the exchange for step ``i + 1`` (send to ``r + 1``, receive from ``r - 1``) is posted *before* step ``i``'s
attention and completed after it, so the transfer hides behind compute. Two receive buffers are allocated
once per call and alternate (step 0 computes on the caller's own K/V).

Forward. Each (query shard, key shard) pair is classified once, per layout, into pieces that are fully
visible, causal (a diagonal with an explicit offset), or skipped, so no step computes work the mask
discards (``_plan``). Every piece after the first is merged into the fp32 running ``(out, lse)`` by LSE
weighting, in the attention kernel's epilogue (``attention_block_forward(..., out=, lse=)``)::

    lse_new = log(exp(lse_acc) + exp(lse_blk))
    out_acc = out_acc · exp(lse_acc − lse_new) + out_blk · exp(lse_blk − lse_new)

(rows that have seen nothing keep ``lse = −inf`` and weight 0), so nothing is rounded to 16 bits between
steps. The output is cast to the input dtype once, at the end.

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

Varlen: every sequence is sharded by the layout (:func:`ring_attn.ring.layout.shard_varlen`), so the same
classification applies per sequence; halves of sequences are addressed with
:class:`ring_attn._contracts.VarlenSeqs` without copying.

GQA: K/V travel with ``h_kv`` heads, never repeated. Peak memory per rank: q, k, v, out, the fp32
accumulators and two K/V receive buffers (plus, in backward, two fp32 dK/dV buffers and one dK/dV block
buffer): O(b · s_local · h · d), independent of ``W``.

World size 1: after the same checks, the call is the single-device op (``flash_attn_func`` /
``flash_attn_varlen_func``): no communication and no fp32 round trips, so a one-rank ring costs what the
plain kernel costs.

Consistency: the first time a rank sees a call signature (shapes, dtypes, causal, layout, scale, varlen
boundaries) on a group, every rank exchanges a fixed-size signature with one ``all_gather``; if any rank
differs, every rank raises ``ValueError`` listing each rank's inputs (no mismatched P2P, no hang). A rank
that switches to a signature its peers have not switched to can't be detected without a collective on
every call: it surfaces as the process group's timeout error. ``validate=False`` skips the check.
"""
from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from ring_attn._contracts import VarlenSeqs, check_cu_seqlens_form, check_qkv, check_scale
from ring_attn.ops.attention import (
    attention_block_backward,
    attention_block_forward,
    attention_delta,
    flash_attn_func,
    flash_attn_varlen_func,
)
from ring_attn.ring.comm import RingComm
from ring_attn.ring.layout import LAYOUTS, check_divisible, check_layout, check_varlen_divisible

__all__ = ["ring_attn_func", "ring_attn_varlen_func"]

_ALL = slice(None)


# ---------------------------------------------------------------------------------------------------------
# The plan: which pieces of (local queries) x (visiting keys) are computed, per layout.


class _Piece(NamedTuple):
    q_part: str  # "all" | "second" (second half of the local rows / of every sequence)
    k_part: str  # "all" | "first"
    causal: bool
    offset: Optional[int]


def _plan(layout: str, causal: bool, rank: int, src: int) -> list[_Piece]:
    """Pieces of the (rank's queries, src's keys) pair; empty when nothing is visible."""
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


class _Dense:
    """Addresses pieces of dense ``[b, s_local, h, d]`` shards by slicing the sequence dim."""

    seqs = None

    def __init__(self, s_local: int):
        self.half = s_local // 2

    def q(self, part):  # slice of q-like [b, s, h, d] tensors
        return (_ALL, slice(self.half, None)) if part == "second" else (_ALL, _ALL)

    def k(self, part):
        return (_ALL, slice(None, self.half)) if part == "first" else (_ALL, _ALL)

    def lse(self, part):  # slice of [b, h, s]
        return (_ALL, _ALL, slice(self.half, None)) if part == "second" else (_ALL, _ALL, _ALL)

    def piece_seqs(self, piece):
        return None


class _Packed:
    """Addresses pieces of packed ``[t_local, h, d]`` shards with VarlenSeqs (no copies)."""

    def __init__(self, local_cu: list[int], device):
        starts = torch.tensor(local_cu[:-1], dtype=torch.int32, device=device)
        lens = torch.tensor([b - a for a, b in zip(local_cu[:-1], local_cu[1:])], dtype=torch.int32,
                            device=device)
        half = lens // 2
        max_len = max([b - a for a, b in zip(local_cu[:-1], local_cu[1:])] + [0])
        self._seqs = {
            ("all", "all"): VarlenSeqs(starts, lens, starts, lens, max_len, max_len, True),
            ("all", "first"): VarlenSeqs(starts, lens, starts, half, max_len, max_len // 2, True),
            ("second", "all"): VarlenSeqs(starts + half, half, starts, lens, max_len // 2, max_len, False),
        }

    def q(self, part):
        return (_ALL,)

    k = q

    def lse(self, part):
        return (_ALL, _ALL)

    def piece_seqs(self, piece):
        return self._seqs[(piece.q_part, piece.k_part)]


# ---------------------------------------------------------------------------------------------------------
# Forward and backward rings (no autograd here).


def _ring_forward(q, k, v, scale, causal, layout, comm: RingComm, addr):
    world, rank = comm.world_size, comm.rank
    bufs = [(torch.empty_like(k), torch.empty_like(v)) for _ in range(min(2, world - 1))]
    out_acc = lse_acc = None
    cur = (k, v)
    for step in range(world):
        src = (rank - step) % world
        handle = None
        if step + 1 < world:
            nxt = bufs[step % 2]
            handle = comm.exchange(list(cur), list(nxt))
        kk, vv = cur
        for piece in _plan(layout, causal, rank, src):
            qs, ks = addr.q(piece.q_part), addr.k(piece.k_part)
            if out_acc is None:  # step 0 is always the whole (diagonal or full) block
                out_acc, lse_acc = attention_block_forward(q[qs], kk[ks], vv[ks], scale, piece.causal,
                                                           piece.offset, addr.piece_seqs(piece),
                                                           out_dtype=torch.float32)
            else:  # merged into the running fp32 result in the kernel's epilogue
                attention_block_forward(q[qs], kk[ks], vv[ks], scale, piece.causal, piece.offset,
                                        addr.piece_seqs(piece), out=out_acc[qs],
                                        lse=lse_acc[addr.lse(piece.q_part)])
        if handle is not None:
            comm.wait(handle)
            cur = nxt
    return out_acc, lse_acc


def _ring_backward(dout, q, k, v, out, lse, dlse, scale, causal, layout, comm: RingComm, addr):
    world, rank = comm.world_size, comm.rank
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
        for piece in _plan(layout, causal, rank, src):
            qs, ks, ls = addr.q(piece.q_part), addr.k(piece.k_part), addr.lse(piece.q_part)
            attention_block_backward(dout[qs], q[qs], kk[ks], vv[ks], lse[ls], delta[ls], dq[qs], dk_t[ks],
                                     dv_t[ks], scale, piece.causal, piece.offset, addr.piece_seqs(piece),
                                     accumulate=True)
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
_validated: set = set()
_comms: dict = {}


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring attention needs torch.distributed: call torch.distributed.init_process_group "
                           "first (a one-rank group is fine)")
    pg = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(pg)
    if rank < 0:
        raise ValueError("group: this process is not a member of the process group passed to the ring")
    return pg, rank, dist.get_world_size(pg)


def _check_backend(pg, device):
    backend = str(dist.get_backend(pg)).lower()
    if device.type == "cuda" and backend == "gloo":
        raise ValueError("q is a CUDA tensor but the process group uses gloo, which cannot send CUDA tensors "
                         "point-to-point; use an NCCL group (or CPU tensors with gloo)")
    if device.type == "cpu" and backend == "nccl":
        raise ValueError("q is a CPU tensor but the process group uses NCCL; move q, k, v to this rank's GPU "
                         "(or use a gloo group for CPU tensors)")
    return backend


def _comm(pg, device) -> RingComm:
    key = (id(pg), str(device))
    comm = _comms.get(key)
    if comm is None or comm.group is not pg:
        comm = _comms[key] = RingComm(pg, device)
    return comm


def _signature(kind, q, k, v, causal, layout, scale, extra: list[int]) -> list[int]:
    def dims(x):
        return list(x.shape) + [-1] * (4 - x.dim())

    sig = [0x52494E47, kind] + dims(q) + dims(k) + dims(v)
    sig += [_DTYPE_CODES[q.dtype], int(bool(causal)), LAYOUTS.index(layout),
            struct.unpack("<q", struct.pack("<d", scale))[0]] + extra
    return (sig + [0] * _SIG_LEN)[:_SIG_LEN]


def _describe(sig: list[int]) -> str:
    def shape(xs):
        return "[" + ", ".join(str(x) for x in xs if x >= 0) + "]"

    dtype = {c: str(d).replace("torch.", "") for d, c in _DTYPE_CODES.items()}.get(sig[14], "?")
    scale = struct.unpack("<d", struct.pack("<q", sig[17]))[0]
    text = (f"q {shape(sig[2:6])}, k {shape(sig[6:10])}, v {shape(sig[10:14])}, {dtype}, causal={bool(sig[15])}, "
            f"layout={LAYOUTS[sig[16]] if 0 <= sig[16] < len(LAYOUTS) else '?'}, softmax_scale={scale:.6g}")
    if sig[1] == 1:
        text += f", {sig[18]} sequences (cu_seqlens digest {sig[19] & 0xFFFFFFFF:08x})"
    return text


def _validate_across_ranks(name, pg, backend, device, sig: list[int]) -> None:
    key = (id(pg), tuple(sig))
    if key in _validated:
        return
    dev = device if backend == "nccl" else torch.device("cpu")
    mine = torch.tensor(sig, dtype=torch.int64, device=dev)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(parts, mine, group=pg)
    sigs = [p.tolist() for p in parts]
    if any(s != sigs[0] for s in sigs):
        lines = "; ".join(f"rank {i}: {_describe(s)}" for i, s in enumerate(sigs))
        raise ValueError(f"{name}: the ranks of the process group passed inconsistent inputs (every rank must "
                         f"pass the same shapes, dtype, causal, layout and softmax_scale); {lines}")
    _validated.add(key)


def _check_common(name, q, k, v, softmax_scale, layout, group, packed):
    _h_q, _h_kv, d = check_qkv(q, k, v, packed=packed)
    scale = check_scale(softmax_scale, d)
    check_layout(layout)
    pg, rank, world = _group_info(group)
    backend = _check_backend(pg, q.device)
    tok = 0 if packed else 1
    if k.shape[tok] != q.shape[tok]:
        raise ValueError(f"{name}: q and k must hold the same number of local tokens (each rank's shard of one "
                         f"sequence); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    return scale, pg, rank, world, backend


# ---------------------------------------------------------------------------------------------------------
# Autograd


class _RingAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, layout, comm, addr):
        k, v = k.contiguous(), v.contiguous()  # sent as-is
        out_acc, lse = _ring_forward(q, k, v, scale, causal, layout, comm, addr)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, causal, layout, comm, addr)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal, layout, comm, addr = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, dlse, scale, causal, layout, comm, addr)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_attn_func(q, k, v, causal: bool = False, softmax_scale: Optional[float] = None, group=None,
                   layout: str = "zigzag", return_lse: bool = False, validate: bool = True):
    """Exact attention over a sequence sharded across the ranks of ``group``, with autograd.

    Every rank of ``group`` calls this with its shard (collective). The global sequence of ``S`` tokens is
    split by ``layout`` (see :mod:`ring_attn.ring.layout`; :func:`ring_attn.shard` makes the shards).

    Args:
        q: this rank's queries ``[batch, s_local, heads_q, head_dim]``, fp16/bf16/fp32; CUDA with an NCCL
            group, CPU with gloo.
        k, v: this rank's keys/values ``[batch, s_local, heads_kv, head_dim]``, same dtype/device;
            ``heads_q % heads_kv == 0`` (GQA/MQA: K/V circulate with ``heads_kv`` heads).
        causal: causal mask over *global* positions (query at global position ``i`` sees keys ``j <= i``).
        softmax_scale: default ``1 / sqrt(head_dim)``.
        group: process group (default: the world); any subgroup or ``DeviceMesh`` dimension works.
        layout: ``"zigzag"`` (default; ``S % (2W) == 0``), ``"contiguous"`` or ``"striped"`` (``S % W == 0``).
        return_lse: also return the log-sum-exp (differentiable).
        validate: the first time a call signature is seen on ``group``, check with one small ``all_gather``
            that every rank passes the same shapes/dtype/causal/layout/scale (else every rank raises).

    Returns:
        ``out`` ``[batch, s_local, heads_q, head_dim]``: this rank's output shard in the input dtype; with
        ``return_lse`` also ``lse`` float32 ``[batch, heads_q, s_local]`` (natural log, over the whole
        sequence). Backward gives this rank's dq, dk, dv (input dtype).

    Raises:
        TypeError / ValueError naming the argument, before any communication: bad shapes, dtypes, head counts,
        layout; ``s_local`` odd with zigzag; a CUDA tensor with a gloo group or a CPU tensor with NCCL.
        ValueError on every rank when ranks pass inconsistent inputs (``validate=True``).
        RuntimeError when torch.distributed is not initialized.
    """
    scale, pg, rank, world, backend = _check_common("ring_attn_func", q, k, v, softmax_scale, layout, group,
                                                    packed=False)
    s_local = q.shape[1]
    if layout == "zigzag" and s_local % 2:
        raise ValueError(f"zigzag layout needs an even number of local tokens (global length a multiple of "
                         f"2 * world_size = {2 * world}); q has s_local = {s_local} ({tuple(q.shape)}); pad the "
                         f"global sequence to a multiple of {2 * world}")
    if validate:
        sig = _signature(0, q, k, v, causal, layout, scale, [])
        _validate_across_ranks("ring_attn_func", pg, backend, q.device, sig)
    if world == 1:  # the whole sequence is local: the single-device op, with no fp32 round trips
        return flash_attn_func(q, k, v, causal=causal, softmax_scale=scale, return_lse=return_lse)
    out, lse = _RingAttnFunction.apply(q, k, v, scale, bool(causal), layout, _comm(pg, q.device),
                                       _Dense(s_local))
    return (out, lse) if return_lse else out


def ring_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen: int, causal: bool = False,
                          softmax_scale: Optional[float] = None, group=None, layout: str = "zigzag",
                          return_lse: bool = False, validate: bool = True):
    """Ring attention over packed sequences of different lengths, each sharded by ``layout``.

    Args:
        q: this rank's packed queries ``[total // W, heads_q, head_dim]``: for every sequence of the global
            ``cu_seqlens``, its ``L / W`` local tokens (as made by :func:`ring_attn.ring.layout.shard_varlen`),
            packed in sequence order.
        k, v: ``[total // W, heads_kv, head_dim]``, sharded the same way.
        cu_seqlens: *global* sequence boundaries, int32 ``[n_seqs + 1]`` (the same on every rank); every
            length must be a multiple of ``W`` (``2W`` for zigzag). Read once on the host.
        max_seqlen: the longest global sequence (an upper bound is fine).
        causal, softmax_scale, group, layout, validate: as in :func:`ring_attn_func`; causal is per sequence.
        return_lse: also return lse float32 ``[heads_q, total // W]``.

    Returns:
        ``out`` ``[total // W, heads_q, head_dim]`` in the input dtype (and lse with ``return_lse``).

    Raises:
        as :func:`ring_attn_func`, plus TypeError/ValueError for malformed ``cu_seqlens``, a sequence the
        layout cannot split (naming it and the padding that fixes it), or ``q`` whose token count is not
        ``cu_seqlens[-1] / W``.
    """
    name = "ring_attn_varlen_func"
    scale, pg, rank, world, backend = _check_common(name, q, k, v, softmax_scale, layout, group, packed=True)
    check_cu_seqlens_form("cu_seqlens", cu_seqlens)
    cu = check_varlen_divisible(cu_seqlens, world, layout)
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < max(lens):
        raise ValueError(f"max_seqlen must be an int >= the longest sequence ({max(lens)}), got {max_seqlen!r}")
    if cu[-1] != q.shape[0] * world:
        raise ValueError(f"{name}: cu_seqlens[-1] = {cu[-1]} global tokens means {cu[-1] / world:g} local tokens "
                         f"on each of {world} ranks, but q has {q.shape[0]} ({tuple(q.shape)})")
    local_cu = [c // world for c in cu]
    if validate:
        digest = int.from_bytes(hashlib.blake2b(struct.pack(f"<{len(cu)}q", *cu), digest_size=8).digest(),
                                "little", signed=True)
        sig = _signature(1, q, k, v, causal, layout, scale, [len(lens), digest])
        _validate_across_ranks(name, pg, backend, q.device, sig)
    if world == 1:  # the whole sequence is local: the single-device op, with no fp32 round trips
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal,
                                      softmax_scale=scale, return_lse=return_lse)
    out, lse = _RingAttnFunction.apply(q, k, v, scale, bool(causal), layout, _comm(pg, q.device),
                                       _Packed(local_cu, q.device))
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------------
# Lower-level pieces under stable public names, for benchmarks/bench_ring.py (it times one ring step and its
# compute alone, without autograd or argument checks). Not part of the package's public API.
ring_forward = _ring_forward
ring_backward = _ring_backward
plan = _plan
DenseAddress = _Dense
PackedAddress = _Packed
comm_for = _comm
