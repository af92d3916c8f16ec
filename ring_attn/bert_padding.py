"""flash-attn's padding helpers (``flash_attn.bert_padding``) on ring-attn: switching is an import change.

``from flash_attn.bert_padding import unpad_input, pad_input`` becomes
``from ring_attn.bert_padding import unpad_input, pad_input``; the functions keep flash-attn's names, positional
order and return conventions (flash-attn >= 2.6: ``unpad_input`` takes ``unused_mask`` and returns five values,
the last one ``seqused``). They turn a padded batch ``[batch, seqlen, ...]`` with a 2-D mask into the packed
``[total_tokens, ...]`` layout of :func:`ring_attn.flash_attn_varlen_func` and back. Plain torch (gathers and
scatters with their own backward); one host read (the longest sequence) in ``unpad_input``, as flash-attn's.

For attention alone, :func:`ring_attn.padded_attention` does the unpadding inside one custom op (no host read
outside it, one compiled graph).
"""
from __future__ import annotations

import operator

import torch

from ring_attn._contracts import check_tensor

__all__ = ["index_first_axis", "index_put_first_axis", "unpad_input", "pad_input",
           "unpad_input_for_concatenated_sequences"]


def _check_indices(indices, rows: int, name: str = "indices") -> None:
    """1-D int row indices in ``[0, rows)``: checked on the host for CPU indices in eager mode (ValueError naming
    the first bad one), by a device-side assert otherwise (no host sync; under torch.compile no graph break).
    torch would wrap a negative index to the last rows."""
    check_tensor(name, indices)
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int64 (or int32) tensor of row indices, got {indices.dtype} "
                         f"{tuple(indices.shape)}")
    if not indices.numel():
        return
    bad = (indices < 0) | (indices >= rows)
    if indices.device.type == "cpu" and not torch.compiler.is_compiling():  # (compiled: the assert, no branch)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"{name}[{i}] = {int(indices[i])} is not a row index in [0, {rows})")
    else:
        torch._assert_async(~bad.any(), f"{name}: a row index outside [0, {rows})")


class _IndexFirstAxis(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, indices):
        ctx.save_for_backward(indices)
        ctx.rows = x.shape[0]
        return x[indices]

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.rows,) + tuple(grad.shape[1:]))
        out.index_put_((indices,), grad, accumulate=True)  # repeated indices add up, like x[indices]'s backward
        return out, None


class _IndexPutFirstAxis(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, rows):
        ctx.save_for_backward(indices)
        out = values.new_zeros((rows,) + tuple(values.shape[1:]))
        out[indices] = values
        return out

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return grad[indices], None, None


def index_first_axis(input, indices):
    """``input[indices]`` along the first dim, with a backward that scatters into zeros (flash-attn's).

    Args:
        input: ``[rows, ...]`` (at least 2-D).
        indices: int64 ``[n]`` row indices.

    Returns:
        ``[n, ...]``.
    """
    check_tensor("input", input)
    if input.dim() < 2:
        raise ValueError(f"input must be at least 2-D [rows, ...], got shape {tuple(input.shape)}")
    _check_indices(indices, input.shape[0])
    return _IndexFirstAxis.apply(input, indices.long())


def index_put_first_axis(values, indices, first_axis_dim):
    """Zeros ``[first_axis_dim, ...]`` with ``values`` written at rows ``indices`` (flash-attn's); the backward
    gathers.

    Args:
        values: ``[n, ...]`` (at least 2-D).
        indices: int64 ``[n]``, distinct row indices in ``[0, first_axis_dim)``.
        first_axis_dim: int, the number of rows of the result.
    """
    return _index_put("values", values, indices, _count("first_axis_dim", first_axis_dim))


def _count(name: str, n) -> int:
    """``n`` as an int >= 0 (Python, numpy or one-element integer tensor), else ValueError naming ``name``."""
    try:
        value = operator.index(n) if not isinstance(n, bool) else -1
    except TypeError:
        value = -1
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    return value


def _index_put(name: str, values, indices, rows: int):
    check_tensor(name, values)
    if values.dim() < 2:
        raise ValueError(f"{name} must be at least 2-D [n, ...], got shape {tuple(values.shape)}")
    _check_indices(indices, rows)
    if indices.shape[0] != values.shape[0]:
        raise ValueError(f"indices has {indices.shape[0]} entries but {name} has {values.shape[0]} rows")
    return _IndexPutFirstAxis.apply(values, indices.long(), rows)


def _check_batch(hidden_states, mask, name: str) -> None:
    check_tensor("hidden_states", hidden_states)
    check_tensor(name, mask)
    if hidden_states.dim() < 3:
        raise ValueError(f"hidden_states must be at least 3-D [batch, seqlen, ...] (the packed tokens [total, ...] "
                         f"at least 2-D, as pad_input takes them), got shape {tuple(hidden_states.shape)}")
    if mask.dim() != 2 or tuple(mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"{name} must be [batch, seqlen] matching hidden_states [batch, seqlen, ...]; got "
                         f"{tuple(mask.shape)} and {tuple(hidden_states.shape)}")
    if mask.device != hidden_states.device:
        raise ValueError(f"{name} is on {mask.device}, hidden_states on {hidden_states.device}")


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """The tokens a 2-D mask keeps, packed (flash-attn's ``unpad_input``).

    Args:
        hidden_states: ``[batch, seqlen, ...]``, at least 3-D (the packed result is at least 2-D, as
            :func:`pad_input` and flash-attn take it).
        attention_mask: ``[batch, seqlen]``, bool or int, nonzero = a real token.
        unused_mask: None, or ``[batch, seqlen]``: tokens allocated but unused (kept in the packed tensor and in
            ``cu_seqlens``, not in ``seqused``).

    Returns:
        ``(hidden_states [total, ...], indices int64 [total], cu_seqlens int32 [batch + 1], max_seqlen_in_batch
        int, seqused int32 [batch])``: ``total`` tokens kept by ``attention_mask`` (or ``unused_mask``), in row
        order; ``indices`` their places in the flattened ``[batch · seqlen]``; ``seqused`` the real tokens per row.
    """
    _check_batch(hidden_states, attention_mask, "attention_mask")
    used = attention_mask != 0
    keep = used
    if unused_mask is not None:
        _check_batch(hidden_states, unused_mask, "unused_mask")
        keep = used | (unused_mask != 0)
    seqused = used.sum(dim=-1, dtype=torch.int32)
    seqlens = keep.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    # indices come from the mask itself: in range by construction (no check, no device-side assert)
    return _IndexFirstAxis.apply(hidden_states.flatten(0, 1), indices), indices, cu_seqlens, max_seqlen, seqused


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """flash-attn's form for rows that each hold several concatenated samples: ``attention_mask_in_length``
    ``[batch, seqlen]`` lists each row's sample lengths from the left, then zeros (``[[2, 3, 0, 0, 0, 0], ...]``:
    row 0 holds a 2-token and a 3-token sample, then one pad). Every sample becomes its own packed sequence.

    Returns:
        ``(hidden_states [total, ...], indices int64 [total], cu_seqlens int32 [samples + 1], max_seqlen int)``.
    """
    _check_batch(hidden_states, attention_mask_in_length, "attention_mask_in_length")
    if attention_mask_in_length.is_floating_point() or attention_mask_in_length.is_complex():
        raise TypeError(f"attention_mask_in_length must hold integer lengths, got {attention_mask_in_length.dtype}")
    lens = attention_mask_in_length.to(torch.int64)
    if (lens < 0).any():
        raise ValueError("attention_mask_in_length holds a negative length")
    seqlen = lens.shape[1]
    total = lens.sum(dim=-1)
    if (total > seqlen).any():
        raise ValueError(f"attention_mask_in_length: a row's lengths add up to more than seqlen={seqlen}")
    keep = torch.arange(seqlen, device=lens.device)[None, :] < total[:, None]
    samples = lens.flatten()[lens.flatten() > 0].to(torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    max_seqlen = int(samples.max()) if samples.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(samples, dim=0, dtype=torch.int32), (1, 0))
    return _IndexFirstAxis.apply(hidden_states.flatten(0, 1), indices), indices, cu_seqlens, max_seqlen


def pad_input(hidden_states, indices, batch, seqlen):
    """The inverse of :func:`unpad_input` (flash-attn's ``pad_input``): packed ``[total, ...]`` rows written at
    ``indices`` of a zero ``[batch, seqlen, ...]``.

    Args:
        hidden_states: ``[total, ...]``.
        indices: int64 ``[total]`` (from :func:`unpad_input`).
        batch, seqlen: ints, the padded shape.
    """
    batch, seqlen = _count("batch", batch), _count("seqlen", seqlen)
    out = _index_put("hidden_states", hidden_states, indices, batch * seqlen)
    return out.reshape((batch, seqlen) + tuple(hidden_states.shape[1:]))
