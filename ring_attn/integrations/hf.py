"""HuggingFace ``transformers`` drop-in: one call patches Llama-family models (:data:`MODEL_FAMILIES`).

* :func:`patch_hf` registers the attention implementation ``"ring_attn"`` (and its mask function, so that a
  padding mask is never silently dropped), switches a model to it, and (``fused_rope=True``) replaces the rotary
  application of the :data:`MODEL_FAMILIES` modeling modules with :func:`ring_attn.apply_rope`, whose angles are
  formed in float64 from the global ``position_ids``. Every rotary embedding class of transformers' imported
  modeling modules (and of ``model``) is wrapped so that, over a ring, rope types whose frequencies depend on the
  sequence length see the global length on every rank. Without torch.distributed, or with a one-rank group: the
  single-device kernel, a faster drop-in for ``sdpa``. A larger group (``group=None``: the default group, as for
  :func:`shard_batch`): ring attention over it, the sequence sharded by :func:`shard_batch`. The returned
  :class:`HFPatch` undoes everything (``.undo()`` or ``with``). Sliding windows (Mistral's, Qwen2's per layer) and
  a ``softcap`` passed by a module run in the kernels in every mode (:func:`sliding_window_size` gives the
  width). The wrapped rotary classes act only for models running ``"ring_attn"``; other models keep stock RoPE.
* :func:`shard_batch` shards a training batch (shifting labels over the whole sequence first, padding lengths
  the layout cannot split, recognising packed sequences), and :func:`causal_lm_loss` turns it into a loss whose
  value and gradients, after data-parallel averaging, equal single-process training on the whole batch.

Supported transformers: 4.48 to 5.x (both ends are tested). See ``docs/hf.md``.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import threading
import warnings
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

import ring_attn
from ring_attn.ops.padding import tensor_cache
from ring_attn.ops.rope import positions_in_range
from ring_attn.ring import layout as ring_layout
from ring_attn.ring.attention import raise_with_the_group, ring_signature_kind
from ring_attn.ring.comm import all_gather_ints, weak_group
from ring_attn.rope_scaling import LENGTH_DEPENDENT_ROPE_TYPES

__all__ = ["patch_hf", "HFPatch", "shard_batch", "shift_labels", "causal_lm_loss", "causal_lm_loss_from_hidden",
           "IGNORE_INDEX", "ATTN_IMPLEMENTATION", "MODEL_FAMILIES", "sliding_window_size", "refuse_unsupported",
           "to_compute_dtype"]

ATTN_IMPLEMENTATION = "ring_attn"
IGNORE_INDEX = -100
# transformers model types (``transformers.models.<type>.modeling_<type>``) whose ``apply_rotary_pos_emb`` is HF's
# half-split rotation of the first ``cos.shape[-1]`` dims (all of them, or Phi-3's partial rotary), so that
# fused_rope=True replaces it by the fused kernel. Each one is tested whole against its stock model
# (tests/test_hf.py). Other models still get the attention and the ring; their RoPE stays transformers' own.
MODEL_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3", "phi3",
                  "granite", "olmo2")
_FAMILY_MODULES = tuple(f"transformers.models.{f}.modeling_{f}" for f in MODEL_FAMILIES)
# transformers < 4.53 modeling modules whose decoder layers slice the 4-D mask themselves (Gemma 2's sliding
# layers): a 2-D padding mask cannot be handed on there
_MASK_4D_LAYERS = ("transformers.models.gemma2.modeling_gemma2",)
# attribute on the cos table of a model running ring_attn: (position_ids, inv_freq, attention_scaling), or _TABLES
# (fuse with the tables as they are); tables without it are rotated by stock apply_rotary_pos_emb
_ROPE_TAG = "_ring_attn_rope"
_TABLES = "tables"
_OWNED = "_ring_attn_model"  # set on the rotary modules of the model given to patch_hf (undone by undo)
# how to run the patch on one device inside a distributed job (every rank its own batch, or sampling on one rank)
_ONE_DEVICE = ("undo the patch, or patch with a one-rank group: patch_hf(model, "
               "torch.distributed.new_subgroups(group_size=1)[0])")


class _State:
    """What the active patch decided: read by the attention and RoPE replacements."""

    def __init__(self, group, layout: str, fused_rope: bool):
        self.layout, self.fused_rope = layout, fused_rope
        self.rotary_checked: set = set()  # modeling modules whose rotary classes were found wrapped (ring mode)
        self.rank, self.world = _rank_world(group)
        # held weakly: a patch left active until the script ends must not keep the group (and gloo's threads)
        # alive past destroy_process_group, into interpreter exit
        self._group = weak_group(group, "patch_hf")
        # under torch.compile these run eagerly: one graph break per call, instead of one at every collective
        # inside (the ring's P2P exchanges cannot be traced). Made here, not at import: patch_hf has imported
        # transformers, which loads torch._dynamo, so importing ring_attn does not pay for it.
        self.ring_func = torch.compiler.disable(ring_attn.ring_attn_func)
        self.ring_varlen_func = torch.compiler.disable(ring_attn.ring_attn_varlen_func)
        self.agree = torch.compiler.disable(_agree_over_ring)
        self.global_max = torch.compiler.disable(_global_max)
        self.forwards = 0  # ring mode: model forwards begun (counted by the rotary embedding, once per forward)
        # attention calls of a reentrant-checkpointed forward (training, grad off) whose recompute in the backward
        # has not run yet: undo() with any pending warns (the recompute would run stock attention)
        self.pending_recompute = 0
        # whether the current model forward records a graph (set by the rotary embedding, which runs outside the
        # checkpointed layers): a forward under torch.no_grad() is never recomputed, so its calls do not count
        self.forward_records = True
        self.pending_failure: Optional[BaseException] = None  # raised by the next ring attention call
        self.next_forward = torch.compiler.disable(self._next_forward)

    def _next_forward(self) -> None:
        self.forwards += 1

    @property
    def group(self):
        """The patch's process group (None: the default group); RuntimeError once it was destroyed."""
        return self._group()


_active: Optional[_State] = None


def _rank_world(group) -> tuple[int, int]:
    import torch.distributed as dist

    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("group was given but torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


# ---------------------------------------------------------------------------------------------------------
# Refusals: each names the setting it refuses.


def sliding_window_size(sliding_window: Optional[int], longest: int, causal: bool = True) -> tuple[int, int]:
    """The kernels' ``window_size=(left, right)`` for a transformers ``sliding_window``.

    transformers' masks (``sliding_window_overlay``: key ``j`` kept for query ``i`` iff ``i - j < sliding_window``;
    5.x ``flash_attention_2`` passes ``(sliding_window - 1, sliding_window - 1)``) let a query see itself and the
    ``sliding_window - 1`` keys before it, so ``left = sliding_window - 1``; causal attention has ``right = 0``
    (a non-causal module gets the symmetric window, as flash_attention_2 gives it). A window that cannot cut
    (``longest <= sliding_window``) is dropped: ``(-1, -1)``, the plain causal kernel.

    Args:
        sliding_window: the window the attention module passes (None: full attention). Which layers get one is
            the model's decision (Mistral: ``config.sliding_window`` on every layer; Qwen2: layers at index
            ``>= config.max_window_layers`` when ``config.use_sliding_window``; 5.x: ``config.layer_types``).
        longest: the longest key range one query can reach: the global sequence length, the longest packed
            sequence, or the cache length during generation.
        causal: whether the attention is causal.

    Returns:
        ``(left, right)`` ints, -1 meaning unbounded.

    Raises:
        ValueError: ``sliding_window`` is not None and not a positive int.
    """
    if sliding_window is None:
        return (-1, -1)
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window!r} (config.sliding_window): expected None or a positive "
                         f"int (a query sees itself and the sliding_window - 1 keys before it)")
    if longest <= sliding_window:
        return (-1, -1)
    left = sliding_window - 1
    return (left, 0 if causal else left)


def refuse_unsupported(module, dropout, kwargs, who: str = f"attn_implementation='{ATTN_IMPLEMENTATION}'",
                       dropout_ok: bool = False) -> None:
    """NotImplementedError naming the setting, for what an AttentionInterface entry here cannot do:
    ``output_attentions``, attention dropout in training (unless ``dropout_ok``: on one device the kernels
    apply it), attention sinks (``s_aux``). ``who`` names the entry."""
    if kwargs.get("output_attentions") or getattr(getattr(module, "config", None), "output_attentions", False):
        raise NotImplementedError(f"output_attentions=True: {who} never materializes attention probabilities; "
                                  f"use attn_implementation='eager' to inspect them")
    if dropout and not dropout_ok:
        raise NotImplementedError(f"attention dropout={dropout} (config.attention_dropout) in training: {who} has "
                                  f"no dropout over the ring (one device has it); set config.attention_dropout=0")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"attention sinks (s_aux): not implemented by {who}")


def to_compute_dtype(q, k, v):
    """``q, k, v`` in the dtype attention computes in: the autocast dtype under autocast, else their promoted
    dtype (transformers may hand over fp32 queries next to bf16 keys)."""
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return tuple(x.to(dtype) for x in (q, k, v))


# ---------------------------------------------------------------------------------------------------------
# Packed sequences


def _packed_cu_seqlens(position_ids: torch.Tensor, batch: int) -> Optional[tuple[torch.Tensor, int]]:
    """Boundaries of the sequences packed in ``position_ids`` ``[b, s]`` (a new sequence starts wherever the
    position does not follow its predecessor by one, and at every row): (cu_seqlens int32, longest), or None
    when every row holds one sequence. Cached on the tensor (one host sync per forward, not per layer)."""
    cache = tensor_cache(position_ids)  # (emptied when the buffer is rewritten in place)
    if ("cu", batch) in cache:
        return cache[("cu", batch)]
    pos = position_ids.expand(batch, -1)
    starts = _sequence_starts(pos)
    result = None
    if bool(starts[:, 1:].any()):
        idx = starts.reshape(-1).nonzero().reshape(-1)
        total = pos.numel()
        cu = torch.cat([idx, idx.new_tensor([total])]).to(torch.int32)
        result = (cu, int((cu[1:] - cu[:-1]).max()))
    cache[("cu", batch)] = result
    return result


def _assert_not_packed(position_ids: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
    """Under torch.compile: a device-side check (no host read, no graph break) that ``position_ids`` hold one
    sequence per row; packed sequences must come with their boundaries there. With a padding mask ``keep``
    the positions of padded batches may restart (left padding): checked only where ``keep`` pads nothing."""
    restarts = _sequence_starts(position_ids)[:, 1:].any()
    if keep is not None:
        restarts = restarts & keep.all()
    torch._assert_async(~restarts, "ring_attn under torch.compile: position_ids restart inside a row (packed "
                        "sequences) but no cu_seq_lens_q reached attention; pass the boundaries (e.g. "
                        "DataCollatorWithFlattening(return_flash_attn_kwargs=True)) or run eagerly")


def _longest(cu: torch.Tensor, given, which: str) -> int:
    """``max_length_<which>`` as an int; when the caller passed ``cu_seq_lens_<which>`` without it, the longest
    sequence of ``cu`` (a host read; under torch.compile a ValueError naming the missing argument instead)."""
    if given is not None:
        return int(given)
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"cu_seq_lens_{which} must be a 1-D int32 tensor of sequence boundaries, got "
                         f"{type(cu).__name__ if not isinstance(cu, torch.Tensor) else tuple(cu.shape)}")
    if torch.compiler.is_compiling():
        raise ValueError(f"cu_seq_lens_{which} was passed without max_length_{which}: under torch.compile pass both "
                         f"(e.g. DataCollatorWithFlattening(return_flash_attn_kwargs=True) does)")
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def _mask_width_error(columns: int, keys: int) -> ValueError:
    """A 2-D attention_mask whose width is not the number of keys (cached and new) the queries see."""
    return ValueError(f"attention_mask covers {columns} tokens, but the queries see {keys} (the cached and the new "
                      f"ones): expected an attention_mask of {keys} columns")


def _refuse(state: _State, error: BaseException) -> None:
    """Refuse the current forward: at once on one device; in ring mode through the ranks' agreement (the next ring
    attention call raises it after the exchange, on every rank), so that no rank raises alone while the others
    wait for it."""
    if state.world == 1:
        raise error
    state.pending_failure = error


def _refuse_ring_cache(state: _State, detail: str = "") -> None:
    raise _ring_cache_error(state, detail)


def _ring_cache_error(state: _State, detail: str = "") -> NotImplementedError:
    return NotImplementedError(
        f"a KV cache (use_cache=True{detail}) with ring attention over {state.world} ranks: the cache would hold "
        f"this rank's shard only; pass use_cache=False (patch_hf(model, group) sets config.use_cache=False), and "
        f"generate on one device ({_ONE_DEVICE})")


# ---------------------------------------------------------------------------------------------------------
# The attention function (transformers' AttentionInterface signature)


def _padding(attention_mask, kv_len: int) -> tuple[Optional[torch.Tensor], int]:
    """The 2-D keep-mask ``[b, n]`` (True = real token) when it masks anything, else None; and ``n``, the number
    of keys to use: ``kv_len``, or fewer when the mask is shorter (flash_attention_2's convention: a static
    cache's filled slots are its first ``n``, see :func:`ring_attn_mask`). Computed once per mask tensor and
    length (every layer of a forward gets the same mask object: one host read per forward, not one per layer).
    Under torch.compile the mask whenever there is one (no host read)."""
    if attention_mask is None:
        return None, kv_len
    if attention_mask.dim() != 2:
        raise NotImplementedError(
            f"a {attention_mask.dim()}-D attention_mask {tuple(attention_mask.shape)}: attn_implementation="
            f"'ring_attn' implements causal attention with a 2-D padding mask only (custom 4-D masks, and on "
            f"transformers < 4.53 generate's mask for a static cache, are not supported)")
    compiling = torch.compiler.is_compiling()
    cache = None if compiling else tensor_cache(attention_mask)
    if cache is not None and ("keep", kv_len) in cache:
        return cache[("keep", kv_len)]
    mask = attention_mask[:, -kv_len:].bool()
    if compiling:  # whether it pads needs a host read: padded_attention's op finds out (no graph break)
        return mask, mask.shape[1]
    found = (None if bool(mask.all()) else mask), mask.shape[1]
    if cache is not None:
        cache[("keep", kv_len)] = found
    return found


_AGREE_FIELDS = 6  # failed, packed, positions not a shard, then the per-row offsets' max, min and weighted sum


def _position_stats(position_ids: torch.Tensor, expected: torch.Tensor, starts: torch.Tensor,
                    compared: Optional[list[bool]] = None) -> list[int]:
    """``[not a shard, max, min, weighted sum of the offsets]`` of ``position_ids`` against the ``expected``
    shard of the global positions counted from 0 (``-1``: padding the layout added, not checked), both
    ``[rows, n]``: within each run (a row, or a packed sequence: ``starts`` marks each run's first element) the
    positions must be the expected ones plus one offset, and the offsets must agree across ranks. ``compared``
    (one flag per run, the same on every rank): the runs whose offsets enter the cross-rank statistics, the others
    count as 0 there (a run that is only padding on some rank has no offset there)."""
    diff = position_ids.long() - expected
    run = torch.cumsum(starts.reshape(-1).long(), 0) - 1  # the run of each element
    offsets = diff.reshape(-1)[starts.reshape(-1).nonzero().reshape(-1)]
    if compared is not None:
        offsets = offsets * torch.tensor(compared, device=offsets.device)
    real = expected.reshape(-1) >= 0
    bad = ((diff.reshape(-1) != offsets[run]) & real).any().long()
    weights = torch.arange(1, offsets.numel() + 1, device=offsets.device)
    return torch.stack([bad, offsets.max(), offsets.min(), (offsets * weights).sum()]).tolist()


def _pieces_real_everywhere(counted: torch.Tensor, cu: list[int], firsts: list[int], state: _State) -> list[bool]:
    """For each packed sequence with a local piece (its first local element at ``firsts``, the same on every rank):
    whether every rank's piece starts with a real token, not only the padding the layout adds to a sequence it
    cannot split (e.g. a 1-token sequence over 2 ranks); computed alike on every rank, on the host."""
    real, counted = torch.ones(len(firsts), dtype=torch.bool), counted.cpu()
    for r in range(state.world):
        shard = ring_layout.varlen_shard_for_rank(counted, cu, r, state.world, 0, state.layout, pad_value=-1)
        real &= shard[firsts] >= 0
    return real.tolist()


def _agree_over_ring(state: _State, anchor: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                     s_local: int, packed: bool, failure: Optional[BaseException], device: torch.device,
                     cu: Optional[torch.Tensor] = None) -> None:
    """Ring mode, before any K/V moves: one small all-gather in which every rank says whether its own checks of
    this call failed, whether it runs packed sequences, and (dense calls) whether its ``position_ids`` are its
    layout shard of one sequence, each row's offset from the global positions (the same on every rank, else
    a rank numbered its shard on its own, e.g. from 0). Every rank raises if any fails, so none waits in the ring
    for one that raised. Once per forward for a given ``position_ids`` tensor (the layers of a forward share it;
    a buffer rewritten in place is checked again), counted alike on every rank by :attr:`_State.forwards`;
    ``anchor`` (position_ids, else cu_seq_lens_q) holds that record; ``device``: the queries' (NCCL's)."""
    cache = None if anchor is None else tensor_cache(anchor)
    key = ("ring agreed", id(state), state.forwards, s_local)
    if cache is not None and key in cache:
        if failure is not None:
            # a later layer of a forward the ranks agreed on, refused on this rank only: the others are in the
            # ring call's own signature exchange, which this rank joins as failed, so they raise instead of waiting
            raise_with_the_group(failure, state.group, torch.empty(0, device=device), *ring_signature_kind(packed))
        return
    sig = [int(failure is not None), int(packed)] + [0] * (_AGREE_FIELDS - 2)
    if failure is None and not packed and position_ids is not None:
        expected = ring_layout.shard_positions(s_local * state.world, state.rank, state.world, state.layout,
                                               device=position_ids.device).reshape(1, -1)
        if expected.shape[-1] != s_local or position_ids.numel() % s_local:
            sig[2:] = [1, 0, 0, 0]  # not this layout's shard length (e.g. another layout's odd shards)
        else:
            rows = position_ids.reshape(-1, s_local)
            expected = expected.expand(rows.shape[0], -1)
            starts = torch.zeros_like(expected, dtype=torch.bool)
            starts[:, 0] = True  # one run per row
            sig[2:] = _position_stats(rows, expected, starts)
    elif failure is None and packed and position_ids is not None and cu is not None:
        # packed: each sequence a run of positions (any start), sharded by the layout; padding unchecked
        vals = [int(c) for c in cu.tolist()]
        counted = torch.cat([torch.arange(b - a, device=position_ids.device) for a, b in zip(vals[:-1], vals[1:])]
                            + [torch.zeros(0, dtype=torch.long, device=position_ids.device)])
        expected = ring_layout.varlen_shard_for_rank(counted, vals, state.rank, state.world, 0, state.layout,
                                                     pad_value=-1)
        padded = ring_layout.varlen_padded_cu_seqlens(vals, state.world, state.layout)
        local = [c // state.world for c in padded]
        firsts = [a for a, b in zip(local[:-1], local[1:]) if b > a]  # each sequence's local piece
        starts = torch.zeros(expected.numel(), dtype=torch.bool, device=position_ids.device)
        starts[firsts] = True
        if position_ids.numel() != expected.numel() or not firsts:
            sig[2:] = [1, 0, 0, 0]
        else:
            # boundaries the layout did not pad (shard_batch's): every piece is real on every rank
            compared = None if padded == vals else _pieces_real_everywhere(counted, vals, firsts, state)
            sig[2:] = _position_stats(position_ids.reshape(1, -1), expected[None], starts[None], compared)
    sigs = all_gather_ints(state.group, str(dist.get_backend(state.group)).lower(), device, sig, failure)
    if any(g[0] == _GLOBAL_MAX_CODE for g in sigs):  # those ranks are in their rotary embedding's exchange
        raise _rotary_mismatch([r for r, g in enumerate(sigs) if g[0] == _GLOBAL_MAX_CODE], state.world)
    failed = [r for r, g in enumerate(sigs) if g[0]]
    if failed:
        raise ValueError(f"attn_implementation='ring_attn': rank(s) {failed} of {state.world} raised on this call "
                         f"(see their error); every rank raises so that none waits in the ring")
    if len({g[1] for g in sigs}) > 1:
        raise ValueError(f"attn_implementation='ring_attn': packed sequences (cu_seq_lens_q) on rank(s) "
                         f"{[r for r, g in enumerate(sigs) if g[1]]} but not on the others; shard every rank's batch "
                         f"with ring_attn.integrations.hf.shard_batch")
    if any(g[2] for g in sigs) or len({tuple(g[3:]) for g in sigs}) > 1:
        s_global = s_local * state.world
        hint = ""
        if sig[2] and bool((position_ids.reshape(-1, s_local).diff(dim=-1) < 0).any()):
            hint = ("; these position_ids restart, as packed sequences do, but the model passed no cu_seq_lens_q "
                    "to attention: under gradient checkpointing some transformers versions (4.48 does) call the "
                    "decoder layers without the attention kwargs, so there disable gradient checkpointing or "
                    "upgrade transformers")
        shards = [r for r, g in enumerate(sigs) if g[2]]
        offsets = {r: (g[4], g[3]) for r, g in enumerate(sigs) if not g[2]}
        what = (f"the packed sequences of cu_seq_lens_q {[int(c) for c in cu.tolist()][:6]}" if packed and cu is not
                None else f"one sequence of {s_global} tokens")
        raise ValueError(
            f"position_ids {None if position_ids is None else tuple(position_ids.shape)} are not a "
            f"{state.layout!r} shard of {what} over {state.world} ranks (not a shard on rank(s) {shards}; offsets "
            f"from the global "
            f"positions, (lowest, highest) per rank, must agree: {offsets}): shard the batch with "
            f"ring_attn.integrations.hf.shard_batch(batch, group, layout={state.layout!r}) and pass its "
            f"position_ids (packed sequences need the cu_seq_lens_q it returns){hint}. If every rank runs its own "
            f"batch (data parallelism), this is not a ring: {_ONE_DEVICE}")
    if cache is not None:
        cache[key] = True


def _track_recompute(state: _State, module, query) -> None:
    """Count attention calls whose layer will be recomputed in the backward (reentrant gradient checkpointing
    runs the forward in training mode with grad off and the layer's parameters requiring grad), and their
    recomputes (a call made by the autograd engine), so that ``undo()`` can warn when a recompute is still to
    come: it would run stock attention on the masks prepared for ring_attn. Eager mode only."""
    if torch.compiler.is_compiling() or not getattr(module, "training", False) or not state.forward_records:
        return
    if torch._C._current_graph_task_id() != -1:  # inside a backward: a recompute
        state.pending_recompute = max(0, state.pending_recompute - 1)
    elif not torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        state.pending_recompute += 1


def ring_attn_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                                is_causal: Optional[bool] = None, **kwargs):
    """transformers ``AttentionInterface`` entry for ``attn_implementation="ring_attn"``.

    Args:
        module: the attention module (reads ``is_causal``, ``config``).
        query: ``[b, h_q, s_q, d]``; key, value: ``[b, h_kv, s_k, d]`` (transformers' layout), any float dtype
            (cast to the autocast dtype when autocast is on).
        attention_mask: None, or the 2-D padding mask our mask function returned (shorter than the keys for a
            static cache: then only its first keys, the filled slots, are attended).
        dropout, scaling, sliding_window, is_causal: as transformers passes them.
        kwargs: ``position_ids``, ``cu_seq_lens_q`` / ``max_length_q`` (packed sequences), ``use_cache``,
            ``softcap`` (logit soft-capping, e.g. Gemma 2's ``attn_logit_softcapping``; None or 0: off) ...

    ``sliding_window`` becomes the kernels' ``window_size=(sliding_window - 1, 0)`` (see
    :func:`sliding_window_size`), on one device and over the ring, in training and with a KV cache.

    Returns:
        ``(attn_output [b, s_q, h_q, d], None)``.

    Raises:
        NotImplementedError naming the setting (output_attentions, dropout in ring mode, attention sinks
        ``s_aux``, padding in a sharded sequence, a KV cache in ring mode, 4-D masks, a sliding window over a
        padding mask with holes, a rotary embedding class imported after the patch in ring mode); ValueError for
        position_ids that are not a layout shard in ring mode, a ``sliding_window`` that is not a positive int, a
        negative ``softcap``.
    """
    state = _active
    if state is None:
        raise RuntimeError("attn_implementation='ring_attn' is used but the ring_attn patch was undone; call "
                           "ring_attn.integrations.hf.patch_hf() again or switch the model back")
    _track_recompute(state, module, query)
    if state.world > 1:
        return _ring_attention(state, module, query, key, value, attention_mask, dropout, scaling, sliding_window,
                               is_causal, kwargs)
    refuse_unsupported(module, dropout, kwargs, dropout_ok=True)
    dropout = float(dropout or 0.0)  # one device: the kernels' attention dropout (flash-attn's dropout_p)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    softcap = kwargs.get("softcap")
    softcap = 0.0 if softcap is None else softcap  # the kernels validate it (ValueError naming softcap)
    q, k, v = to_compute_dtype(*(x.transpose(1, 2) for x in (query, key, value)))  # [b, s, h, d] views
    b, s_q, h_q, d = q.shape
    keep, s_k = _padding(attention_mask, k.shape[1])
    if s_k < k.shape[1]:  # a static cache: its first s_k slots are filled
        k, v = k[:, :s_k], v[:, :s_k]
    position_ids = kwargs.get("position_ids")
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    cu_k, max_len_k = kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_k")
    if cu is not None and keep is not None:
        if torch.compiler.is_compiling():  # whether the mask pads needs a host read: checked on the device
            torch._assert_async(keep.all(), "attn_implementation='ring_attn' under torch.compile: an attention_mask "
                                "with padding together with cu_seq_lens_q; pass one or the other, or run eagerly")
        else:
            cu = None  # a mask that pads wins over the packing kwargs, as in transformers' flash_attention_2
    if cu is None and s_q == s_k and position_ids is not None and position_ids.dim() == 2:
        if torch.compiler.is_compiling():  # finding the boundaries needs a host read: check instead
            _assert_not_packed(position_ids, keep)
        elif keep is None:  # (with padding the mask says where the sequences are)
            found = _packed_cu_seqlens(position_ids, b)
            if found is not None:
                cu, max_len = found
    if cu is not None:
        if cu_k is None:  # self-attention over packed sequences: the keys' boundaries are the queries'
            cu_k, max_len_k = cu, max_len
        max_len, max_len_k = _longest(cu, max_len, "q"), _longest(cu_k, max_len_k, "k")
        window = sliding_window_size(sliding_window, max(int(max_len), max_len_k), causal)
        out = ring_attn.flash_attn_varlen_func(
            q.reshape(b * s_q, h_q, d), k.reshape(b * s_k, -1, d), v.reshape(b * s_k, -1, d),
            cu_seqlens_q=cu, cu_seqlens_k=cu_k, max_seqlen_q=int(max_len), max_seqlen_k=max_len_k,
            dropout_p=dropout, causal=causal, softmax_scale=scaling, window_size=window, softcap=softcap)
        return out.reshape(b, s_q, h_q, d), None
    window = sliding_window_size(sliding_window, s_k, causal)
    if keep is not None:
        # padded rows gathered into packed sequences inside one custom op (its host reads stay out of graphs)
        return ring_attn.padded_attention(q, k, v, keep, dropout, scaling, causal, window, softcap), None
    # s_q != s_k (a KV cache): bottom-right causal, query i sees keys j <= i + s_k - s_q and, with a window,
    # j >= i + s_k - s_q - (sliding_window - 1)
    return ring_attn.flash_attn_func(q, k, v, dropout_p=dropout, causal=causal, softmax_scale=scaling,
                                     window_size=window, softcap=softcap), None


def _ring_attention(state: _State, module, query, key, value, attention_mask, dropout, scaling, sliding_window,
                    is_causal, kwargs):
    """:func:`ring_attn_attention_forward` over the ring: this rank's own checks, then their agreement over the
    group (:func:`_agree_over_ring`: a rank whose checks failed still joins it, so every rank raises instead of
    waiting in the ring for one that did not come), then the ring call."""
    position_ids, cu = kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q")
    s_q, failure = query.shape[2], None
    try:
        if state.pending_failure is not None:  # found by the mask creator of this forward
            failure, state.pending_failure = state.pending_failure, None
            raise failure
        refuse_unsupported(module, dropout, kwargs)
        causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        softcap = kwargs.get("softcap")
        softcap = 0.0 if softcap is None else softcap  # the kernels validate it (ValueError naming softcap)
        q, k, v = to_compute_dtype(*(x.transpose(1, 2) for x in (query, key, value)))  # [b, s, h, d] views
        b, s_q, s_k = q.shape[0], q.shape[1], k.shape[1]
        _check_rotary_patched(module, state)
        keep, s_kept = _padding(attention_mask, s_k)
        if kwargs.get("use_cache") or s_q != s_k or s_kept != s_k:
            _refuse_ring_cache(state, f", s_q={s_q} != s_k={s_k}" if s_q != s_k else "")
        if keep is not None:
            raise NotImplementedError(
                "attention_mask with padding inside a sequence sharded over the ring: pack the sequences instead "
                "(position_ids restarting at 0, see shard_batch), or drop the attention_mask (padding at the end "
                "with ignored labels needs no mask under causal attention)")
        if cu is not None:
            cu_k = kwargs.get("cu_seq_lens_k")
            if cu_k is not None and cu_k is not cu and not torch.equal(cu_k.cpu(), cu.cpu()):
                raise NotImplementedError(
                    f"cu_seq_lens_k {cu_k.tolist()[:6]} differs from cu_seq_lens_q {cu.tolist()[:6]}: over the ring "
                    f"packed sequences attend within themselves (shard_batch gives both the same boundaries)")
            max_len = _longest(cu, kwargs.get("max_length_q"), "q")
            window = sliding_window_size(sliding_window, max_len, causal)
            if b != 1:
                raise ValueError(f"packed sequences (cu_seq_lens_q) need batch size 1, got query "
                                 f"{tuple(query.shape)}")
        else:
            window = sliding_window_size(sliding_window, s_q * state.world, causal)
    except (NotImplementedError, ValueError, TypeError) as e:
        failure = e
    state.agree(state, position_ids if position_ids is not None else cu, position_ids, s_q, cu is not None,
                failure, query.device, cu)
    if cu is not None:
        out = state.ring_varlen_func(
            q[0], k[0], v[0], cu_seqlens=cu, max_seqlen=max_len, causal=causal, softmax_scale=scaling,
            window_size=window, softcap=softcap, group=state.group, layout=state.layout)
        return out.unsqueeze(0), None
    out = state.ring_func(q, k, v, causal=causal, softmax_scale=scaling, window_size=window, softcap=softcap,
                          group=state.group, layout=state.layout)
    return out, None


# ---------------------------------------------------------------------------------------------------------
# Mask function (transformers >= 4.53's AttentionMaskInterface)

_OK_MASK_PARTS = ("causal_mask_function", "sliding_window_overlay", "remap_positions_for_packed_sequence",
                  "packed_sequence_mask_function", "padding_mask_function", "and_masks")


def _mask_leaves(fn, seen=None) -> list[str]:
    """Qualified names of the functions a transformers mask function is built from (walking closures)."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return []
    seen.add(id(fn))
    names = [fn.__qualname__ if hasattr(fn, "__qualname__") else repr(fn)]  # (repr only when needed: traceable)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            val = cell.cell_contents
        except ValueError:
            continue
        for item in (val if isinstance(val, (tuple, list)) else (val,)):
            if callable(item) and hasattr(item, "__qualname__") and not isinstance(item, torch.Tensor):
                names += _mask_leaves(item, seen)
    return names


# transformers' mask creators whose masks the kernels implement (causal, sliding window, with packing and padding)
# when the caller adds no mask of its own (the arguments below, where the version has them)
_MASK_CREATORS = ("create_causal_mask", "create_sliding_window_causal_mask")
_EXTRA_MASK_ARGS = ("or_mask_function", "and_mask_function", "block_sequence_ids")
# .plain is True (in this thread) while such a creator runs with no extra mask: ring_attn_mask then needs no walk
# over the mask function's closures (which torch.compile cannot trace: a graph break per forward)
_mask_creation = threading.local()


def _make_mask_creator(original):
    signature = inspect.signature(original)
    params = list(signature.parameters)
    extra = [(params.index(n), n) for n in _EXTRA_MASK_ARGS if n in params]
    config_at = (params.index("config"), "config")
    cache_args = [(params.index(n), n) for n in ("cache", "past_key_values") if n in params]  # 5.24 says cache
    embeds_at = next(((params.index(n), n) for n in ("inputs_embeds", "input_embeds") if n in params), None)
    mask_at = (params.index("attention_mask"), "attention_mask") if "attention_mask" in params else None

    def create(*args, **kwargs):
        def arg(i, name):
            return args[i] if i < len(args) else kwargs.get(name)

        plain = all(arg(i, n) is None for i, n in extra)
        # a cache in ring mode is refused here, before any layer: transformers 4.53-4.57 pass neither use_cache nor
        # the cache to the attention function, so a first call with use_cache=True would fill a cache with this
        # rank's shard
        state, config = _active, arg(*config_at)
        if (state is not None and state.world > 1 and any(arg(*c) is not None for c in cache_args)
                and getattr(config, "_attn_implementation", None) == "ring_attn"):
            # raised by the first attention call, after the ranks' agreement, so that the others raise too
            state.pending_failure = _ring_cache_error(state)
        if state is not None and embeds_at and mask_at and getattr(config, "_attn_implementation", None) == \
                "ring_attn" and all(arg(*c) is None for c in cache_args):
            # no cache: a 2-D mask must cover exactly the input (stock fails with a shape error on a longer one, the
            # mask function would keep its last columns)
            mask, embeds = arg(*mask_at), arg(*embeds_at)
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and isinstance(embeds, torch.Tensor) and \
                    embeds.dim() >= 2 and mask.shape[1] > embeds.shape[1]:
                _refuse(state, _mask_width_error(mask.shape[1], embeds.shape[1]))
        previous = getattr(_mask_creation, "plain", False)
        _mask_creation.plain = plain
        try:
            return original(*args, **kwargs)
        finally:
            _mask_creation.plain = previous

    create.__signature__ = signature
    create.__name__, create.__qualname__, create.__doc__ = original.__name__, original.__qualname__, original.__doc__
    create._ring_attn_original = original
    return create


def ring_attn_mask(batch_size: int, q_length: Optional[int] = None, kv_length: Optional[int] = None, q_offset=0,
                   kv_offset=0, mask_function=None, attention_mask: Optional[torch.Tensor] = None,
                   cache_position: Optional[torch.Tensor] = None, **kwargs):
    """transformers ``AttentionMaskInterface`` entry for ``"ring_attn"``.

    The kernels apply causal masking themselves (packed sequences come from position_ids / cu_seq_lens and the
    sliding window from the attention call's ``sliding_window``), so the plain causal case returns None, like
    ``flash_attention_2``'s. Anything else is kept or refused, never dropped. Takes both signatures of the
    interface: ``q_length``/``q_offset`` (transformers 5.x) and ``cache_position`` (4.53 to 4.57: the int64
    positions ``[q_length]`` of the queries).

    Returns:
        None, or the 2-D bool padding mask ``[batch, kv_length]`` (True = real token) when it masks anything;
        with a static cache (queries ending before ``kv_length``), the mask ``[batch, filled]`` of the filled
        slots, always.

    Raises:
        NotImplementedError: a mask pattern the kernels cannot express (bidirectional, chunked, block-wise or
            custom ``or``/``and`` masks), queries past the last key (other than one query seeing every key), or a
            static cache's attention_mask that covers neither the filled keys nor every slot.
    """
    if mask_function is None or getattr(_mask_creation, "plain", False):
        names = ["causal_mask_function"]  # a causal / sliding-window creator with no extra mask: nothing to walk
    else:
        names = _mask_leaves(mask_function)
    bad = [n for n in names if not any(n == ok or n.startswith(ok + ".") for ok in _OK_MASK_PARTS)]
    if bad:
        raise NotImplementedError(f"attn_implementation='ring_attn' implements causal masks (with packed "
                                  f"sequences and padding) only; this model asks for a mask built from {bad}")
    kv_end = int(kv_offset) + int(kv_length)
    # stock masks let query position p see keys j <= p; the kernels align bottom-right (query i of q_length sees
    # local key j <= i + kv_length - q_length). The same keys when the queries are the last keys, or when a single
    # query sees every key (4.x Phi-3 drops its cache at the LongRoPE switch and runs the next token alone). A
    # static cache hands over all kv_length slots, filled up to the queries' end only: the mask then covers the
    # filled keys (flash_attention_2's convention) and the attention uses just those.
    if cache_position is not None:  # 4.53-4.57: the int64 positions of the queries
        q_length, q_start = cache_position.shape[0], cache_position[0]
    else:
        q_start = q_offset
    if attention_mask is not None:
        attention_mask = attention_mask[:, -int(kv_length):].bool()
    if torch.compiler.is_compiling() and isinstance(q_start, torch.Tensor):
        if attention_mask is not None and attention_mask.shape[1] < kv_length and int(kv_offset) == 0:
            end = attention_mask.shape[1]  # a static cache (the mask's length is a static shape here)
            torch._assert_async(q_start + q_length == end, "attn_implementation='ring_attn': the attention_mask "
                                "does not end at the last query (a static cache needs a mask up to the queries)")
            return attention_mask
        same = q_start + q_length == kv_end
        torch._assert_async(same | (q_start >= kv_end - 1) if q_length == 1 else same,
                            "attn_implementation='ring_attn': the queries are not the last keys of the cache (a "
                            "static cache?) and no attention_mask says which keys are filled")
        # whether it pads needs a host read: the attention's op finds out
        return attention_mask
    q_start = int(q_start)
    if int(kv_offset) == 0 and q_start + q_length < kv_end and q_start >= 0:
        return _static_cache_mask(attention_mask, batch_size, q_start + q_length, int(kv_length),
                                  kwargs.get("device", cache_position.device if cache_position is not None else None))
    if attention_mask is not None and q_start == 0 and int(kv_offset) == 0 and q_length > kv_end:
        raise _mask_width_error(int(kv_length), q_length)
    if not (q_start + q_length == kv_end or (q_length == 1 and q_start >= kv_end - 1)):
        raise NotImplementedError(
            f"queries at offset {q_start} (+{q_length}) are not the last of {int(kv_length)} keys at offset "
            f"{int(kv_offset)}: attn_implementation='ring_attn' aligns causal masks bottom-right")
    if attention_mask is None or torch.compiler.is_compiling():  # (whether it pads needs a host read)
        return attention_mask
    if attention_mask.shape[1] != kv_length:
        raise _mask_width_error(attention_mask.shape[1], int(kv_length))
    return None if (attention_mask.shape[1] == kv_length and bool(attention_mask.all())) else attention_mask


def _static_cache_mask(attention_mask, batch_size: int, filled: int, kv_length: int, device) -> torch.Tensor:
    """The 2-D keep-mask ``[batch, filled]`` of a static cache whose first ``filled`` of ``kv_length`` slots hold
    keys (the rest are empty slots no query may see): the caller's mask when it covers exactly the filled keys
    (what ``generate`` passes) or all ``kv_length`` slots (then cut), else all True. Returned even when it masks
    nothing: its length tells the attention how many keys to use."""
    if attention_mask is None:
        if device is None:
            raise NotImplementedError("a static cache without an attention_mask on transformers without the mask "
                                      "function's device argument: pass attention_mask")
        return torch.ones(batch_size, filled, dtype=torch.bool, device=device)
    if attention_mask.shape[1] == kv_length:
        return attention_mask[:, :filled]
    if attention_mask.shape[1] != filled:
        raise NotImplementedError(f"a static cache of {kv_length} slots holds {filled} keys, but the "
                                  f"attention_mask covers {attention_mask.shape[1]} (expected {filled} or "
                                  f"{kv_length}): attn_implementation='ring_attn' cannot tell which keys are real")
    return attention_mask


# ---------------------------------------------------------------------------------------------------------
# RoPE: rotary embedding (global sequence length) and the fused rotary application


_GLOBAL_MAX_CODE = -7  # first field of the global-length exchange; the agreement's is 0 or 1


def _rotary_mismatch(ranks: list[int], world: int) -> ValueError:
    return ValueError(f"attn_implementation='ring_attn': rank(s) {ranks} of {world} run a rotary embedding that "
                      f"recomputes its frequencies from the sequence length (rope type dynamic / longrope) and the "
                      f"other ranks do not: every rank of the ring must run the same model configuration")


def _global_max(position_ids: torch.Tensor, state: _State) -> torch.Tensor:
    """The largest position over the ring (the global length - 1), for rope types that pick their frequencies
    from it. Exchanged in a gather of the agreement's size, so that a rank whose model has no such rope type (its
    first collective of the forward is the agreement) pairs with it and both raise, instead of hanging."""
    backend = str(dist.get_backend(state.group)).lower()
    device = position_ids.device if backend == "nccl" else torch.device("cpu")
    mine = [_GLOBAL_MAX_CODE, int(position_ids.max())] + [0] * (_AGREE_FIELDS - 2)
    every = all_gather_ints(state.group, backend, device, mine)
    here = [r for r, g in enumerate(every) if g[0] == _GLOBAL_MAX_CODE]  # the ranks in this exchange
    if len(here) < len(every):
        raise _rotary_mismatch(here, len(every))
    return torch.tensor([max(g[1] for g in every)], dtype=torch.int64, device=position_ids.device)


def _seq_len_dependent(rope_type) -> bool:
    """Whether a rotary embedding's ``rope_type`` (a str, or a dict per layer type as in Gemma 3) recomputes its
    frequencies from the sequence length, i.e. from ``max(position_ids) + 1``."""
    types = rope_type.values() if isinstance(rope_type, Mapping) else (rope_type,)
    return any(isinstance(t, str) and any(d in t for d in LENGTH_DEPENDENT_ROPE_TYPES) for t in types)


def _serves_ring_attn(rotary) -> bool:
    """Whether a rotary embedding belongs to a model that runs ``attn_implementation="ring_attn"``: the model given
    to :func:`patch_hf` (its rotary modules are marked), or one whose config names it (a model loaded with it while
    the patch is active). Every other model in the process (a stock teacher, an eval copy) keeps stock RoPE, with
    no collective, even though the rotary classes are shared."""
    if getattr(rotary, _OWNED, False):
        return True
    return getattr(getattr(rotary, "config", None), "_attn_implementation", None) == ATTN_IMPLEMENTATION


def _make_rotary_forward(original):
    def forward(self, *args, **kwargs):
        state = _active
        if state is None or not _serves_ring_attn(self):  # (any signature: e.g. Llama 4's vision rotary)
            return original(self, *args, **kwargs)
        return served(self, state, *args, **kwargs)

    def served(self, state, x, position_ids, *args, **kwargs):  # (no rotary takes an argument named state)
        if not torch.compiler.is_compiling():
            state.forward_records = torch.is_grad_enabled()
        if state.world > 1:
            state.next_forward()
        if state.world > 1 and _seq_len_dependent(getattr(self, "rope_type", "default")):
            # transformers picks these frequencies from max(position_ids) + 1; on a shard that is not the global
            # length. One extra column carrying the global maximum makes every rank pick what one device would.
            col = state.global_max(position_ids, state).reshape(1, 1).expand(position_ids.shape[0], 1)
            cos, sin = original(self, x, torch.cat([position_ids, col.to(position_ids.dtype)], dim=1),
                                *args, **kwargs)
            cos, sin = cos[:, :-1], sin[:, :-1]
        else:
            cos, sin = original(self, x, position_ids, *args, **kwargs)
        # the frequencies this call used, for the fused kernel: inv_freq, or (Gemma 3: one argument, the layer
        # type) <layer_type>_inv_freq; with any other extra argument the tables are used as they are
        extra = list(args) + list(kwargs.values())
        if not state.fused_rope:
            return cos, sin
        tag = _TABLES  # the fused kernel on these tables, unless the angles are known
        if len(extra) <= 1 and set(kwargs) <= {"layer_type"} and _fused_positions(position_ids):
            prefix = "" if not extra else f"{extra[0]}_" if isinstance(extra[0], str) else None
            inv_freq = None if prefix is None else getattr(self, f"{prefix}inv_freq", None)
            if isinstance(inv_freq, torch.Tensor):
                tag = (position_ids, inv_freq.detach().float().clone(),
                       float(getattr(self, f"{prefix}attention_scaling", 1.0)))
        setattr(cos, _ROPE_TAG, tag)
        return cos, sin

    forward._ring_attn_original = original
    return forward


def _fused_positions(position_ids) -> bool:
    """Whether the fused kernel takes these positions (integers in ``[0, MAX_POSITION)``,
    :func:`ring_attn.ops.rope.positions_in_range`). Others, float positions included, run on the model's own
    cos/sin tables, as stock: e.g. the ``attention_mask.cumsum(-1) - 1`` idiom puts -1 on left padding, which stock
    rotates by a negative angle (and the mask then hides). The range check is the kernel's own, once per tensor
    (one host read per forward, which the layers' fused calls then reuse); under torch.compile it is not made here
    (the op itself refuses such positions with ValueError)."""
    if not isinstance(position_ids, torch.Tensor):
        return True
    if position_ids.is_floating_point():  # stock takes float positions too; the kernel takes ints
        return False
    return torch.compiler.is_compiling() or positions_in_range(position_ids)


def _binder(signature: inspect.Signature):
    """``bind(args, kwargs) -> {name: value}`` for ``signature`` (defaults applied), as ``signature.bind`` but in
    plain Python that torch.compile traces: ``Signature.bind`` reads a mapping proxy, which fullgraph tracing refuses
    once the trace has changed any dict (Gemma 2/3 and Phi-3 calls). Calls it cannot map plainly (too many or
    unknown arguments, a name given twice, a missing one) go to ``signature.bind``, which raises stock's TypeError."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(signature.parameters.values())
    plain = all(p.kind in kinds for p in params)
    names = [p.name for p in params]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    def bind(args, kwargs) -> dict:
        arguments = dict(zip(names, args))
        if plain and len(args) <= len(names) and all(n in names and n not in arguments for n in kwargs):
            arguments.update(kwargs)
            for n in names:
                if n not in arguments and n in defaults:
                    arguments[n] = defaults[n]
            if len(arguments) == len(names):
                return {n: arguments[n] for n in names}  # the signature's order, as Signature.bind gives it
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    return bind


def _make_apply_rotary(original):
    # the stock signature: (q, k, cos, sin, position_ids=None, unsqueeze_dim=1) up to 4.x, (q, k, cos, sin,
    # unsqueeze_dim=1) in 5.x; arguments are bound to it, so positional calls mean what they meant. With the
    # `kernels` package installed, transformers >= 5.25 turns the function into an nn.Module (a hub-kernel
    # extension point) whose forward is the function and whose own signature is (*args, **kwargs)
    signature = inspect.signature(original.forward if isinstance(original, torch.nn.Module) else original)
    bind = _binder(signature)

    def apply_rotary_pos_emb(*args, **kwargs):
        state = _active
        if state is None or not state.fused_rope:
            return original(*args, **kwargs)
        arguments = bind(args, kwargs)
        q, k, cos, sin = list(arguments.values())[:4]
        unsqueeze_dim = arguments.get("unsqueeze_dim", 1)
        tag = getattr(cos, _ROPE_TAG, None)
        if tag is None:  # tables from a model that does not run ring_attn (or not from its rotary embedding)
            return original(*args, **kwargs)
        if isinstance(tag, str) or unsqueeze_dim != 1 or q.dim() != 4:
            # still the fused kernel, reading HF's tables (dims past cos.shape[-1] pass through, as in Phi-3)
            return ring_attn.apply_rope_cos_sin(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        positions, inv_freq, scaling = tag
        # q, k: [b, h, s, d] -> the kernel's [b, s, h, d] view; angles position * inv_freq formed in float64; the
        # first 2 * len(inv_freq) dims rotate (Phi-3's partial rotary), the rest pass through
        qr, kr = ring_attn.apply_rope(q.transpose(1, 2), k.transpose(1, 2), positions, inv_freq.to(q.device),
                                      attention_scaling=scaling)
        return qr.transpose(1, 2), kr.transpose(1, 2)

    apply_rotary_pos_emb.__signature__ = signature
    apply_rotary_pos_emb._ring_attn_original = original
    return apply_rotary_pos_emb


def _rotary_classes(module) -> list:
    """The rotary embedding classes (``*RotaryEmbedding`` torch modules) a modeling module defines or imports."""
    return [obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, torch.nn.Module)
            and obj.__name__.endswith("RotaryEmbedding")]


def _rotary_wrapped(cls) -> bool:
    return getattr(getattr(cls, "forward", None), "_ring_attn_original", None) is not None


def _check_rotary_patched(module, state: _State) -> None:
    """Ring mode: the rotary embedding of the model calling attention must be wrapped, or rope types that depend on
    the sequence length would pick different frequencies on different ranks (silently wrong)."""
    name = type(module).__module__
    if name in state.rotary_checked:
        return
    modeling = sys.modules.get(name)
    missing = [c.__qualname__ for c in _rotary_classes(modeling) if not _rotary_wrapped(c)] if modeling else []
    if missing:
        raise NotImplementedError(
            f"{', '.join(missing)} (module {name}) was imported after patch_hf, so ring attention cannot make its "
            f"frequencies follow the global sequence length on every rank; call patch_hf(model, group) after the "
            f"model is created")
    state.rotary_checked.add(name)


def _modeling_modules(model) -> list:
    """Modeling modules the patch touches: the :data:`MODEL_FAMILIES` ones (imported here), every transformers
    modeling module already imported, and those defining ``model``'s submodules (remote code included)."""
    names = list(_FAMILY_MODULES)
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:  # a family this transformers version does not have
            pass
    names += [n for n in list(sys.modules) if n.startswith("transformers.models.") and ".modeling_" in n]
    if model is not None and isinstance(model, torch.nn.Module):
        names += [type(m).__module__ for m in model.modules()]
    seen, out = set(), []
    for name in names:
        mod = sys.modules.get(name)
        if mod is not None and name not in seen:
            seen.add(name)
            out.append(mod)
    return out


def _static_cache_2d(attention_mask, input_tensor=None, cache_position=None, past_key_values=None, *args, **kwargs):
    """transformers < 4.53: the 2-D mask of a fixed-size cache's filled slots (:func:`_static_cache_mask`) when
    ``past_key_values`` is a ``StaticCache`` not yet full, else None. Other fixed-size caches (sliding-window,
    hybrid) are refused: their slots are not in position order."""
    size = getattr(past_key_values, "get_max_cache_shape", lambda: None)()
    if not isinstance(size, int) or cache_position is None or (attention_mask is not None and
                                                                attention_mask.dim() != 2):
        return None
    filled = int(cache_position[-1]) + 1
    if filled >= size:
        return None
    if type(past_key_values).__name__ != "StaticCache":
        raise NotImplementedError(f"a {type(past_key_values).__name__} on transformers < 4.53 with "
                                  f"attn_implementation='ring_attn': use a DynamicCache or a StaticCache")
    return _static_cache_mask(attention_mask, input_tensor.shape[0], filled, size, input_tensor.device)


def _check_mask_width(attention_mask, input_tensor=None, cache_position=None, past_key_values=None, *args,
                      **kwargs) -> None:
    """transformers < 4.53: a 2-D mask longer than the cached plus the new tokens (no fixed-size cache) is refused
    (stock slices its first columns there, the attention its last: the same ValueError as on 5.x instead)."""
    if attention_mask is None or attention_mask.dim() != 2 or input_tensor is None or \
            isinstance(getattr(past_key_values, "get_max_cache_shape", lambda: None)(), int):
        return
    past = past_key_values.get_seq_length() if hasattr(past_key_values, "get_seq_length") else 0
    if attention_mask.shape[1] > past + input_tensor.shape[1]:
        raise _mask_width_error(attention_mask.shape[1], past + input_tensor.shape[1])


def _make_update_causal_mask(original, padding_2d: bool):
    # transformers < 4.53 builds masks inside the model: for "ring_attn" behave like flash_attention_2 there
    # (the 2-D mask when it pads, else None), so no O(s^2) mask is built and padding still reaches the check.
    # padding_2d=False (decoder layers that slice a 4-D mask themselves): a padding mask goes to the stock
    # builder, whose 4-D result the attention refuses with NotImplementedError.
    def _update_causal_mask(self, attention_mask, *args, **kwargs):
        if self.config._attn_implementation == ATTN_IMPLEMENTATION and _active is not None:
            try:
                _check_mask_width(attention_mask, *args, **kwargs)
            except ValueError as error:
                _refuse(_active, error)
            static = _static_cache_2d(attention_mask, *args, **kwargs)
            if static is not None:
                if not padding_2d:  # its layers slice a 4-D mask
                    raise NotImplementedError(f"a StaticCache with {type(self).__name__} on transformers < 4.53 "
                                              f"and attn_implementation='ring_attn': use a DynamicCache")
                return static
            if attention_mask is not None and attention_mask.dim() == 2:
                if padding_2d and torch.compiler.is_compiling():  # no host read: the attention's op finds out
                    return attention_mask
                if not bool((attention_mask == 0).any()):
                    return None
                if padding_2d:
                    return attention_mask
            else:
                return attention_mask
        return original(self, attention_mask, *args, **kwargs)

    _update_causal_mask._ring_attn_original = original
    return _update_causal_mask


# ---------------------------------------------------------------------------------------------------------
# fused_loss: the causal-LM loss from the hidden states (no logits tensor in training)

_HEAD_ARGS = ("labels", "logits_to_keep", "num_logits_to_keep", "return_dict")  # the head's, not the base model's


def _head_transforms(model) -> tuple[torch.Tensor, float, float]:
    """(output embedding weight, logit scale, final soft-cap) of a :data:`MODEL_FAMILIES` causal LM."""
    # the family is the modeling module's (Gemma 3's text-only model says model_type='gemma3_text'), and only its
    # causal LM, whose head is the matmul + scale + cap reproduced here (a multimodal model's is not checked)
    config = model.config
    if type(model).__module__ not in _FAMILY_MODULES or not type(model).__name__.endswith("ForCausalLM"):
        raise NotImplementedError(f"{type(model).__name__} (model_type={getattr(config, 'model_type', None)!r}) is "
                                  f"not the causal LM of one of MODEL_FAMILIES {MODEL_FAMILIES}: its head may do "
                                  f"more than a matmul; use the logits")
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("the output embedding has a bias; use the logits")
    scale = 1.0 / float(getattr(config, "logits_scaling", None) or 1.0)  # Granite divides the logits
    softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)  # Gemma 2 / 3
    return head.weight, scale, softcap


def _make_fused_loss_forward(model, original):
    """``model.forward`` that, in training with ``labels``, runs the base model and computes transformers' causal-LM
    loss (labels shifted, or ``shift_labels``; sum / ``num_items_in_batch``, else the mean over labelled tokens)
    by :func:`ring_attn.linear_cross_entropy_sum`, returning ``logits=None``. Anything else: the stock forward."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    signature = inspect.signature(original)
    var_kw = next((n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    fields = CausalLMOutputWithPast.__dataclass_fields__

    def forward(*args, **kwargs):
        if _active is None or not model.training:
            return original(*args, **kwargs)
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        extra = dict(arguments.pop(var_kw, None) or {})
        labels = arguments.get("labels")
        keep = arguments.get("logits_to_keep", extra.get("logits_to_keep", arguments.get("num_logits_to_keep")))
        if labels is None or not (keep is None or (isinstance(keep, int) and keep == 0)):
            return original(*args, **kwargs)  # (logits of some positions only: stock's loss over those)
        return_dict = arguments.get("return_dict", extra.pop("return_dict", None))
        if return_dict is None:
            return_dict = getattr(model.config, "use_return_dict", getattr(model.config, "return_dict", True))
        router = arguments.get("output_router_logits", extra.get("output_router_logits"))
        if router or (router is None and getattr(model.config, "output_router_logits", False)):
            raise NotImplementedError("patch_hf(fused_loss=True) with output_router_logits: the router's auxiliary "
                                      "loss is not added; set output_router_logits=False or fused_loss=False")
        for name in _HEAD_ARGS:
            arguments.pop(name, None)
        shift = extra.pop("shift_labels", None)  # (over a ring never None: _make_ring_labels_forward refuses it)
        num_items = extra.pop("num_items_in_batch", None)
        outputs = model.get_decoder()(**arguments, **extra)  # the base model (base_model_prefix is
        # not its attribute name everywhere: 4.57 Gemma 3 says language_model)
        hidden = outputs[0]
        if shift is None:  # transformers' ForCausalLMLoss: token t predicts label t + 1
            shift = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        weight, scale, softcap = _head_transforms(model)
        shift = shift.to(hidden.device)
        total = ring_attn.linear_cross_entropy_sum(hidden, weight, shift, logit_scale=scale, softcap=softcap)
        if num_items is None:
            loss = total / (shift != IGNORE_INDEX).sum()
        else:
            loss = total / (num_items.to(total.device) if isinstance(num_items, torch.Tensor) else num_items)
        out = dict(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                   attentions=getattr(outputs, "attentions", None))
        for name in ("cache", "past_key_values"):
            if name in fields:
                out[name] = getattr(outputs, name, None)
        out = CausalLMOutputWithPast(**out)
        return out if return_dict else out.to_tuple()  # (the tuple skips logits=None: loss first, as stock's)

    forward.__signature__ = signature
    forward._ring_attn_original = original
    return forward


def _stock_loss_takes_shift_labels() -> bool:
    """Whether transformers' causal-LM loss reads ``shift_labels`` (4.48's ``ForCausalLMLoss`` ignores it and
    shifts ``labels`` itself)."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False
    return "shift_labels" in inspect.signature(ForCausalLMLoss).parameters


def _make_ring_labels_forward(original, takes_shift_labels: bool):
    """``model.forward`` over a ring that refuses ``labels`` without ``shift_labels`` (and any ``labels`` when the
    loss behind ``original`` ignores ``shift_labels``: ``takes_shift_labels`` False): the causal-LM loss would shift
    them within each rank's shard, silently wrong at every shard's edge. ``shift_labels`` without
    ``num_items_in_batch`` too: the loss would be a per-rank mean, not the whole batch's. The refusal is raised
    through the ring attention's agreement, so every rank raises (ValueError) and none waits. Plain Python, no
    ``Signature.bind`` (it runs under torch.compile too)."""
    signature = inspect.signature(original)
    names = list(signature.parameters)
    at = names.index("labels") if "labels" in names else None

    def forward(*args, **kwargs):
        labels = kwargs.get("labels", args[at] if at is not None and len(args) > at else None)
        shifted = takes_shift_labels and kwargs.get("shift_labels") is not None
        if labels is None or _active is None or _active.world == 1 or \
                (shifted and kwargs.get("num_items_in_batch") is not None):
            return original(*args, **kwargs)
        if shifted:
            text = ("patch_hf over a ring: labels and shift_labels without num_items_in_batch: the loss would be the "
                    "mean over this rank's labelled tokens, not over the whole batch's (the ranks hold different "
                    "counts); pass shard_batch's num_items_in_batch too")
        elif takes_shift_labels:
            text = ("patch_hf over a ring: labels without shift_labels would be shifted within each rank's shard "
                    "(every shard's last token would predict nothing, or the wrong token); pass shard_batch's "
                    "shift_labels and num_items_in_batch with the labels, or compute the loss with causal_lm_loss")
        else:
            text = ("patch_hf over a ring: this transformers' causal-LM loss ignores shift_labels and shifts the "
                    "labels within each rank's shard (wrong at every shard's edge); pass no labels and compute the "
                    "loss with causal_lm_loss, or use patch_hf(model, group, fused_loss=True)")
        refused = _active.pending_failure = ValueError(text)
        try:
            original(*args, **kwargs)  # its first ring attention call raises the refusal after the ranks agree
        finally:
            _active.pending_failure = None
        raise refused  # (no ring attention ran to raise it)

    forward.__signature__ = signature
    forward._ring_attn_original = original
    return forward


def _make_ring_generate(world: int):
    """``model.generate`` over a ring: refused at once, on the calling rank alone (sampling on rank 0 while the others
    are elsewhere is the usual pattern; its first attention call would wait in the ring's agreement for them)."""
    def generate(*args, **kwargs):
        raise NotImplementedError(
            f"generate with ring attention over {world} ranks: a KV cache would hold this rank's shard only. "
            f"Generate on one device ({_ONE_DEVICE}), then patch_hf(model, group) again to train")

    return generate


# ---------------------------------------------------------------------------------------------------------
# Patch / undo


class HFPatch:
    """Handle returned by :func:`patch_hf`; ``undo()`` (or leaving a ``with`` block) restores stock behaviour."""

    def __init__(self):
        self._restore: list = []  # callables run in reverse order
        self.active = True
        self._checkpointing = lambda: False  # whether the patched model has gradient checkpointing on

    def _setattr(self, obj, name, value):
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)
        self._restore.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))

    def _setitem(self, mapping: dict, key, value):
        """``mapping[key] = value`` (a registration: transformers' ``register`` is exactly this update of the
        interface's ``_global_mapping``), undone by restoring the previous entry or removing the new one."""
        had, old = key in mapping, mapping.get(key)
        mapping[key] = value
        self._restore.append(lambda: mapping.__setitem__(key, old) if had else mapping.pop(key, None))

    def undo(self) -> None:
        """Restore every patched function, registration and model setting. Idempotent."""
        global _active
        if not self.active:
            return
        if _active is not None and _active.pending_recompute and self._checkpointing():
            warnings.warn(
                f"ring_attn: undo() while {_active.pending_recompute} attention call(s) of a checkpointed forward "
                f"await their recompute in backward(); that recompute will run stock attention on the masks "
                f"prepared for ring_attn (wrong gradients for packed batches). Call backward() before undo(), "
                f"i.e. inside the `with patch_hf(...)` block", RuntimeWarning, stacklevel=2)
        while self._restore:
            self._restore.pop()()
        _active = None
        self.active = False

    def __enter__(self) -> "HFPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def _unwrap(model):
    """The transformers model inside DistributedDataParallel / FSDP-style wrappers (their ``.module``), PEFT
    models (``get_base_model()``: the patched forward must be the causal LM's own, which PEFT calls) and
    ``torch.compile``'s wrapper (its ``_orig_mod``, which forwards attribute reads such as ``config``)."""
    while model is not None:
        if isinstance(model, torch.nn.Module) and isinstance(model._modules.get("_orig_mod"), torch.nn.Module):
            inner = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        elif not hasattr(model, "config") and isinstance(getattr(model, "module", None), torch.nn.Module):
            inner = model.module
        else:
            return model
        if inner is model:
            return model
        model = inner
    return model


def _check_dispatches_attention(model) -> None:
    """NotImplementedError, before anything is patched, for a model whose attention does not go through
    transformers' ``AttentionInterface`` (Bloom, and on transformers 4.48 GPT-NeoX, Falcon, OPT): switching it
    to ``"ring_attn"`` would change nothing, silently. transformers >= 4.50 says so by the class flag
    ``_supports_attention_backend``; before it, the model's modeling modules use ``ALL_ATTENTION_FUNCTIONS``."""
    flag = getattr(type(model), "_supports_attention_backend", None)
    if flag is None:
        flag = any(hasattr(sys.modules.get(type(m).__module__), "ALL_ATTENTION_FUNCTIONS") for m in model.modules())
    if not flag:
        raise NotImplementedError(
            f"{type(model).__name__} does not dispatch its attention through transformers' AttentionInterface, so "
            f"attn_implementation={ATTN_IMPLEMENTATION!r} cannot replace it (the model would run its own attention "
            f"unchanged); ring_attn patches models that do (MODEL_FAMILIES, and others such as Starcoder2)")


def _checkpointing_on(model) -> bool:
    """Whether ``model`` has gradient (activation) checkpointing on (transformers 5.25 renamed the property)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _set_attn_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers < 4.50
        model.config._attn_implementation = name


def patch_hf(model=None, group=None, layout: str = "zigzag", fused_rope: bool = True,
             fused_loss: bool = False) -> HFPatch:
    """Route transformers attention (and RoPE) of Llama-family models through ring_attn.

    Attention: any model that dispatches through transformers' ``AttentionInterface``. Fused RoPE: the
    :data:`MODEL_FAMILIES` (Llama, Mistral, Mixtral, Qwen2, Qwen3, Qwen3-MoE, Gemma 1/2/3, Phi-3, Granite, OLMo 2).
    Over a ring, the rotary embedding of every transformers modeling module imported at patch time (and of
    ``model``) sees the global sequence length, so ``dynamic`` / ``longrope`` pick the frequencies one device would.

    Args:
        model: a loaded model to switch to ``attn_implementation="ring_attn"``, a DDP/FSDP-style wrapper of one
            (its ``.module``) or a PEFT model (its ``get_base_model()``). Optional: models loaded later can ask
            for it with ``from_pretrained(..., attn_implementation="ring_attn")``. With a multi-rank ``group``
            its ``config.use_cache`` is set to False (restored by ``undo``).
        group: the ring's process group. None: the default group when torch.distributed is initialized (as
            :func:`shard_batch` and :func:`ring_attn.ring_attn_func` take None), else one device. A group of more
            than one rank: ring attention over it; feed the model batches from :func:`shard_batch` with the same
            group and layout. A one-rank group, or no torch.distributed: single-device flash attention (a faster
            drop-in for ``sdpa``, with KV-cache generation); in a data-parallel job, where every rank runs its
            own batch, pass ``torch.distributed.new_subgroups(group_size=1)[0]`` (each rank's own group).
        layout: how sequences are sharded over ``group``: ``"zigzag"`` (default), ``"contiguous"``, ``"striped"``.
        fused_rope: replace ``apply_rotary_pos_emb`` in the :data:`MODEL_FAMILIES` modeling modules by the fused
            kernel, angles from the model's own ``inv_freq`` (any rope type; Phi-3's partial rotary too) and global
            ``position_ids``, formed in float64 (stock forms them in float32).
        fused_loss: ``model`` in training, called with ``labels``, computes transformers' causal-LM loss from the
            hidden states by :func:`ring_attn.linear_cross_entropy_sum` (the output embedding applied one block
            of tokens at a time: no logits tensor, no float32 copies) and returns ``logits=None``; the same value
            and gradients as stock (``shift_labels`` and ``num_items_in_batch`` as transformers takes them).
            Needs ``model``, of a :data:`MODEL_FAMILIES` type; without labels, or in eval mode, nothing changes.

    Returns:
        :class:`HFPatch`; ``.undo()`` or ``with patch_hf(...):`` restores stock behaviour exactly. Run
        ``backward()`` before ``undo()``: under gradient checkpointing the backward recomputes layers, which after
        ``undo()`` would run stock attention on ring_attn's masks (wrong gradients for packed batches).

    Raises:
        ValueError: unknown layout; TypeError: ``model`` is not a transformers model; NotImplementedError:
        ``model``'s attention does not dispatch through transformers' ``AttentionInterface`` (e.g. Bloom), so
        nothing would change; RuntimeError: a patch is already active (undo it first), or ``group`` without an
        initialized process group.
    """
    global _active
    import transformers

    ring_layout.check_layout(layout)
    if _active is not None:
        raise RuntimeError("a ring_attn patch is already active; call .undo() on it before patching again")
    given, model = model, _unwrap(model)
    if model is not None and not hasattr(model, "config"):
        inside = f" (inside {type(given).__name__})" if given is not model else ""
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}{inside}")
    for name, flag in (("fused_rope", fused_rope), ("fused_loss", fused_loss)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if fused_loss:
        if model is None:
            raise ValueError("fused_loss=True needs the model: patch_hf(model, fused_loss=True)")
        _head_transforms(model)  # NotImplementedError for heads it cannot reproduce, before anything is patched
    if model is not None:
        _check_dispatches_attention(model)
    state = _State(group, layout, fused_rope)
    handle = HFPatch()
    try:
        # attention function
        from transformers import modeling_utils

        interface = getattr(modeling_utils, "AttentionInterface", None)
        # transformers < 4.50: ALL_ATTENTION_FUNCTIONS is a plain dict
        handle._setitem(interface._global_mapping if interface is not None else
                        modeling_utils.ALL_ATTENTION_FUNCTIONS, ATTN_IMPLEMENTATION, ring_attn_attention_forward)
        # mask function
        try:
            masking_utils = importlib.import_module("transformers.masking_utils")
        except ImportError:
            masking_utils = None
        mask_interface = getattr(masking_utils, "AttentionMaskInterface", None)
        if mask_interface is not None:
            handle._setitem(mask_interface._global_mapping, ATTN_IMPLEMENTATION, ring_attn_mask)
            creator_modules = [masking_utils]
        else:
            creator_modules = []
        # modeling modules: rotary embeddings (global length over a ring), fused RoPE, < 4.53 mask builders
        modeling = _modeling_modules(model)
        for mod in creator_modules + modeling:  # the mask creators, where a module names them
            for name in _MASK_CREATORS:
                fn = vars(mod).get(name)
                if callable(fn) and not hasattr(fn, "_ring_attn_original"):
                    handle._setattr(mod, name, _make_mask_creator(fn))
        for mod in modeling:
            for rotary in _rotary_classes(mod):
                if "forward" in vars(rotary) and not _rotary_wrapped(rotary):
                    handle._setattr(rotary, "forward", _make_rotary_forward(rotary.forward))
            if fused_rope and mod.__name__ in _FAMILY_MODULES and callable(getattr(mod, "apply_rotary_pos_emb", None)):
                handle._setattr(mod, "apply_rotary_pos_emb", _make_apply_rotary(mod.apply_rotary_pos_emb))
            if mask_interface is None and mod.__name__ in _FAMILY_MODULES:
                for base in vars(mod).values():
                    if isinstance(base, type) and "_update_causal_mask" in vars(base) \
                            and not hasattr(base._update_causal_mask, "_ring_attn_original"):
                        handle._setattr(base, "_update_causal_mask", _make_update_causal_mask(
                            base._update_causal_mask, padding_2d=mod.__name__ not in _MASK_4D_LAYERS))
        _active = state
        if model is not None:
            for sub in model.modules():
                if type(sub).__name__.endswith("RotaryEmbedding"):
                    handle._setattr(sub, _OWNED, True)
            handle._checkpointing = lambda: _checkpointing_on(model)
            previous = model.config._attn_implementation
            _set_attn_implementation(model, ATTN_IMPLEMENTATION)
            handle._restore.append(lambda: _set_attn_implementation(model, previous))
            if model.config._attn_implementation != ATTN_IMPLEMENTATION:  # transformers refused the switch
                raise NotImplementedError(
                    f"{type(model).__name__}: transformers did not switch it to attn_implementation="
                    f"{ATTN_IMPLEMENTATION!r} (it stays {model.config._attn_implementation!r}); its attention "
                    f"cannot be replaced")
            forward = _make_fused_loss_forward(model, model.forward) if fused_loss else None
            if state.world > 1 and type(model).__name__.endswith(("ForCausalLM", "ForConditionalGeneration")):
                forward = _make_ring_labels_forward(forward or model.forward,
                                                    fused_loss or _stock_loss_takes_shift_labels())
            if forward is not None:
                handle._setattr(model, "forward", forward)
            if state.world > 1 and callable(getattr(model, "generate", None)):
                handle._setattr(model, "generate", _make_ring_generate(state.world))
            if state.world > 1 and getattr(model.config, "use_cache", False):
                model.config.use_cache = False
                handle._restore.append(lambda: setattr(model.config, "use_cache", True))
    except BaseException:
        handle.undo()
        raise
    del transformers
    return handle


# ---------------------------------------------------------------------------------------------------------
# Data: shift, pad, shard


def _sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[b, s]``: True where a sequence starts (row start, or position not previous + 1)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def shift_labels(labels: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets: ``out[:, t] = labels[:, t + 1]``, ``ignore_index`` at the end of every sequence.

    Args:
        labels: int64 ``[b, s]`` (``ignore_index`` where no loss is wanted).
        position_ids: optional ``[b, s]`` / ``[1, s]``; where positions restart (packed sequences) the last
            token of a sequence gets ``ignore_index`` instead of the next sequence's first token.

    Returns:
        int64 ``[b, s]``.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seqlen], got shape {tuple(labels.shape)}")
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        starts = _sequence_starts(position_ids.expand_as(labels))
        out[:, :-1] = out[:, :-1].masked_fill(starts[:, 1:], ignore_index)
    return out


def _as_2d_long(name, x, shape=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"batch[{name!r}] must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"batch[{name!r}] must be an integer tensor [batch, seqlen], got {x.dtype} "
                         f"{tuple(x.shape)}")
    if shape is not None and x.shape[1] != shape[1] or shape is not None and x.shape[0] not in (1, shape[0]):
        raise ValueError(f"batch[{name!r}] has shape {tuple(x.shape)}; expected {tuple(shape)} like input_ids")
    return x.long()


def shard_batch(batch: Mapping[str, Any], group=None, layout: str = "zigzag",
                pad_token_id: int = 0) -> dict:
    """This rank's part of a causal-LM batch for a model patched with ``patch_hf(model, group, layout)``.

    Every rank passes the same global batch. Labels are shifted over the whole sequence *before* sharding
    (a shard's last token predicts a token that lives on another rank). Lengths the layout cannot split
    (multiples of ``2W`` for zigzag, ``W`` otherwise) are padded at the end with ``pad_token_id`` and ignored
    labels: under causal attention no real query sees a later pad token, so no mask is needed. (Rope types whose
    frequencies depend on the length, ``dynamic`` and ``longrope``, see the padded length, as stock transformers
    does for a right-padded batch; pick lengths that are multiples of the unit to keep them unchanged.)

    Args:
        batch: ``input_ids`` int ``[b, s]``; optional ``labels`` ``[b, s]`` (unshifted, -100 = ignore),
            ``attention_mask`` (must be all ones: padding inside a sharded sequence is refused; pack instead),
            ``position_ids`` ``[b, s]`` / ``[1, s]`` (positions restarting mark packed sequences).
        group: the ring's process group (None: the world, or one process when not initialized).
        layout: ``"zigzag"``, ``"contiguous"`` or ``"striped"``; must match ``patch_hf``.
        pad_token_id: token used for padding (never attended by a real query, never in the loss).

    Returns:
        dict with ``input_ids`` and ``position_ids`` (global positions) ``[b, s_pad / W]``; with labels also
        ``shift_labels`` (same shape) and ``num_items_in_batch`` (int64 scalar: labelled tokens in the *whole*
        batch). Packed sequences (any batch size) become one row ``[1, t_pad / W]``, each sequence padded and
        sharded by the layout, plus ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 *global* boundaries) and
        ``max_length_q`` / ``max_length_k``, which transformers passes on to the attention.

    Raises:
        TypeError / ValueError naming the key: missing or malformed ``input_ids``, shapes that disagree, an
        ``attention_mask`` with zeros; ValueError for an unknown layout.
    """
    ring_layout.check_layout(layout)
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError("batch must be a mapping with 'input_ids' [batch, seqlen]")
    input_ids = _as_2d_long("input_ids", batch["input_ids"])
    b, s = input_ids.shape
    device = input_ids.device
    mask = batch.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, s):
            raise ValueError(f"batch['attention_mask'] must be a tensor of shape {(b, s)}, got "
                             f"{getattr(mask, 'shape', type(mask))}")
        if not bool((mask != 0).all()):
            raise ValueError(
                "batch['attention_mask'] has zeros (padding): ring attention cannot mask padding inside a "
                "sharded sequence; pack the sequences instead (position_ids restarting at 0) or drop the padding "
                "(shard_batch pads the end itself with ignored labels)")
    labels = batch.get("labels")
    if labels is not None:
        labels = _as_2d_long("labels", labels, (b, s))
        if labels.shape[0] != b:
            raise ValueError(f"batch['labels'] has shape {tuple(labels.shape)}; expected {(b, s)}")
    positions = batch.get("position_ids")
    if positions is not None:
        positions = _as_2d_long("position_ids", positions, (b, s)).expand(b, s)
    else:
        positions = torch.arange(s, device=device).expand(b, s)
    rank, world = _rank_world(group)
    unit = 2 * world if layout == "zigzag" else world
    targets = shift_labels(labels, positions) if labels is not None else None
    starts = _sequence_starts(positions)
    packed = bool(starts[:, 1:].any())
    out: dict = {}
    if not packed:
        pad = (-s) % unit
        if pad:
            tail = positions[:, -1:] + torch.arange(1, pad + 1, device=device)
            positions = torch.cat([positions, tail], 1)
            input_ids = torch.cat([input_ids, input_ids.new_full((b, pad), pad_token_id)], 1)
            if targets is not None:
                targets = torch.cat([targets, targets.new_full((b, pad), IGNORE_INDEX)], 1)
        sh = lambda x: ring_layout.shard_for_rank(x, rank, world, 1, layout)  # noqa: E731
        out["input_ids"], out["position_ids"] = sh(input_ids), sh(positions.contiguous())
        if targets is not None:
            out["shift_labels"] = sh(targets)
    else:
        # one row of sequences, each padded to a multiple of the layout's unit
        flat_start = starts.reshape(-1).nonzero().reshape(-1).tolist() + [b * s]
        ids, pos, tgt, lens = [], [], [], []
        flat_ids, flat_pos = input_ids.reshape(-1), positions.reshape(-1)
        flat_tgt = targets.reshape(-1) if targets is not None else None
        for a, e in zip(flat_start[:-1], flat_start[1:]):
            n = e - a
            pad = (-n) % unit
            ids += [flat_ids[a:e], flat_ids.new_full((pad,), pad_token_id)]
            pos += [flat_pos[a:e], flat_pos[e - 1] + torch.arange(1, pad + 1, device=device)]
            if flat_tgt is not None:
                tgt += [flat_tgt[a:e], flat_tgt.new_full((pad,), IGNORE_INDEX)]
            lens.append(n + pad)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
        sh = lambda x: ring_layout.varlen_shard_for_rank(torch.cat(x), cu, rank, world, 0, layout)[None]  # noqa
        out["input_ids"], out["position_ids"] = sh(ids), sh(pos)
        if flat_tgt is not None:
            out["shift_labels"] = sh(tgt)
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
        out["max_length_q"] = out["max_length_k"] = max(lens)
    if targets is not None:
        out["num_items_in_batch"] = (targets != IGNORE_INDEX).sum()
    return out


def causal_lm_loss(logits: torch.Tensor, shift_labels: torch.Tensor, num_items_in_batch,
                   grad_average_world: int = 1, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """This rank's share of the causal-LM loss of the whole (unsharded) batch.

    ``sum over local tokens of cross_entropy(logits, shift_labels) / num_items_in_batch * grad_average_world``
    (cross entropy in float32 by :func:`ring_attn.cross_entropy_sum`, one block of tokens at a time: the float32
    copy, saved log-softmax and float32 gradient of ``F.cross_entropy(logits.float())``, 3 x 16.8 GB at 32k
    tokens x 128k vocabulary, are never made; :func:`causal_lm_loss_from_hidden` avoids the logits altogether).
    Summed over the ranks of the ring, the unscaled value is exactly the mean loss of the whole batch, so:

    * gradients all-reduced with SUM over the ring: use ``grad_average_world=1``;
    * gradients *averaged* (DDP, ``all_reduce`` then divide by ``W``): pass ``grad_average_world=W`` so the
      average is the exact full-batch gradient. The loss to report is then the average of this value over
      the ranks.

    Args:
        logits: ``[b, s_local, vocab]`` (any float dtype).
        shift_labels: int64 ``[b, s_local]`` from :func:`shard_batch`.
        num_items_in_batch: labelled tokens in the whole batch (``shard_batch``'s ``num_items_in_batch``; with
            data parallelism on top, the total over every batch whose gradients are averaged together).
        grad_average_world: the number of ranks whose gradients are averaged (see above).

    Returns:
        float32 scalar (float64 for float64 inputs).
    """
    if logits.shape[:-1] != shift_labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and shift_labels {tuple(shift_labels.shape)} must agree "
                         f"on [batch, seqlen]")
    loss = ring_attn.cross_entropy_sum(logits, shift_labels.to(logits.device), ignore_index=ignore_index)
    return loss * _loss_scale(num_items_in_batch, grad_average_world)


def _loss_scale(num_items_in_batch, grad_average_world) -> float:
    n = num_items_in_batch.item() if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch
    if not n or n < 0:
        raise ValueError(f"num_items_in_batch must be a positive count, got {num_items_in_batch!r}")
    return float(grad_average_world) / float(n)


def causal_lm_loss_from_hidden(model, hidden_states: torch.Tensor, shift_labels: torch.Tensor, num_items_in_batch,
                               grad_average_world: int = 1, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """:func:`causal_lm_loss` from the last hidden states: the logits are never formed whole.

    ``model(...).logits`` at long context is the largest tensor of a step (32k tokens per rank x Llama 3's 128k
    vocabulary: 8.4 GB in bf16, plus its gradient). Run the base model instead (``model.model(...)``, whose
    ``last_hidden_state`` is ``[b, s_local, hidden]``) and pass the hidden states here: the output embedding
    is applied one block of tokens at a time inside :func:`ring_attn.linear_cross_entropy_sum`, with the
    model's own logit transforms (Granite's ``logits_scaling``, Gemma 2/3's ``final_logit_softcapping``).
    Value and gradients equal :func:`causal_lm_loss` on ``model(...).logits``.

    Args:
        model: a causal LM of a :data:`MODEL_FAMILIES` type, or a DDP/FSDP-style wrapper of one (its
            ``.module``); its ``get_output_embeddings()`` and config say how the logits are formed (other models
            raise NotImplementedError, since their heads may do more).
        hidden_states: ``[b, s_local, hidden]``, the base model's ``last_hidden_state`` (after its final norm).
        shift_labels, num_items_in_batch, grad_average_world, ignore_index: as :func:`causal_lm_loss`.

    Returns:
        float32 scalar (float64 for float64 inputs).
    """
    model = _unwrap(model)
    if not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    try:
        weight, scale, softcap = _head_transforms(model)
    except NotImplementedError as e:
        raise NotImplementedError(f"causal_lm_loss_from_hidden: {e} (causal_lm_loss(model(...).logits, ...))") from None
    if hidden_states.shape[:-1] != shift_labels.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} and shift_labels {tuple(shift_labels.shape)} "
                         f"must agree on [batch, seqlen]")
    loss = ring_attn.linear_cross_entropy_sum(hidden_states, weight, shift_labels.to(hidden_states.device),
                                              ignore_index=ignore_index, logit_scale=scale, softcap=softcap)
    return loss * _loss_scale(num_items_in_batch, grad_average_world)
