"""ring-flash-attn's HuggingFace adapter on ring-attn: :func:`substitute_hf_flash_attn`,
:func:`update_ring_flash_attn_params`, :func:`use_ring_attn`.

A ring-flash-attn user changes only the import (``from ring_attn.compat import substitute_hf_flash_attn,
update_ring_flash_attn_params``); the protocol is ring-flash-attn's:

1. ``substitute_hf_flash_attn(group, heads_k_stride)`` once: transformers' ``"flash_attention_2"`` attention
   becomes the all-gather context parallelism of :mod:`ring_attn.ring.allgather` (K/V all-gathered
   ``heads_k_stride`` heads at a time, what ring-flash-attn's ``llama3_flash_attn_varlen_func`` does). So does
   the Hub kernel transformers swaps in for it where flash-attn is not installed (5.x with the ``kernels``
   package: ``kernels-community/flash-attn2``), which would otherwise run each rank's piece alone.
2. The model runs with ``attn_implementation="flash_attention_2"``, batch size 1: a packed batch of
   ``total`` tokens (``total % W == 0``) cut into ``W`` contiguous pieces, rank ``r`` feeding
   ``input_ids[:, r*total/W:(r+1)*total/W]`` and the same slice of the ``position_ids``.
3. Before every forward, ``update_ring_flash_attn_params(cu_seqlens, group)`` with the *global* boundaries of
   the packed sequences (int32 ``[n_seqs + 1]``).

What it does beyond ring-flash-attn (whose adapter asserts or ignores these):

* Checks, at the first attention call after each ``update_ring_flash_attn_params`` and whenever a forward
  brings new ``position_ids``, on every rank together (one small all-gather, before any K/V collective), that
  the call fits the parameters: batch size 1, this rank's token count, ``position_ids`` (when transformers
  passes them) equal to this rank's slice of the packed positions, either restarting at 0 at every sequence or
  counting through the whole batch, and the same ``cu_seqlens`` on every rank. A rank whose input is wrong
  raises its own error and every other rank raises too: nothing waits in a collective, nothing is silently
  wrong. (The ranks must behave alike: all pass fresh ``position_ids`` per forward, or all reuse them; a buffer
  rewritten in place counts as fresh and is checked again.)
* Sliding windows are exact over the whole packed sequence (transformers' mask semantics: a query sees itself
  and the ``sliding_window - 1`` keys before it), and ``softcap`` (Gemma 2) runs in the kernels.
* fp32 inputs stay fp32 (the kernels take them; ring-flash-attn casts them to 16 bits for flash-attn).
* Refused with NotImplementedError naming the setting: non-causal attention, attention dropout,
  ``output_attentions``, attention sinks, a padding ``attention_mask``, a reused KV cache (generation), and rope
  types whose frequencies
  transformers recomputes from the sequence length (``dynamic``, ``longrope``: on a piece of the batch they
  would differ from one device's; :func:`ring_attn.integrations.hf.patch_hf` handles those).

:func:`substitute_hf_flash_attn` returns a handle whose ``undo()`` restores the previous ``flash_attention_2``
function (ring-flash-attn returns None; nothing else changes). ``use_ring_attn(False)`` routes calls back to
that previous function (transformers' flash-attn path) without undoing the substitution.

Supported transformers: 4.48 to 5.x (``ALL_ATTENTION_FUNCTIONS``). See ``docs/hf.md``.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

from ring_attn.integrations.hf import refuse_unsupported, sliding_window_size, to_compute_dtype
from ring_attn.ops.padding import tensor_cache
from ring_attn.ring.allgather import allgather_attn_varlen_func, prepare_cu_seqlens, signature_kind
from ring_attn.ring.attention import check_backend, group_info, raise_with_the_group
from ring_attn.ring.comm import all_gather_ints, weak_group
from ring_attn.rope_scaling import LENGTH_DEPENDENT_ROPE_TYPES, hf_rope_types

__all__ = ["substitute_hf_flash_attn", "update_ring_flash_attn_params", "use_ring_attn", "flash_attention_forward",
           "AdapterHandle"]

_NAME = "substitute_hf_flash_attn"
_KEY = "flash_attention_2"
_TAG = "adapter batch"  # in a position_ids tensor's tensor_cache: the _Params it was agreed under


class _Params:
    """What :func:`update_ring_flash_attn_params` computed for this rank (one packed batch)."""

    def __init__(self, cu_seqlens: torch.Tensor, group):
        _pg, rank, world = group_info(group)
        # kept on the CPU (one copy from the device): every layer's call reads them on the host, with no sync
        cpu = cu_seqlens.detach().cpu() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        self.cu_q, self.cu_k, self.max_q, self.max_k, self.k_slice = prepare_cu_seqlens(cpu, True, rank, world)
        cu = [int(c) for c in cpu.tolist()]
        self.rank, self.world, self.total, self.n_seqs = rank, world, cu[-1], len(cu) - 1
        self.local = cu[-1] // world
        self.longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
        self.digest = int.from_bytes(hashlib.sha1(repr(cu).encode()).digest()[:7], "little")
        lo = rank * self.local
        g = torch.arange(lo, lo + self.local, dtype=torch.int64)
        bounds = torch.tensor(cu, dtype=torch.int64)
        self.restart = g - bounds[torch.searchsorted(bounds, g, right=True) - 1]  # positions restarting per sequence
        self.running = g  # positions counting through the whole batch
        self.agreed = False  # set once the ranks have agreed on this batch (first attention call after update)


class _Substitution:
    def __init__(self, group, heads_k_stride: int, previous: dict, had: dict, table, chain: object):
        self.group = weak_group(group, _NAME)
        self.stride = heads_k_stride
        self.previous = previous  # name -> the function registered before the first substitution (or None)
        self.had = had  # name -> whether the table itself held an entry then (transformers >= 4.50: a local one)
        self.table = table
        self.chain = chain  # shared by the substitutions made before an undo: any of their handles undoes them
        # under torch.compile these run eagerly (collectives and host reads cannot be traced)
        self.attend = torch.compiler.disable(allgather_attn_varlen_func)
        self.prepare = torch.compiler.disable(_prepare)


_params: Optional[_Params] = None
_sub: Optional[_Substitution] = None
_switch = True


class AdapterHandle:
    """Returned by :func:`substitute_hf_flash_attn`; ``undo()`` (or leaving a ``with`` block) restores the
    ``flash_attention_2`` function that was registered before (also after later calls replaced the group or
    stride: any of their handles undoes them all) and forgets the batch parameters. Idempotent."""

    def __init__(self, sub: _Substitution):
        self._chain = sub.chain

    def undo(self) -> None:
        global _sub, _params
        if _sub is None or _sub.chain is not self._chain:  # already undone
            return
        for key, had in _sub.had.items():
            if had:
                _sub.table[key] = _sub.previous[key]
            elif key in _own_entries(_sub.table):
                del _sub.table[key]  # transformers' class-wide function shows through again
        _sub = None
        _params = None  # the next substitution starts without a batch

    def __enter__(self) -> "AdapterHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def substitute_hf_flash_attn(process_group, heads_k_stride: int) -> AdapterHandle:
    """Make transformers' ``attn_implementation="flash_attention_2"`` run all-gather context parallelism over
    ``process_group`` (ring-flash-attn's function of the same name and arguments).

    Args:
        process_group: the ``torch.distributed`` group the packed batch is cut over (None: the world).
        heads_k_stride: K/V heads all-gathered at a time; must divide the model's K/V head count (checked at the
            first call). Smaller: less memory for the gathered K/V, more collectives.

    Returns:
        An :class:`AdapterHandle` (``undo()`` restores the previous function). Calling this again replaces the
        group and stride.

    Raises:
        TypeError / ValueError for a bad ``heads_k_stride`` or group; RuntimeError where transformers has no
        ``ALL_ATTENTION_FUNCTIONS`` (before 4.48).
    """
    global _sub
    import torch.distributed as dist

    if isinstance(heads_k_stride, bool) or not isinstance(heads_k_stride, int):
        raise TypeError(f"{_NAME}: heads_k_stride must be an int, got {heads_k_stride!r}")
    if heads_k_stride < 1:
        raise ValueError(f"{_NAME}: heads_k_stride={heads_k_stride}: expected a positive number of K/V heads")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{_NAME}: process_group must be a torch.distributed ProcessGroup or None, got "
                        f"{process_group!r}")
    group_info(process_group)  # RuntimeError without init_process_group
    import transformers
    from transformers import modeling_utils

    table = getattr(modeling_utils, "ALL_ATTENTION_FUNCTIONS", None)
    if table is None:
        raise RuntimeError(f"{_NAME}: transformers {transformers.__version__} has no ALL_ATTENTION_FUNCTIONS; "
                           f"transformers 4.48 or newer is needed")
    keys = _flash_names()
    if _sub is not None and table.get(_KEY) is flash_attention_forward:  # a second call: keep what was there first
        previous, had, chain = _sub.previous, _sub.had, _sub.chain
    else:
        previous = {key: table.get(key) for key in keys}
        had, chain = {key: key in _own_entries(table) for key in keys}, object()
    for key in keys:
        table[key] = flash_attention_forward
    _sub = _Substitution(process_group, heads_k_stride, previous, had, table, chain)
    return AdapterHandle(_sub)


def _flash_names() -> list[str]:
    """``flash_attention_2`` and the name transformers swaps it for where flash-attn is not installed (>= 5.x with
    the ``kernels`` package: a Hub kernel such as ``kernels-community/flash-attn2``). A model loaded with
    ``attn_implementation="flash_attention_2"`` then runs under the kernel's name; were that name left to the Hub
    kernel, each rank would attend to its own piece only, silently."""
    names = [_KEY]
    try:
        from transformers import modeling_flash_attention_utils as fa_utils
    except ImportError:
        return names
    fallback = getattr(fa_utils, "FLASH_ATTN_KERNEL_FALLBACK", {}).get(_KEY)
    if isinstance(fallback, str) and fallback not in names:
        names.append(fallback)
    return names


def _own_entries(table) -> dict:
    """The entries ``table[key] = fn`` writes: transformers >= 4.50's AttentionInterface keeps them in its local
    mapping, over the class-wide one; before 4.50 the table is a plain dict."""
    return getattr(table, "_local_mapping", table)


def update_ring_flash_attn_params(cu_seqlens: torch.Tensor, process_group) -> None:
    """Set the packed batch the next forwards attend over (ring-flash-attn's function of the same name).

    Args:
        cu_seqlens: int32/int64 ``[n_seqs + 1]``, the *global* boundaries of the packed sequences (0 first,
            non-decreasing, the total divisible by the group size); the same on every rank.
        process_group: the group (None: the world); its size must be the substitution's.

    Raises:
        TypeError / ValueError naming the argument (no collective here: the ranks compare at the first
        attention call).
    """
    global _params
    _params = _Params(cu_seqlens, process_group)


def use_ring_attn(flag: bool) -> None:
    """``False``: ``flash_attention_2`` calls go to the function the substitution replaced (transformers' own
    flash-attn path) until ``use_ring_attn(True)``."""
    global _switch
    if not isinstance(flag, bool):
        raise TypeError(f"use_ring_attn: flag must be a bool, got {flag!r}")
    _switch = flag


def _call_checks(module, q: torch.Tensor, k: torch.Tensor, attention_mask, dropout, kwargs, params: _Params,
                 sub: _Substitution) -> None:
    """This rank's checks of every call: no collective, no host read unless a mask is passed."""
    if k.shape[2] != q.shape[2]:
        raise NotImplementedError(
            f"{_NAME}: {q.shape[2]} queries over {k.shape[2]} cached keys (a KV cache, e.g. generate()): the "
            f"adapter attends over pieces of one packed batch; generate after use_ring_attn(False) or undo()")
    refuse_unsupported(module, dropout, kwargs, f"{_NAME}'s {_KEY}")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if not causal:
        raise NotImplementedError(f"{_NAME}: non-causal attention (module {type(module).__name__}): the adapter's "
                                  f"pieces see keys up to their own end; use ring_attn.integrations.hf.patch_hf")
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
        raise NotImplementedError(f"{_NAME}: an attention_mask with padding: pack the sequences instead (their "
                                  f"boundaries go to update_ring_flash_attn_params), or drop the mask")
    _group, _rank, world = group_info(sub.group())
    if world != params.world:
        raise ValueError(f"{_NAME}: update_ring_flash_attn_params was given a group of {params.world} ranks, "
                         f"substitute_hf_flash_attn one of {world}")
    if q.shape[0] != 1:
        raise ValueError(f"{_NAME}: batch size {q.shape[0]}: the adapter takes one packed row (batch size 1); "
                         f"pack the batch and pass its boundaries to update_ring_flash_attn_params")
    if q.shape[2] != params.local:
        raise ValueError(f"{_NAME}: this rank's query holds {q.shape[2]} tokens, but the cu_seqlens given to "
                         f"update_ring_flash_attn_params (total {params.total} over {params.world} ranks) give it "
                         f"{params.local}; call update_ring_flash_attn_params with this batch's cu_seqlens first")


def _batch_checks(module, pos, params: _Params) -> None:
    """This rank's checks of a new batch (first call after an update, or new position_ids): one host read."""
    config = getattr(module, "config", None)
    if config is not None:
        dependent = {k: t for k, t in hf_rope_types(config).items() if t in LENGTH_DEPENDENT_ROPE_TYPES}
        if dependent:
            raise NotImplementedError(
                f"{_NAME}: rope type {dependent} recomputes its frequencies from max(position_ids) + 1, which on "
                f"a piece of the batch is not the whole batch's; use ring_attn.integrations.hf.patch_hf (it "
                f"makes every rank see the global length)")
    if isinstance(pos, torch.Tensor):
        flat = pos.reshape(-1).to(device="cpu", dtype=torch.int64)
        if not (torch.equal(flat, params.restart) or torch.equal(flat, params.running)):
            def show(x):
                return f"{x[:6].tolist()}{' ...' if x.numel() > 6 else ''}"

            raise ValueError(
                f"{_NAME}: position_ids on rank {params.rank} are {show(flat)}, neither this rank's slice of the "
                f"packed positions restarting at each sequence of cu_seqlens ({show(params.restart)}) nor of "
                f"positions counting through the batch ({show(params.running)}): pass every rank its slice "
                f"[:, {params.rank * params.local}:{(params.rank + 1) * params.local}] of the positions one device "
                f"would see")


def _exchange_batch(sub: _Substitution, device, params: Optional[_Params], failed: Optional[BaseException]):
    """The batch agreement's all-gather: every rank's ``[failed, total tokens, sequences, cu_seqlens digest]``
    (a rank without ``params`` sends a failed record). A rank whose ``failed`` is set raises it after the
    exchange, so the others learn of it instead of waiting."""
    pg, _rank, _world = group_info(sub.group())
    mine = [1, 0, 0, 0] if params is None else [int(failed is not None), params.total, params.n_seqs, params.digest]
    return all_gather_ints(pg, check_backend(pg, device), device, mine, failed)


def _prepare(module, query, key, attention_mask, dropout, kwargs, params: _Params, sub: _Substitution) -> None:
    """Every call's checks; for a new batch (first call after update_ring_flash_attn_params, or position_ids not
    seen before: a new forward) also the batch checks and the ranks' agreement, so that a rank whose input is
    wrong makes every rank raise before the K/V all-gather. Runs eagerly under torch.compile."""
    pos = kwargs.get("position_ids")
    # (the record is dropped when the tensor is rewritten in place: a reused buffer with new positions is checked)
    fresh = tensor_cache(pos).get(_TAG) is not params if isinstance(pos, torch.Tensor) else not params.agreed
    try:
        _call_checks(module, query, key, attention_mask, dropout, kwargs, params, sub)
        if fresh:
            _batch_checks(module, pos, params)
        failed = None
    except (TypeError, ValueError, NotImplementedError) as exc:
        failed = exc
    if not fresh:
        if failed is not None:
            # a later layer of an agreed batch, refused on this rank only (layers that differ between ranks): the
            # others are in the all-gather's own signature exchange, which this rank joins as failed, so they
            # raise too instead of waiting for it in the K/V all-gather
            raise_with_the_group(failed, sub.group(), query, *signature_kind())
        return
    every = _exchange_batch(sub, query.device, params, failed)
    bad = [r for r, s in enumerate(every) if s[0]]
    if bad:
        raise ValueError(f"{_NAME}: rank(s) {bad} raised for this batch (see their errors); every rank stops here, "
                         f"before the K/V all-gather")
    if any(s[1:] != every[0][1:] for s in every):
        lines = "; ".join(f"rank {r}: {s[1]} tokens in {s[2]} sequences (digest {s[3] & 0xFFFF:04x})"
                          for r, s in enumerate(every))
        raise ValueError(f"{_NAME}: the ranks passed different cu_seqlens to update_ring_flash_attn_params (every "
                         f"rank must pass the whole batch's); {lines}")
    params.agreed = True
    if isinstance(pos, torch.Tensor):
        tensor_cache(pos)[_TAG] = params


def flash_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                            softcap: Optional[float] = None, **kwargs):
    """transformers ``AttentionInterface`` entry registered as ``"flash_attention_2"`` by
    :func:`substitute_hf_flash_attn`.

    Args:
        module: the attention module (reads ``is_causal``, ``config``).
        query: ``[1, h_q, t, d]``; key, value: ``[1, h_kv, t, d]`` (transformers' layout), ``t = total / W``
            this rank's piece; fp16/bf16/fp32 (cast to the autocast dtype under autocast).
        attention_mask: None (or an all-ones 2-D mask).
        dropout, scaling, sliding_window, softcap: as transformers passes them.
        kwargs: ``position_ids`` (checked against the parameters), ``is_causal`` ...; packed-sequence keys
            transformers may add (``cu_seq_lens_q``, ...) are ignored: the boundaries are
            :func:`update_ring_flash_attn_params`'s.

    Returns:
        ``(attn_output [1, t, h_q, d], None)``.

    Raises:
        RuntimeError before :func:`update_ring_flash_attn_params`; ValueError / NotImplementedError naming what
        does not fit (module docstring), on every rank together at the first call after an update.
    """
    sub, params = _sub, _params
    if sub is None:
        raise RuntimeError(f"{_NAME}: the substitution was undone; call substitute_hf_flash_attn again")
    if not _switch:
        name = getattr(getattr(module, "config", None), "_attn_implementation", _KEY)
        previous = sub.previous.get(name, sub.previous[_KEY])
        if previous is None:  # registered class-wide after the substitution (a Hub kernel loaded with the model)
            previous = getattr(sub.table, "_global_mapping", {}).get(name)
        if previous is None:
            raise RuntimeError(f"use_ring_attn(False): no {name} function was registered before the substitution")
        return previous(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            sliding_window=sliding_window, softcap=softcap, **kwargs)
    if params is None:
        missing = RuntimeError(f"{_NAME}: call update_ring_flash_attn_params(cu_seqlens, group) with the packed "
                               f"batch's boundaries before the forward")
        # the ranks that did call it are in the batch agreement's exchange: join it as failed, so that they raise
        # too instead of waiting for this rank
        _exchange_batch(sub, query.device, None, missing)
    sub.prepare(module, query, key, attention_mask, dropout, kwargs, params, sub)
    q, k, v = to_compute_dtype(*(x.transpose(1, 2)[0] for x in (query, key, value)))  # [t, h, d] views
    window = sliding_window_size(sliding_window, params.longest, True)
    out = sub.attend(q, k, v, params.cu_q, params.cu_k, params.max_q, params.max_k, sub.stride, params.k_slice,
                     softmax_scale=scaling, causal=True, window_size=window, group=sub.group(),
                     softcap=0.0 if softcap is None else softcap)
    return out.unsqueeze(0), None
