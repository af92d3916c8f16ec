"""ring-flash-attn's API on ring-attn: switching is an import change.

``from ring_flash_attn import zigzag_ring_flash_attn_func`` becomes
``from ring_attn.compat import zigzag_ring_flash_attn_func``; every function here has ring-flash-attn's name,
positional order, defaults and return convention (``out``, or ``(out, softmax_lse, None)`` with
``return_attn_probs=True``), and expects inputs sharded the way ring-flash-attn's own tests shard them:

================================  ==========================================================================
ring-flash-attn function           local shard (rank ``r`` of ``W``; ring-attn layout)
================================  ==========================================================================
``ring_flash_attn_*``              tokens ``[r·S/W, (r+1)·S/W)`` (``layout="contiguous"``)
``zigzag_ring_flash_attn_*``       chunks ``r`` and ``2W-1-r`` of ``2W`` (``layout="zigzag"``)
``stripe_flash_attn_*``            tokens ``t`` with ``t % W == r`` (``layout="striped"``)
================================  ==========================================================================

``ring_attn.ring.layout.shard_for_rank(x, r, W, dim=1, layout=...)`` makes exactly these shards (it is what the
``extract_local`` helpers of ring-flash-attn's tests compute) and ``ring_attn.shard`` / ``shard_varlen`` do it
for the calling rank, padding lengths the layout cannot split. The dense forms have no ``seqlen`` (like
ring-flash-attn, they take every token as real): causal attention over such padding is right as it is, and a
non-causal call on shards ``ring_attn.shard`` padded raises ValueError; call
:func:`ring_attn.ring_attn_func` with ``seqlen=`` for it, which masks the padding.

Varlen forms take *local* ``cu_seqlens`` / ``max_seqlen`` like ring-flash-attn (every sequence's
boundaries divided by ``W``: ``varlen_local_cu_seqlens``), where :func:`ring_attn.ring_attn_varlen_func`
takes the global ones. ring-flash-attn's releases (through 0.1.7) have no ``stripe`` varlen form, so
neither has this module. LSE shapes are flash-attn >= 2.6's: ``[b, h_q, s_local]`` (dense) and
``[h_q, t_local]`` (varlen).

Differences, all in the direction of doing more: zigzag and stripe also compute non-causal attention
(ring-flash-attn asserts ``causal``); ``deterministic`` is accepted and the result is always deterministic;
GQA/MQA K/V circulate with their own head count; ``window_size`` is a sliding window over global positions
(see :func:`ring_attn.ring_attn_func`); ``alibi_slopes`` biases by *global* distances (ring-flash-attn's
steps use the distances within each block pair). Unsupported arguments raise before any K/V is exchanged
(after the one small signature all-gather, so every rank raises):
``dropout_p != 0`` (NotImplementedError naming the value).
``llama3_flash_attn_*`` (K/V all-gathered over contiguous pieces of a packed batch) are
:mod:`ring_attn.ring.allgather`. ring-flash-attn's HF adapter (``substitute_hf_flash_attn``,
``update_ring_flash_attn_params``, and ``use_ring_attn`` of its adapters module) is
:mod:`ring_attn.integrations.hf_adapter`: transformers' ``flash_attention_2`` becomes that all-gather scheme,
with the ranks' inputs checked together once per batch. ``ring_attn.integrations.hf.patch_hf`` is ring-attn's
own HF path (ring attention in three layouts, any rope type).

This module is a facade over the ring and the integrations (it sits with the CLI at the top of the layers).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ring_attn.integrations.hf_adapter import substitute_hf_flash_attn, update_ring_flash_attn_params, use_ring_attn
from ring_attn.ring.allgather import allgather_attn_varlen_func, prepare_cu_seqlens, signature_kind
from ring_attn.ring.attention import raise_with_the_group, ring_attn_func, ring_attn_varlen_func, ring_signature_kind
from ring_attn.ring.layout import shard_info

__all__ = [
    "ring_flash_attn_func",
    "ring_flash_attn_kvpacked_func",
    "ring_flash_attn_qkvpacked_func",
    "ring_flash_attn_varlen_func",
    "ring_flash_attn_varlen_kvpacked_func",
    "ring_flash_attn_varlen_qkvpacked_func",
    "zigzag_ring_flash_attn_func",
    "zigzag_ring_flash_attn_kvpacked_func",
    "zigzag_ring_flash_attn_qkvpacked_func",
    "zigzag_ring_flash_attn_varlen_func",
    "zigzag_ring_flash_attn_varlen_kvpacked_func",
    "zigzag_ring_flash_attn_varlen_qkvpacked_func",
    "stripe_flash_attn_func",
    "stripe_flash_attn_kvpacked_func",
    "stripe_flash_attn_qkvpacked_func",
    "llama3_flash_attn_prepare_cu_seqlens",
    "llama3_flash_attn_varlen_func",
    "llama3_flash_attn_varlen_kvpacked_func",
    "llama3_flash_attn_varlen_qkvpacked_func",
    "substitute_hf_flash_attn",
    "update_ring_flash_attn_params",
    "use_ring_attn",
]


def _dense(name, layout, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
           return_attn_probs, group):
    # Every token is real, as in ring-flash-attn (which has no seqlen): said explicitly for non-causal calls, so
    # ring_attn_func's guess from the last sequence ring_attn.shard padded to this size (which compat users cannot
    # answer with seqlen=) is not consulted. Shards ring_attn.shard made itself keep its exact check (seqlen None).
    seqlen = None
    if not causal and not any(shard_info(x) is not None for x in (q, k, v)) and isinstance(q, torch.Tensor) and \
            q.dim() == 4 and dist.is_available() and dist.is_initialized():
        seqlen = q.shape[1] * dist.get_world_size(group)
    # ring-flash-attn has no softcap argument: 0.0 goes in flash-attn's softcap position
    return ring_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, 0.0, alibi_slopes, deterministic,
                          return_attn_probs, group, layout=layout, seqlen=seqlen)


def _world(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring attention needs torch.distributed: call torch.distributed.init_process_group "
                           "first (a one-rank group is fine)")
    return dist.get_world_size(group)


# the call the other ranks make, whose signature exchange a rank failing compat's own checks joins
_KINDS = {"dense": lambda: ring_signature_kind(False), "varlen": lambda: ring_signature_kind(True),
          "allgather": signature_kind}


def _on_every_rank(target: str, group, q, check):
    """``check()``, compat's own argument checks before a ``target`` call (``"dense"``, ``"varlen"``,
    ``"allgather"``); when they raise, the error is raised after joining that call's signature exchange, so the
    other ranks raise ValueError naming this rank instead of waiting for it."""
    try:
        return check()
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise_with_the_group(exc, group, q, *_KINDS[target]())


def _varlen(name, layout, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
            alibi_slopes, deterministic, return_attn_probs, group):
    """Local cu_seqlens/max_seqlen (ring-flash-attn's) -> global ones (ring_attn_varlen_func's)."""
    world = _on_every_rank("varlen", group, q, lambda: _check_varlen(name, layout, cu_seqlens, max_seqlen, group))
    return ring_attn_varlen_func(q, k, v, cu_seqlens * world, max_seqlen * world, dropout_p, softmax_scale, causal,
                                 window_size, 0.0, alibi_slopes, deterministic, return_attn_probs, group,
                                 layout=layout)


def _check_varlen(name, layout, cu_seqlens, max_seqlen, group) -> int:
    """compat's own checks of ring-flash-attn's local ``cu_seqlens`` / ``max_seqlen``; returns the world size."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name}: cu_seqlens must be an int32 tensor of local boundaries, got "
                        f"{type(cu_seqlens).__name__}")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name}: group must be a torch.distributed ProcessGroup or None, got {group!r}")
    world = _world(group)
    if layout == "zigzag" and cu_seqlens.dim() == 1 and not cu_seqlens.is_floating_point():
        local = cu_seqlens.tolist()
        for i, (a, b) in enumerate(zip(local[:-1], local[1:])):
            if (b - a) % 2:
                raise ValueError(f"{name}: local sequence {i} (cu_seqlens[{i}:{i + 2}] = [{a}, {b}]) has odd length "
                                 f"{b - a}; zigzag needs every global length to be a multiple of 2 * world_size "
                                 f"= {2 * world} (shard with ring_attn.shard_varlen, which pads, and call "
                                 f"ring_attn.ring_attn_varlen_func with the global cu_seqlens)")
    if isinstance(max_seqlen, bool):
        raise TypeError(f"{name}: max_seqlen must be an int, got {max_seqlen!r}")
    return world


def _split(name, packed, n, target, group):
    """qkv ``[b, s, 3, h, d]`` / kv ``[b, s, 2, h, d]`` (varlen and allgather targets: without ``b``) -> views of
    q, k, v; a bad shape raises on every rank (:func:`_on_every_rank`)."""
    dense = target == "dense"
    ndim = 5 if dense else 4
    what = "qkv" if n == 3 else "kv"

    def check():
        if not isinstance(packed, torch.Tensor) or packed.dim() != ndim or packed.shape[ndim - 3] != n:
            shape = ("[batch, seqlen, " if dense else "[total_tokens, ") + f"{n}, heads, head_dim]"
            got = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
            raise ValueError(f"{name}: {what} must be {shape}, got {got}")
        return packed.unbind(ndim - 3)

    return _on_every_rank(target, group, packed, check)


# ---------------------------------------------------------------------------------------------------------
# ring_flash_attn_* (contiguous layout)


def ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                         alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """ring-flash-attn's ``ring_flash_attn_func``: q/k/v ``[b, S/W, h, d]`` holding tokens
    ``[r·S/W, (r+1)·S/W)``. Returns ``out`` or, with ``return_attn_probs``, ``(out, lse [b, h, S/W], None)``.
    See :func:`ring_attn.ring_attn_func` for dtypes, GQA and what raises."""
    return _dense("ring_flash_attn_func", "contiguous", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, deterministic, return_attn_probs, group)


def ring_flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                  alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """:func:`ring_flash_attn_func` with ``kv`` ``[b, S/W, 2, h_kv, d]``."""
    k, v = _split("ring_flash_attn_kvpacked_func", kv, 2, "dense", group)
    return _dense("ring_flash_attn_kvpacked_func", "contiguous", q, k, v, dropout_p, softmax_scale, causal,
                  window_size, alibi_slopes, deterministic, return_attn_probs, group)


def ring_flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                   alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """:func:`ring_flash_attn_func` with ``qkv`` ``[b, S/W, 3, h, d]``."""
    q, k, v = _split("ring_flash_attn_qkvpacked_func", qkv, 3, "dense", group)
    return _dense("ring_flash_attn_qkvpacked_func", "contiguous", q, k, v, dropout_p, softmax_scale, causal,
                  window_size, alibi_slopes, deterministic, return_attn_probs, group)


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                return_attn_probs=False, group=None):
    """ring-flash-attn's ``ring_flash_attn_varlen_func``: packed q/k/v ``[t_local, h, d]`` holding, for
    every sequence, its contiguous ``r``-th of ``W`` parts; ``cu_seqlens`` (int32) and ``max_seqlen`` are the
    *local* ones (global / W). Returns ``out`` or ``(out, lse [h, t_local], None)``."""
    return _varlen("ring_flash_attn_varlen_func", "contiguous", q, k, v, cu_seqlens, max_seqlen, dropout_p,
                   softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs, group)


def ring_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                         causal=False, window_size=(-1, -1), alibi_slopes=None,
                                         deterministic=False, return_attn_probs=False, group=None):
    """:func:`ring_flash_attn_varlen_func` with ``kv`` ``[t_local, 2, h_kv, d]``."""
    k, v = _split("ring_flash_attn_varlen_kvpacked_func", kv, 2, "varlen", group)
    return _varlen("ring_flash_attn_varlen_kvpacked_func", "contiguous", q, k, v, cu_seqlens, max_seqlen,
                   dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                   group)


def ring_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                          causal=False, window_size=(-1, -1), alibi_slopes=None,
                                          deterministic=False, return_attn_probs=False, group=None):
    """:func:`ring_flash_attn_varlen_func` with ``qkv`` ``[t_local, 3, h, d]``."""
    q, k, v = _split("ring_flash_attn_varlen_qkvpacked_func", qkv, 3, "varlen", group)
    return _varlen("ring_flash_attn_varlen_qkvpacked_func", "contiguous", q, k, v, cu_seqlens, max_seqlen,
                   dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                   group)


# ---------------------------------------------------------------------------------------------------------
# zigzag_ring_flash_attn_* (zigzag layout)


def zigzag_ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """ring-flash-attn's ``zigzag_ring_flash_attn_func``: q/k/v ``[b, S/W, h, d]`` holding chunks ``r`` and
    ``2W-1-r`` of ``2W`` (in that order). Returns ``out`` or ``(out, lse [b, h, S/W], None)``."""
    return _dense("zigzag_ring_flash_attn_func", "zigzag", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, deterministic, return_attn_probs, group)


def zigzag_ring_flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                                         window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                         return_attn_probs=False, group=None):
    """:func:`zigzag_ring_flash_attn_func` with ``kv`` ``[b, S/W, 2, h_kv, d]``."""
    k, v = _split("zigzag_ring_flash_attn_kvpacked_func", kv, 2, "dense", group)
    return _dense("zigzag_ring_flash_attn_kvpacked_func", "zigzag", q, k, v, dropout_p, softmax_scale, causal,
                  window_size, alibi_slopes, deterministic, return_attn_probs, group)


def zigzag_ring_flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                                          window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                          return_attn_probs=False, group=None):
    """:func:`zigzag_ring_flash_attn_func` with ``qkv`` ``[b, S/W, 3, h, d]``."""
    q, k, v = _split("zigzag_ring_flash_attn_qkvpacked_func", qkv, 3, "dense", group)
    return _dense("zigzag_ring_flash_attn_qkvpacked_func", "zigzag", q, k, v, dropout_p, softmax_scale, causal,
                  window_size, alibi_slopes, deterministic, return_attn_probs, group)


def zigzag_ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                       causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                       return_attn_probs=False, group=None):
    """ring-flash-attn's ``zigzag_ring_flash_attn_varlen_func``: every sequence zigzag-sharded (its chunks
    ``r`` and ``2W-1-r`` of ``2W``), packed; *local* ``cu_seqlens`` (int32, every local length even) and
    ``max_seqlen``. Returns ``out`` or ``(out, lse [h, t_local], None)``."""
    return _varlen("zigzag_ring_flash_attn_varlen_func", "zigzag", q, k, v, cu_seqlens, max_seqlen, dropout_p,
                   softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs, group)


def zigzag_ring_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                                causal=False, window_size=(-1, -1), alibi_slopes=None,
                                                deterministic=False, return_attn_probs=False, group=None):
    """:func:`zigzag_ring_flash_attn_varlen_func` with ``kv`` ``[t_local, 2, h_kv, d]``."""
    k, v = _split("zigzag_ring_flash_attn_varlen_kvpacked_func", kv, 2, "varlen", group)
    return _varlen("zigzag_ring_flash_attn_varlen_kvpacked_func", "zigzag", q, k, v, cu_seqlens, max_seqlen,
                   dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                   group)


def zigzag_ring_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                                 causal=False, window_size=(-1, -1), alibi_slopes=None,
                                                 deterministic=False, return_attn_probs=False, group=None):
    """:func:`zigzag_ring_flash_attn_varlen_func` with ``qkv`` ``[t_local, 3, h, d]``."""
    q, k, v = _split("zigzag_ring_flash_attn_varlen_qkvpacked_func", qkv, 3, "varlen", group)
    return _varlen("zigzag_ring_flash_attn_varlen_qkvpacked_func", "zigzag", q, k, v, cu_seqlens, max_seqlen,
                   dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                   group)


# ---------------------------------------------------------------------------------------------------------
# stripe_flash_attn_* (striped layout)


def stripe_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """ring-flash-attn's ``stripe_flash_attn_func``: q/k/v ``[b, S/W, h, d]`` holding tokens ``t`` with
    ``t % W == r`` (local ``i`` = global ``i·W + r``). Returns ``out`` or ``(out, lse [b, h, S/W], None)``."""
    return _dense("stripe_flash_attn_func", "striped", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, deterministic, return_attn_probs, group)


def stripe_flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """:func:`stripe_flash_attn_func` with ``kv`` ``[b, S/W, 2, h_kv, d]``."""
    k, v = _split("stripe_flash_attn_kvpacked_func", kv, 2, "dense", group)
    return _dense("stripe_flash_attn_kvpacked_func", "striped", q, k, v, dropout_p, softmax_scale, causal,
                  window_size, alibi_slopes, deterministic, return_attn_probs, group)


def stripe_flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                     alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """:func:`stripe_flash_attn_func` with ``qkv`` ``[b, S/W, 3, h, d]``."""
    q, k, v = _split("stripe_flash_attn_qkvpacked_func", qkv, 3, "dense", group)
    return _dense("stripe_flash_attn_qkvpacked_func", "striped", q, k, v, dropout_p, softmax_scale, causal,
                  window_size, alibi_slopes, deterministic, return_attn_probs, group)


# ---------------------------------------------------------------------------------------------------------
# llama3_flash_attn_* (all-gathered K/V over contiguous pieces of the packed stream: ring_attn.ring.allgather)


def llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size):
    """ring-flash-attn's ``llama3_flash_attn_prepare_cu_seqlens``: global ``cu_seqlens`` -> this rank's
    ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice)`` (int32 tensors, ints, a slice);
    see :func:`ring_attn.ring.allgather.prepare_cu_seqlens`."""
    return prepare_cu_seqlens(cu_seqlens, causal, rank, world_size)


def llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                                  local_k_slice, dropout_p=0.0, softmax_scale=None, causal=False,
                                  window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                  return_attn_probs=False, group=None):
    """ring-flash-attn's ``llama3_flash_attn_varlen_func``: q/k/v ``[total/W, h, d]``, this rank's contiguous
    piece of the packed stream, with the local boundaries of :func:`llama3_flash_attn_prepare_cu_seqlens`.
    Returns ``out`` or ``(out, lse [h_q, total/W], None)``; see
    :func:`ring_attn.ring.allgather.allgather_attn_varlen_func`."""
    return allgather_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal, window_size,
                                      alibi_slopes, deterministic, return_attn_probs, group)


def llama3_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           heads_k_stride, local_k_slice, dropout_p=0.0, softmax_scale=None,
                                           causal=False, window_size=(-1, -1), alibi_slopes=None,
                                           deterministic=False, return_attn_probs=False, group=None):
    """:func:`llama3_flash_attn_varlen_func` with ``kv`` ``[total/W, 2, h_kv, d]``."""
    k, v = _split("llama3_flash_attn_varlen_kvpacked_func", kv, 2, "allgather", group)
    return allgather_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal, window_size,
                                      alibi_slopes, deterministic, return_attn_probs, group)


def llama3_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            heads_k_stride, local_k_slice, dropout_p=0.0, softmax_scale=None,
                                            causal=False, window_size=(-1, -1), alibi_slopes=None,
                                            deterministic=False, return_attn_probs=False, group=None):
    """:func:`llama3_flash_attn_varlen_func` with ``qkv`` ``[total/W, 3, h, d]``."""
    q, k, v = _split("llama3_flash_attn_varlen_qkvpacked_func", qkv, 3, "allgather", group)
    return allgather_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal, window_size,
                                      alibi_slopes, deterministic, return_attn_probs, group)
