"""All-gather context parallelism over packed sequences: ring-flash-attn's ``llama3_flash_attn_varlen_*``.

The scheme of the Llama 3 paper's context parallelism: the packed token stream ``[total, heads, head_dim]``
is cut into ``W`` contiguous pieces of ``total / W`` tokens, one per rank, so a sequence may span ranks.
Each rank all-gathers K/V (``heads_k_stride`` K/V heads at a time, to bound the gathered buffer), attends its
own queries to the keys of their sequences, and in the backward reduce-scatters the K/V gradients. Where the
ring (:mod:`ring_attn.ring.attention`) overlaps ``W`` point-to-point steps with attention, this does one
collective per head group; its buffers hold every rank's K/V of ``heads_k_stride`` heads.

:func:`prepare_cu_seqlens` turns the global ``cu_seqlens`` into this rank's ``(cu_seqlens_q, cu_seqlens_k,
max_seqlen_q, max_seqlen_k, local_k_slice)``; :func:`allgather_attn_varlen_func` takes them. Queries are the
last rows of their keys' range (causal: keys up to this rank's last token; non-causal: to the end of the last
sequence), so the kernels' bottom-right causal alignment gives every query its true global position in its
sequence: causal attention, causal sliding windows and causal ALiBi are exact. Non-causal attention is exact
without windows or ALiBi (positions do not matter there); non-causal windows and ALiBi are refused (a query
block cut from the middle of a sequence is not bottom-right aligned with its keys).

Gradients: dK/dV are accumulated in fp32 and reduce-scattered in fp32 (ring-flash-attn reduces in the input
dtype), then rounded once. Deterministic: fixed kernels and a fixed collective schedule.
"""
from __future__ import annotations

import bisect
import hashlib

import torch
import torch.distributed as dist

from ring_attn._contracts import VarlenSeqs, check_alibi_slopes, check_cu_seqlens_form, check_qkv, check_scale
from ring_attn.ops.attention_block import attention_block_backward, attention_block_forward, attention_delta
from ring_attn.ring.attention import (FAILED, check_backend, check_flash_args, group_info, named_error,
                                      raise_with_the_group, validate_across_ranks, validate_same_slopes)

__all__ = ["prepare_cu_seqlens", "allgather_attn_varlen_func"]

_NAME = "llama3_flash_attn_varlen_func"
# torch >= 2.12 names it all_gather_single (all_gather_into_tensor warns there); the GPU image's 2.11 has the old name
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_SIG_KIND = 0x414C4C47  # "ALLG": a signature slot no ring call uses
_SIG_LEN = 12  # _SIG_KIND and the 11 codes of _check_local's sig


def prepare_cu_seqlens(cu_seqlens: torch.Tensor, causal: bool, rank: int, world_size: int):
    """This rank's view of packed sequences cut into ``world_size`` contiguous pieces.

    Args:
        cu_seqlens: int32/int64 ``[n_seqs + 1]``, the *global* boundaries (0 first, non-decreasing, the total
            divisible by ``world_size``).
        causal: with causal attention the keys end at this rank's last token; otherwise at the end of the
            last sequence this rank's tokens belong to.
        rank, world_size: this rank and the number of ranks.

    Returns:
        ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice)``: int32 tensors on
        ``cu_seqlens``'s device (local query boundaries, from 0 to ``total / world_size``; key boundaries within
        ``local_k_slice``), Python ints, and the ``slice`` of the gathered ``[total, ...]`` K/V these keys are.

    Raises:
        TypeError / ValueError naming the argument.
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or \
            cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be a 1-D int32/int64 tensor of length n_seqs + 1 >= 2, got "
                        f"{cu_seqlens!r:.80}")
    for name, val in (("rank", rank), ("world_size", world_size)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {val!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu}")
    total = cu[-1]
    if total % world_size:
        raise ValueError(f"cu_seqlens[-1] = {total} tokens cannot be cut into {world_size} equal pieces: pad the "
                         f"packed batch to a multiple of world_size")
    n = total // world_size
    lo, hi = rank * n, (rank + 1) * n
    # ring-flash-attn's boundaries, empty sequences included where it keeps them: from the first boundary at lo
    # (or the last one before it) through the first boundary at or past hi
    left = bisect.bisect_left(cu, lo)
    if cu[left] != lo:
        left -= 1
    right = bisect.bisect_left(cu, hi)
    bounds = cu[left:right + 1]
    first = bounds[0]  # start of the sequence holding this rank's first token
    last = hi if causal else bounds[-1]
    q_bounds = [0] + [c - lo for c in bounds[1:-1]] + [n]
    k_bounds = [0] + [c - first for c in bounds[1:-1]] + [last - first]
    dev = cu_seqlens.device
    cu_q = torch.tensor(q_bounds, dtype=torch.int32, device=dev)
    cu_k = torch.tensor(k_bounds, dtype=torch.int32, device=dev)
    max_q = max(b - a for a, b in zip(q_bounds[:-1], q_bounds[1:]))
    max_k = max(b - a for a, b in zip(k_bounds[:-1], k_bounds[1:]))
    return cu_q, cu_k, max_q, max_k, slice(first, last)


def _int(name, val) -> int:
    if isinstance(val, torch.Tensor) and val.numel() == 1 and not val.is_floating_point():
        val = int(val.item())
    if isinstance(val, bool) or not isinstance(val, int):
        raise TypeError(f"{_NAME}: {name} must be an int, got {val!r}")
    return val


_SIG_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # signature code -> dtype


def _describe(sig: list[int]) -> str:
    if sig[1] == FAILED:
        return "invalid arguments (raised on that rank)"
    dtype = str(_SIG_DTYPES[sig[5]]).replace("torch.", "") if 0 <= sig[5] < len(_SIG_DTYPES) else "?"
    return (f"local tokens {sig[1]}, heads q/kv {sig[2]}/{sig[3]}, head_dim {sig[4]}, dtype {dtype}, "
            f"causal={bool(sig[6])}, heads_k_stride={sig[7]}, window_size=({sig[8]}, {sig[9]}), "
            f"alibi_slopes={'given' if sig[10] else 'None'}, softmax_scale/softcap digest {sig[11] & 0xFFFF:04x}")


def _gather(buf: torch.Tensor, x: torch.Tensor, pg):
    """All-gather ``x`` ``[t, h, d]`` of every rank into ``buf`` ``[W * t, h, d]`` (async handle)."""
    return _all_gather(buf, x.contiguous(), group=pg, async_op=True)


def _reduce_scatter(local: torch.Tensor, full: torch.Tensor, pg, backend: str) -> None:
    """``local`` = this rank's rows of the sum over ranks of ``full`` ``[W * t, ...]`` (fp32)."""
    if backend == "gloo":  # gloo has no reduce-scatter: all-reduce, then keep this rank's rows
        dist.all_reduce(full, group=pg)
        t = local.shape[0]
        local.copy_(full[dist.get_rank(pg) * t:(dist.get_rank(pg) + 1) * t])
    else:
        dist.reduce_scatter_tensor(local, full, group=pg)


class _AllGatherVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seqs, stride, k_slice, scale, causal, window, softcap, alibi, pg, backend, world):
        t, h_q, d = q.shape
        h_kv = k.shape[1]
        group = h_q // h_kv
        out = torch.empty_like(q)
        lse = torch.empty((h_q, t), dtype=torch.float32, device=q.device)
        bufs = [torch.empty((2, world * t, stride, d), dtype=k.dtype, device=k.device) for _ in range(2)]
        pending = [_gather(bufs[0][0], k[:, :stride], pg), _gather(bufs[0][1], v[:, :stride], pg)]
        for n, i in enumerate(range(0, h_kv, stride)):
            for w in pending:
                w.wait()
            buf = bufs[n % 2]
            if i + stride < h_kv:  # the next head group's gather runs while this one attends
                nxt = bufs[(n + 1) % 2]
                pending = [_gather(nxt[0], k[:, i + stride:i + 2 * stride], pg),
                           _gather(nxt[1], v[:, i + stride:i + 2 * stride], pg)]
            qs = slice(i * group, (i + stride) * group)
            o_i, l_i = attention_block_forward(q[:, qs], buf[0][k_slice], buf[1][k_slice], scale, causal, None,
                                               seqs, window=window, softcap=softcap,
                                               alibi_slopes=None if alibi is None else alibi[..., qs])
            out[:, qs] = o_i
            lse[qs] = l_i
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (seqs, stride, k_slice, scale, causal, window, softcap, alibi, pg, backend, world)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        seqs, stride, k_slice, scale, causal, window, softcap, alibi, pg, backend, world = ctx.args
        t, h_q, d = q.shape
        h_kv = k.shape[1]
        group = h_q // h_kv
        delta = attention_delta(dout, out, dlse)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kv = torch.empty((2, world * t, stride, d), dtype=k.dtype, device=k.device)
        dkv = torch.empty((2, world * t, stride, d), dtype=torch.float32, device=k.device)
        dkv_local = torch.empty((2, t, stride, d), dtype=torch.float32, device=k.device)
        for i in range(0, h_kv, stride):
            for w in (_gather(kv[0], k[:, i:i + stride], pg), _gather(kv[1], v[:, i:i + stride], pg)):
                w.wait()
            qs = slice(i * group, (i + stride) * group)
            dq_i = torch.zeros((t, stride * group, d), dtype=torch.float32, device=q.device)
            dkv.zero_()
            attention_block_backward(dout[:, qs], q[:, qs], kv[0][k_slice], kv[1][k_slice], lse[qs], delta[qs],
                                     dq_i, dkv[0][k_slice], dkv[1][k_slice], scale, causal, None, seqs,
                                     accumulate=True, window=window, softcap=softcap,
                                     alibi_slopes=None if alibi is None else alibi[..., qs])
            dq[:, qs] = dq_i
            _reduce_scatter(dkv_local[0], dkv[0], pg, backend)
            _reduce_scatter(dkv_local[1], dkv[1], pg, backend)
            dk[:, i:i + stride] = dkv_local[0]
            dv[:, i:i + stride] = dkv_local[1]
        return (dq, dk, dv) + (None,) * 11


def allgather_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                               local_k_slice, dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                               return_attn_probs=False, group=None, *, softcap=0.0):
    """Attention of this rank's contiguous piece of a packed batch, keys all-gathered (ring-flash-attn's
    ``llama3_flash_attn_varlen_func``, same arguments in the same order).

    Args:
        q: ``[total / W, h_q, d]``; k, v: ``[total / W, h_kv, d]``: this rank's piece of the packed stream
            (rows ``rank * total / W`` onwards); fp16/bf16/fp32, one device, ``h_q % h_kv == 0``.
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice: from
            :func:`prepare_cu_seqlens` (int32 tensors, ints, a ``slice`` of the gathered ``[total]`` rows). The
            boundaries are read on the host each call: CPU tensors cost no device sync.
        heads_k_stride: K/V heads gathered at a time (divides ``h_kv``); the gather buffers hold
            ``2 x 2 x total x heads_k_stride x d`` elements in the forward.
        dropout_p: must be 0 (NotImplementedError otherwise).
        softmax_scale: default ``1 / sqrt(d)``.
        causal: bottom-right causal within each sequence (global positions, see the module docstring).
        window_size: ``(left, right)`` sliding window, -1 unbounded; with ``causal`` only (non-causal windows:
            NotImplementedError).
        alibi_slopes: fp32 ``[h_q]`` or ``[n_local_seqs, h_q]`` ALiBi slopes, with ``causal`` only. The
            ``[h_q]`` form must be the same on every rank (compared at every call; ValueError on gloo, a
            device-side assert on NCCL); the per-local-sequence form is this rank's own.
        deterministic: accepted; the result is always deterministic.
        return_attn_probs: return ``(out, lse, None)``.
        group: the process group (default: the world).
        softcap: logit soft-capping ``softcap * tanh(score / softcap)`` (0: off), keyword only (not in
            ring-flash-attn's signature; what Gemma 2 needs through the HF adapter).

    Returns:
        ``out`` ``[total / W, h_q, d]`` in q's dtype; with ``return_attn_probs`` ``(out, lse, None)``, lse float32
        ``[h_q, total / W]``, natural log.

    Raises:
        TypeError / ValueError for bad arguments, on every rank when the ranks disagree on shapes, dtype, causal,
        heads_k_stride, window, ALiBi or scale; all before the first K/V collective.
    """
    try:  # a rank whose own arguments are bad must not leave the others waiting in a collective
        causal, window, softcap = check_flash_args(_NAME, dropout_p, causal, window_size, softcap, alibi_slopes,
                                                    deterministic, return_attn_probs, group)
        pg, _rank, world = group_info(group)
        local = _check_local(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                             local_k_slice, softmax_scale, causal, window, window_size, alibi_slopes, softcap,
                             world)
        backend, device, sig = check_backend(pg, q.device), q.device, [_SIG_KIND] + local["sig"]
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise_with_the_group(named_error(_NAME, exc), group, q, *signature_kind())
    validate_across_ranks(_NAME, pg, backend, device, sig, describe=_describe,
                          what="local token count, heads, head_dim, dtype, causal, heads_k_stride, window_size, "
                               "alibi_slopes or none, softmax_scale and softcap, all valid")
    if local["alibi"] is not None and world > 1:  # per-head slopes ([h_q]) must be equal; per-sequence ones differ
        validate_same_slopes(_NAME, pg, backend, alibi_slopes if alibi_slopes.dim() == 1 else None, q.shape[1])
    out, lse = _AllGatherVarlen.apply(q, k, v, local["seqs"], local["stride"], local["k_slice"], local["scale"],
                                      causal, window, softcap, local["alibi"], pg, backend, world)
    return (out, lse, None) if return_attn_probs else out


def signature_kind() -> tuple[list[int], int]:
    """``(prefix, length)`` of the signature :func:`allgather_attn_varlen_func` exchanges (for
    ``ring_attn.ring.attention.raise_with_the_group``)."""
    return [_SIG_KIND], _SIG_LEN


def _check_local(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride, local_k_slice,
                 softmax_scale, causal, window, window_size, alibi_slopes, softcap, world) -> dict:
    """This rank's own checks (no collective); what the ranks must agree on is returned as ``sig``."""
    h_q, h_kv, d = check_qkv(q, k, v, packed=True)
    scale = check_scale(softmax_scale, d)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{_NAME}: q and k must hold this rank's same {q.shape[0]} tokens; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}")
    stride = _int("heads_k_stride", heads_k_stride)
    if stride < 1 or h_kv % stride:
        raise ValueError(f"{_NAME}: heads_k_stride={stride} must divide the {h_kv} K/V heads")
    if not causal and (window != (-1, -1) or alibi_slopes is not None):
        raise NotImplementedError(
            f"{_NAME}: window_size={tuple(window_size)} / alibi_slopes with causal=False: a query piece cut from "
            f"the middle of a sequence is not aligned with its keys; use causal=True, or ring_attn_varlen_func")
    t = q.shape[0]
    ok = isinstance(local_k_slice, slice) and local_k_slice.step in (None, 1) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in (local_k_slice.start, local_k_slice.stop))
    if not ok or not 0 <= local_k_slice.start <= local_k_slice.stop <= world * t:
        raise ValueError(f"{_NAME}: local_k_slice must be a slice(start, stop) of the {world * t} gathered rows "
                         f"(from prepare_cu_seqlens), got {local_k_slice!r}")
    k_slice = slice(local_k_slice.start, local_k_slice.stop)
    lens = []  # read once on the host (cu_seqlens on the CPU: no device sync)
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, t), ("cu_seqlens_k", cu_seqlens_k, k_slice.stop -
                                                                                  k_slice.start)):
        check_cu_seqlens_form(name, cu)
        vals = cu.tolist()
        if vals[0] != 0 or vals[-1] != total or any(b < a for a, b in zip(vals[:-1], vals[1:])):
            raise ValueError(f"{_NAME}: {name} must run from 0 to {total}, non-decreasing, got {vals}")
        lens.append([b - a for a, b in zip(vals[:-1], vals[1:])])
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"{_NAME}: cu_seqlens_q and cu_seqlens_k must describe the same sequences; got lengths "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    seqs = VarlenSeqs.from_cu_seqlens(cu_seqlens_q.to(q.device), cu_seqlens_k.to(q.device),
                                      _int("max_seqlen_q", max_seqlen_q), _int("max_seqlen_k", max_seqlen_k))
    lens_q, lens_k = lens
    if any(a > b for a, b in zip(lens_q, lens_k)):
        raise ValueError(f"{_NAME}: a sequence has more local queries than keys (cu_seqlens_q "
                         f"{cu_seqlens_q.tolist()}, cu_seqlens_k {cu_seqlens_k.tolist()}); use prepare_cu_seqlens")
    if max(lens_q) > seqs.max_len_q or max(lens_k) > seqs.max_len_k:
        raise ValueError(f"{_NAME}: max_seqlen_q={seqs.max_len_q} / max_seqlen_k={seqs.max_len_k} are below the "
                         f"longest sequence ({max(lens_q)} / {max(lens_k)})")
    alibi = None
    if alibi_slopes is not None:
        alibi = check_alibi_slopes(alibi_slopes, q.device, seqs.starts_q.numel(), h_q, "n_seqs")
    scale_digest = int.from_bytes(hashlib.sha1(repr((scale, softcap)).encode()).digest()[:4], "little")
    sig = [t, h_q, h_kv, d, _SIG_DTYPES.index(q.dtype), int(causal), stride,
           window[0], window[1], int(alibi is not None), scale_digest]
    return dict(sig=sig, seqs=seqs, stride=stride, k_slice=k_slice, scale=scale, alibi=alibi)
