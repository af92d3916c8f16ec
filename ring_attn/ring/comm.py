"""RingComm: point-to-point exchange around a ring of ranks, overlapped with compute.

Every exchange sends one tensor to the next rank of the group and receives one from the previous rank, with
``torch.distributed.batch_isend_irecv`` (both directions posted together, so a ring of any size, including
2, cannot deadlock). Group ranks are mapped to global ranks with ``dist.get_global_rank``, so any process
group works: the world, a subgroup, or one dimension of a ``DeviceMesh``.

Streams (CUDA): posts run on a dedicated communication stream that first waits (through an event, on the
GPU) for the compute stream, so the send buffer holds its data and the receive buffer's previous readers are
done; :meth:`RingComm.wait` makes the compute stream wait for the transfer, again on the GPU. The host never
blocks inside the loop. On CPU (gloo), ``wait`` blocks the host until the transfer is done.

World size 1: nothing is sent; :meth:`exchange` returns ``None`` and callers use their own buffer.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
import torch.distributed as dist

if dist.is_available():
    # Imported now, while (usually) no process group exists yet: this torch module binds ``group.WORLD`` as a
    # default argument when it is first imported, and torch imports it lazily (through torch._dynamo) on the
    # first custom-op call, which is ring_attn's first attention call, after init_process_group. Bound then,
    # it keeps the default group alive after destroy_process_group, so gloo's worker threads outlive it and
    # are torn down during interpreter exit, where one still releasing a tensor aborts the process
    # ("terminate called without an active exception"). tests/test_ring_teardown.py checks the threads end.
    try:
        import torch.distributed.nn.functional  # noqa: F401
    except Exception:  # noqa: BLE001 - a build without parts of torch.distributed: nothing to pin it then either
        pass

__all__ = ["RingComm", "all_gather_ints", "weak_group"]


def weak_group(group, owner: str):
    """A callable that returns ``group`` (``None`` stays ``None``: the default group) while the group exists,
    without keeping it alive, and raises RuntimeError naming ``owner`` once it has been destroyed. What
    ring_attn objects that outlive a call (a RingComm in an autograd graph, an active HF patch) hold, so
    that ``destroy_process_group`` really ends the group."""
    if group is None:
        return lambda: None
    ref = weakref.ref(group)

    def get():
        g = ref()
        if g is None:
            raise RuntimeError(f"{owner}: its process group no longer exists (destroy_process_group was called)")
        return g

    return get


class RingComm:
    """Send to rank ``r + 1``, receive from rank ``r - 1`` (group ranks), possibly several exchanges in flight.

    Args:
        group: the process group (``None``: the default group).
        device: device of the tensors exchanged (selects the CUDA stream logic).
        loopback: with a one-rank group, still send to itself (tests the P2P and stream path on one GPU);
            by default a one-rank ring does no communication.

    Usage::

        comm = RingComm(group, q.device)
        h = comm.exchange([k, v], [k_next, v_next])   # posts; returns at once
        ...compute on k, v...
        comm.wait(h)                                   # k_next, v_next are ready for the compute stream

    Attributes: ``rank``, ``world_size`` (within the group), ``send_peer``/``recv_peer`` (global ranks),
    ``bytes_sent`` (running total, for benchmarks).
    """

    def __init__(self, group=None, device: Optional[torch.device] = None, loopback: bool = False):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group")
        # held weakly: a RingComm lives as long as the autograd graph that used it (a `loss` kept for logging
        # keeps it), and must not keep a destroyed group's threads alive with it
        self._group = weak_group(group, "RingComm")
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if self.rank < 0:
            raise RuntimeError("this process is not a member of the process group passed to the ring")
        pg = group if group is not None else dist.group.WORLD
        self.send_peer = dist.get_global_rank(pg, (self.rank + 1) % self.world_size)
        self.recv_peer = dist.get_global_rank(pg, (self.rank - 1) % self.world_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._cuda = self.device.type == "cuda"
        self._active = self.world_size > 1 or loopback
        self._stream = torch.cuda.Stream(self.device) if self._cuda and self._active else None
        self._pending: list = []
        self.bytes_sent = 0

    @property
    def group(self):
        """The process group (``None``: the default group). RuntimeError once the group has been destroyed."""
        return self._group()

    def exchange(self, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor], tag: int = 0):
        """Post ``sends[i]`` → next rank and ``recvs[i]`` ← previous rank for every ``i``, all in one
        ``batch_isend_irecv``. Tensors must be contiguous, with the same shapes and dtypes on every rank.
        Returns a handle for :meth:`wait` (``None`` for a one-rank ring: nothing is sent). Until that wait, do
        not write ``sends`` or read ``recvs``."""
        if len(sends) != len(recvs):
            raise ValueError(f"exchange needs one receive buffer per send, got {len(sends)} and {len(recvs)}")
        if not self._active:
            return None
        ops, group = [], self.group
        for i, (s, r) in enumerate(zip(sends, recvs)):
            if s.shape != r.shape or s.dtype != r.dtype:
                raise ValueError(f"exchange {i}: send {tuple(s.shape)} {s.dtype} != recv {tuple(r.shape)} {r.dtype}")
            ops.append(dist.P2POp(dist.isend, s, self.send_peer, group, tag))
            ops.append(dist.P2POp(dist.irecv, r, self.recv_peer, group, tag))
        if self._cuda:
            # the comm stream starts after everything queued so far on the compute stream (an event, on the GPU)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                works = dist.batch_isend_irecv(ops)
        else:
            works = dist.batch_isend_irecv(ops)
        self.bytes_sent += sum(s.numel() * s.element_size() for s in sends)
        handle = list(works)
        self._pending.append(handle)
        return handle

    def wait(self, handle=None) -> None:
        """Complete one exchange (``handle`` from :meth:`exchange`) or, with ``None``, every pending one. On
        CUDA the compute stream waits for it on the GPU (no host sync); on CPU the host waits."""
        if handle is None:
            handles, self._pending = self._pending, []
        else:
            handles = [handle]
            self._pending = [h for h in self._pending if h is not handle]
        works = [w for h in handles for w in h]
        if not works:
            return
        if self._cuda:
            with torch.cuda.stream(self._stream):
                for w in works:
                    w.wait()  # the comm stream waits for the NCCL stream; the host does not block
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        else:
            for w in works:
                w.wait()


def all_gather_ints(pg, backend: str, device, values: list[int],
                    failed: Optional[BaseException] = None) -> list[list[int]]:
    """Every rank's ``values`` (int64, the same count on every rank), in rank order: one small all-gather
    (on ``device`` under NCCL, on the CPU under gloo) and one host read. ``failed``: this rank's own checks
    raised it; the rank still joins the exchange (its ``values`` tell the others so), then raises it, so that
    no other rank waits for it."""
    dev = device if backend == "nccl" else torch.device("cpu")
    mine = torch.tensor(values, dtype=torch.int64, device=dev)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(parts, mine, group=pg)
    if failed is not None:
        raise failed
    return [p.tolist() for p in parts]
