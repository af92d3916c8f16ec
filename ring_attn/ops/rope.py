"""Fused RoPE: one Triton launch rotates q and k, angles computed in-kernel from global positions.

Public API (re-exported from ``ring_attn``):

* :func:`apply_rope` ``(q, k, positions, inv_freq, attention_scaling=1.0, interleaved=False, rotary_dim=None,
  inplace=False) -> (q_rot, k_rot)``: the angle ``position * inv_freq[i]`` is formed in-kernel in float64 (exact
  for integer positions below 2^29 and float32 ``inv_freq``), reduced modulo 2π with a three-piece Cody-Waite
  constant, and only then rounded to float32 for ``sin``/``cos``: accurate to <= 2e-7 rad at every position up
  to 2^29 - 1 (tested) while the angle stays below 2^29 turns (``inv_freq <= 2π``; every RoPE scaling gives
  ``inv_freq <= 1``, and a frequency above π rad per token aliases anyway), where at 2^24 a float32 product is
  already off by up to 0.5 rad. No cos/sin table is read. Differentiable with respect to q, k and (when it
  requires grad) ``inv_freq``.
* :func:`apply_rope_cos_sin` ``(q, k, cos, sin, unsqueeze_dim=1)``: HF's ``apply_rotary_pos_emb`` signature,
  reading the given tables, for drop-in use.
* :func:`apply_rotary_emb` ``(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
  max_seqlen=None)``: flash-attn's ``flash_attn.layers.rotary.apply_rotary_emb`` (``ring_attn.layers.rotary``).
* :func:`rotate_parts_`: the q and k parts of one packed tensor rotated in place from tables (one launch when
  they share tables): what ``ring_attn.layers.rotary``'s ``apply_rotary_emb_qkv_``, ``apply_rotary_emb_kv_``
  and ``RotaryEmbedding`` run.

Backend: ``ring_attn.backends.select("rope", ...)`` per call: Triton on CUDA (and on CPU under
``TRITON_INTERPRET=1``), the native CPU extension when built, else the plain-torch reference backend (float32
math, float64 angles). This module validates, handles autograd (the backward is another backend launch, plus
the float64 reduction of ``d/dinv_freq``), and calls the backend's ``rope`` (``ring_attn/backends/protocol.py``)
with every tensor viewed 4-D (a packed ``[t, h, d]`` tensor as ``[1, t, h, d]``).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from ring_attn import backends, reference
from ring_attn._contracts import check_flag, check_inplace_target, check_no_overlap, check_real, scalar_option
from ring_attn.ops._dispatch import traced

__all__ = ["apply_rope", "apply_rope_cos_sin", "apply_rotary_emb", "check_rotary_x", "rotate_by_tables",
           "rotate_parts_", "MAX_POSITION", "positions_in_range"]

_STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_POSITION_DTYPES = (torch.int32, torch.int64)
_INV_FREQ_DTYPES = (torch.float32, torch.float64)


def _as4d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x


def _select(q: torch.Tensor, rotary_dim: int):
    """The backend module for a RoPE launch on q's device/dtype (ring_attn.backends.select)."""
    return backends.select("rope", q.device, q.dtype, rotary_dim)


# ---------------------------------------------------------------------------------------------------------
# Validation (everything is checked before any launch)

#: positions must lie in [0, MAX_POSITION): below 2^29 a position times a float32 inv_freq is exact in float64,
#: which the in-kernel angle's accuracy (<= 2e-7 rad) rests on; past it the error grows (5e-5 rad at 2^40). The
#: mod-2π reduction is exact for angles below 2^29 turns, i.e. inv_freq <= 2π at every allowed position (larger
#: frequencies, which alias, lose accuracy: 3e-5 rad at inv_freq 850 and position 2^29 - 1)
MAX_POSITION = 2**29

# Positions already checked to lie in [0, MAX_POSITION): id(tensor) -> (weakref, version). A model calls
# apply_rope once per layer with the same positions tensor; checking a CUDA tensor costs a device sync, so each
# tensor (at each in-place version) is checked once.
_CHECKED_POSITIONS: dict[int, tuple[weakref.ref, int]] = {}


def positions_in_range(positions: torch.Tensor) -> bool:
    """Whether every position of the integer tensor ``positions`` lies in ``[0, MAX_POSITION)``, what
    :func:`apply_rope` accepts. One host read (a device sync on CUDA) per tensor and in-place version: a tensor
    found in range is remembered, so ``apply_rope``'s own check of it costs nothing afterwards."""
    key = id(positions)
    seen = _CHECKED_POSITIONS.get(key)
    if seen is not None and seen[0]() is positions and seen[1] == positions._version:
        return True
    if positions.numel():
        low, high = (int(x) for x in torch.stack(torch.aminmax(positions)).tolist())
        if low < 0 or high >= MAX_POSITION:
            return False
    if len(_CHECKED_POSITIONS) > 64:
        _CHECKED_POSITIONS.clear()
    try:
        _CHECKED_POSITIONS[key] = (weakref.ref(positions), positions._version)
    except TypeError:  # not weak-referenceable: just check every time
        pass
    return True


def _check_position_range(positions: torch.Tensor) -> None:
    if positions_in_range(positions):
        return
    low, high = (int(x) for x in torch.stack(torch.aminmax(positions)).tolist())  # (the error path only)
    if low < 0:
        raise ValueError(f"positions must be >= 0 (global token positions), got a minimum of {low}")
    raise ValueError(f"positions must be < 2^29 = {MAX_POSITION} (the angle's float64 product is exact only "
                     f"below it), got a maximum of {high}")


def _check_qk(q, k, name_q="q", name_k="k", hf_layout=False):
    """q and k as the kernel reads them, ``[b, s, h, d]`` / ``[t, h, d]``; ``hf_layout``: they are views of the
    caller's ``[b, h, s, d]`` tensors, whose shapes the messages then show."""
    for name, t in ((name_q, q), (name_k, k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _STORAGE_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [b, s, h, d] or packed [t, h, d]")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k dtypes differ: q {q.dtype}, k {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k are on different devices: q {q.device}, k {k.device}")
    if q.dim() != k.dim() or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        if hf_layout:
            raise ValueError(f"q {tuple(q.transpose(1, 2).shape)} and k {tuple(k.transpose(1, 2).shape)} must "
                             "agree on [b, *, s, d] (HF's layout, unsqueeze_dim=1; head counts may differ)")
        lead = "[b, s, *, d]" if q.dim() == 4 else "[t, *, d]"
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on {lead} (head counts may differ)")


def _check_attention_scaling(value) -> float:
    """``attention_scaling`` as a float: TypeError unless a real number, ValueError unless finite (a
    one-element real tensor, as a rotary module may hold it, is read once; one that requires grad is refused:
    no gradient would reach it)."""
    return check_real("attention_scaling", scalar_option("attention_scaling", value, int_tensors=True),
                      "a finite float")


def _validate(q, k, positions, inv_freq, rotary_dim):
    _check_qk(q, k)
    d = q.shape[-1]
    if not isinstance(inv_freq, torch.Tensor):
        raise TypeError(f"inv_freq must be a torch.Tensor, got {type(inv_freq).__name__}")
    if inv_freq.dtype not in _INV_FREQ_DTYPES:
        raise TypeError(f"inv_freq has dtype {inv_freq.dtype}; expected float32 (or float64)")
    if inv_freq.dim() != 1 or inv_freq.numel() == 0:
        raise ValueError(f"inv_freq has shape {tuple(inv_freq.shape)}; expected [rotary_dim // 2]")
    if inv_freq.device != q.device:
        raise ValueError(f"inv_freq is on {inv_freq.device} but q is on {q.device}")
    if rotary_dim is None:
        rotary_dim = 2 * inv_freq.numel()
    if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool):
        raise TypeError(f"rotary_dim must be an int, got {type(rotary_dim).__name__}")
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    if rotary_dim > d:
        raise ValueError(f"rotary_dim {rotary_dim} is larger than the head dim {d} of q {tuple(q.shape)}")
    if inv_freq.numel() != rotary_dim // 2:
        raise ValueError(f"inv_freq has shape {tuple(inv_freq.shape)}; expected [{rotary_dim // 2}] "
                         f"(rotary_dim {rotary_dim} / 2)")
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype not in _POSITION_DTYPES:
        raise TypeError(f"positions has dtype {positions.dtype}; expected int32 or int64")
    if positions.device != q.device:
        raise ValueError(f"positions are on {positions.device} but q is on {q.device}")
    if q.dim() == 4:
        b, s = q.shape[:2]
        ok = positions.shape == (s,) or (positions.dim() == 2 and positions.shape[1] == s
                                         and positions.shape[0] in (1, b))
        if not ok:
            raise ValueError(f"positions have shape {tuple(positions.shape)}; for q {tuple(q.shape)} expected "
                             f"[{s}], [{b}, {s}] or [1, {s}]")
    else:
        t = q.shape[0]
        if positions.shape != (t,):
            raise ValueError(f"positions have shape {tuple(positions.shape)}; for packed q {tuple(q.shape)} "
                             f"expected [{t}]")
    return rotary_dim


def _positions_2d(positions: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``[B or 1, S]`` view of the positions matching the 4-D view of q."""
    return positions.unsqueeze(0) if positions.dim() == 1 else positions


# ---------------------------------------------------------------------------------------------------------
# autograd


# Custom ops: opaque to torch.compile (no graph break: the value check of the positions and the backend call run
# outside the traced graph), differentiable via register_autograd. The in-place form stays an autograd Function
# (_RopeInplaceFunction, below) with the same backward.


def _rope_launch(q, k, qo, ko, positions, inv_freq, scaling, interleaved, rotary_dim, backward, qy=None, ky=None,
                 dtheta=None, copy_pass=True):
    _select(q, rotary_dim).rope(_as4d(q), _as4d(k), _as4d(qo), _as4d(ko), rotary_dim=rotary_dim,
                                interleaved=interleaved, backward=backward, copy_pass=copy_pass,
                                pos2=_positions_2d(positions, q), inv_freq=inv_freq.contiguous(), scaling=scaling,
                                cos3=None,
                                sin3=None, qy4=None if qy is None else _as4d(qy),
                                ky4=None if ky is None else _as4d(ky), dtheta=dtheta)


def _rope_forward_impl(q, k, positions, inv_freq, scaling: float, interleaved: bool, rotary_dim: int):
    """The out-of-place forward: inside the custom op (traced calls) or directly (eager, :class:`_EagerRope`)."""
    _check_position_range(positions)  # a host read (once per positions tensor): here, outside any traced graph
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    _rope_launch(q, k, qo, ko, positions, inv_freq, scaling, interleaved, rotary_dim, backward=False)
    return qo, ko


@torch.library.custom_op("ring_attn::rope_forward", mutates_args=())
def _rope_forward_op(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                     scaling: float, interleaved: bool, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_forward_impl(q, k, positions, inv_freq, scaling, interleaved, rotary_dim)


@_rope_forward_op.register_fake
def _(q, k, positions, inv_freq, scaling, interleaved, rotary_dim):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("ring_attn::rope_backward", mutates_args=())
def _rope_backward_op(gq: torch.Tensor, gk: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                      qy: Optional[torch.Tensor], ky: Optional[torch.Tensor], scaling: float, interleaved: bool,
                      rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rope_backward_impl(gq, gk, positions, inv_freq, qy, ky, scaling, interleaved, rotary_dim)


def _rope_backward_impl(gq, gk, positions, inv_freq, qy, ky, scaling: float, interleaved: bool, rotary_dim: int):
    """dq, dk, and d/dinv_freq when the rotated outputs ``qy``/``ky`` are given (else an empty tensor)."""
    dq, dk = torch.empty_like(gq), torch.empty_like(gk)
    dtheta = None
    if qy is not None:
        B, S = _as4d(gq).shape[:2]
        acc = torch.float64 if gq.dtype == torch.float64 else torch.float32
        dtheta = torch.empty((B * S, rotary_dim // 2), dtype=acc, device=gq.device)
    _rope_launch(gq, gk, dq, dk, positions, inv_freq, scaling, interleaved, rotary_dim, backward=True, qy=qy,
                 ky=ky, dtheta=dtheta)
    if dtheta is None:
        return dq, dk, inv_freq.new_empty(0)
    B, S = _as4d(gq).shape[:2]
    pos_tok = _positions_2d(positions, gq).expand(B, S).reshape(-1).to(torch.float64)
    return dq, dk, (pos_tok[:, None] * dtheta.to(torch.float64)).sum(0).to(inv_freq.dtype)


@_rope_backward_op.register_fake
def _(gq, gk, positions, inv_freq, qy, ky, scaling, interleaved, rotary_dim):
    return torch.empty_like(gq), torch.empty_like(gk), inv_freq.new_empty(inv_freq.shape if qy is not None else 0)


def _rope_setup_context(ctx, inputs, output):
    q, k, positions, inv_freq, scaling, interleaved, rotary_dim = inputs
    ctx.meta = (scaling, interleaved, rotary_dim)
    ctx.need_dtheta = inv_freq.requires_grad
    ctx.save_for_backward(positions, inv_freq, *(output if ctx.need_dtheta else ()))


def _rope_backward(ctx, gq, gk):
    positions, inv_freq, *rotated = ctx.saved_tensors
    qy, ky = rotated if rotated else (None, None)
    dq, dk, dinv = torch.ops.ring_attn.rope_backward(gq, gk, positions, inv_freq, qy, ky, *ctx.meta)
    return dq, dk, None, dinv if ctx.need_dtheta else None, None, None, None


torch.library.register_autograd("ring_attn::rope_forward", _rope_backward, setup_context=_rope_setup_context)


class _EagerRope(torch.autograd.Function):
    """The ``rope_forward`` op and its backward as a plain autograd Function, for eager calls (see
    ``ring_attn.ops._dispatch``): less host time per call, the same functions, the same bits."""

    @staticmethod
    def forward(ctx, q, k, positions, inv_freq, scaling, interleaved, rotary_dim):
        qo, ko = _rope_forward_impl(q, k, positions, inv_freq, scaling, interleaved, rotary_dim)
        _rope_setup_context(ctx, (q, k, positions, inv_freq, scaling, interleaved, rotary_dim), (qo, ko))
        return qo, ko

    @staticmethod
    def backward(ctx, gq, gk):
        positions, inv_freq, *rotated = ctx.saved_tensors
        qy, ky = rotated if rotated else (None, None)
        dq, dk, dinv = _rope_backward_impl(gq, gk, positions, inv_freq, qy, ky, *ctx.meta)
        return dq, dk, None, dinv if ctx.need_dtheta else None, None, None, None


def _rope_table(x, y, cos3, sin3, dtype, backward):
    """One table-mode launch: (x, y) rotated by the cos/sin tables (backward: by their inverse) into ``dtype``."""
    xo, yo = torch.empty_like(x, dtype=dtype), torch.empty_like(y, dtype=dtype)
    _select(x, cos3.shape[-1]).rope(x, y, xo, yo, rotary_dim=cos3.shape[-1], interleaved=False, backward=backward,
                                    copy_pass=True, pos2=None, inv_freq=None, scaling=1.0, cos3=cos3, sin3=sin3,
                                    qy4=None, ky4=None, dtheta=None)
    return xo, yo


@torch.library.custom_op("ring_attn::rope_table_forward", mutates_args=())
def _rope_table_forward_op(q4: torch.Tensor, k4: torch.Tensor, cos3: torch.Tensor, sin3: torch.Tensor,
                           out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_table(q4, k4, cos3, sin3, out_dtype, backward=False)


@_rope_table_forward_op.register_fake
def _(q4, k4, cos3, sin3, out_dtype):
    return torch.empty_like(q4, dtype=out_dtype), torch.empty_like(k4, dtype=out_dtype)


@torch.library.custom_op("ring_attn::rope_table_backward", mutates_args=())
def _rope_table_backward_op(gq: torch.Tensor, gk: torch.Tensor, cos3: torch.Tensor, sin3: torch.Tensor,
                            in_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_table(gq, gk, cos3, sin3, in_dtype, backward=True)


@_rope_table_backward_op.register_fake
def _(gq, gk, cos3, sin3, in_dtype):
    return torch.empty_like(gq, dtype=in_dtype), torch.empty_like(gk, dtype=in_dtype)


def _rope_table_setup_context(ctx, inputs, output):
    q4, k4, cos3, sin3, out_dtype = inputs
    ctx.save_for_backward(cos3, sin3)
    ctx.in_dtype = q4.dtype


def _rope_table_backward(ctx, gq, gk):
    cos3, sin3 = ctx.saved_tensors
    dq, dk = torch.ops.ring_attn.rope_table_backward(gq, gk, cos3, sin3, ctx.in_dtype)
    return dq, dk, None, None, None


torch.library.register_autograd("ring_attn::rope_table_forward", _rope_table_backward,
                                setup_context=_rope_table_setup_context)


class _RopeInplaceFunction(torch.autograd.Function):
    """The in-place form (``inplace=True``): q and k are overwritten (the dims past rotary_dim are left as they
    are) and marked dirty; the backward is the ``rope_backward`` op, as for the out-of-place form."""

    @staticmethod
    def forward(ctx, q, k, positions, inv_freq, scaling, interleaved, rotary_dim):
        _rope_launch(q, k, q, k, positions, inv_freq, scaling, interleaved, rotary_dim, backward=False,
                     copy_pass=False)
        ctx.mark_dirty(q, k)
        ctx.need_dtheta = ctx.needs_input_grad[3]
        ctx.meta = (scaling, interleaved, rotary_dim)
        ctx.save_for_backward(positions, inv_freq, *((q, k) if ctx.need_dtheta else ()))
        return q, k

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq, gk):
        return _rope_backward(ctx, gq, gk)


# ---------------------------------------------------------------------------------------------------------
# Public API


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               attention_scaling: float = 1.0, interleaved: bool = False, rotary_dim: int | None = None,
               inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k in one fused launch, angles computed from global positions.

    Args:
        q: ``[b, s, h_q, d]`` or packed ``[t, h_q, d]``; float16, bfloat16, float32 (float32 math) or float64
            (float64 math). Any strides (views of a fused qkv projection work without copies).
        k: ``[b, s, h_k, d]`` / ``[t, h_k, d]``, same dtype and device as q; ``h_k`` may differ from ``h_q``.
        positions: int32/int64 *global* positions, ``[s]`` (shared by the batch), ``[b, s]`` / ``[1, s]``, or
            ``[t]`` for packed q. Zigzag/striped shards and packed sequences pass their own positions.
        inv_freq: float32 ``[rotary_dim // 2]`` (from :mod:`ring_attn.rope_scaling`); float64 is accepted. When it
            requires grad, its gradient is returned (learnable per-frequency theta).
        attention_scaling: multiplies cos and sin (YaRN / LongRoPE attention factor).
        interleaved: pair dims ``(2i, 2i+1)`` (GPT-J / Meta) instead of ``(i, i + rotary_dim/2)`` (HF / GPT-NeoX).
        rotary_dim: dims rotated (the first ``rotary_dim``; the rest pass through). Default ``2 * len(inv_freq)``.
        inplace: write the result into q and k (they must not be leaves that require grad) and return them.

    Returns:
        ``(q_rot, k_rot)``, same shapes and dtypes as q and k (new contiguous tensors unless ``inplace``).
        Pair ``i`` at position ``p`` rotates by ``p * inv_freq[i]``, computed in float64 and reduced mod 2π in
        the kernel (accurate to <= 2e-7 rad for every position below 2^29 = ``MAX_POSITION`` while
        ``inv_freq <= 2π``, as every RoPE scaling's is).

    Raises:
        TypeError: wrong dtypes (q/k not floating, q and k differ, positions not int32/int64, inv_freq not float);
            ``interleaved`` / ``inplace`` not bools, ``attention_scaling`` not a real number.
        ValueError: bad shapes (q/k disagree, positions not ``[s]``/``[b, s]``/``[t]``), odd, non-positive or
            too-large ``rotary_dim``, ``len(inv_freq) != rotary_dim / 2``, positions < 0 or >= 2^29, tensors on
            different devices, a non-finite ``attention_scaling`` (or a tensor one that requires grad); with
            ``inplace``, q and k that share memory or a tensor whose elements do (an expanded view). All raised
            before any launch.
    """
    rotary_dim = _validate(q, k, positions, inv_freq, rotary_dim)
    scaling = _check_attention_scaling(attention_scaling)
    interleaved, inplace = check_flag("interleaved", interleaved), check_flag("inplace", inplace)
    if not torch.compiler.is_compiling():
        _select(q, rotary_dim)  # no backend for this device/dtype: the error, before anything runs
    if inplace:
        check_inplace_target("q", q)
        check_inplace_target("k", k)
        check_no_overlap("apply_rope", ("q", q), ("k", k))
        _check_position_range(positions)
        return _RopeInplaceFunction.apply(q, k, positions, inv_freq, scaling, interleaved, rotary_dim)
    if traced(q, k, positions, inv_freq):
        return torch.ops.ring_attn.rope_forward(q, k, positions, inv_freq, scaling, interleaved, rotary_dim)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or inv_freq.requires_grad):
        return _EagerRope.apply(q, k, positions, inv_freq, scaling, interleaved, rotary_dim)
    return _rope_forward_impl(q, k, positions, inv_freq, scaling, interleaved, rotary_dim)


def apply_rope_cos_sin(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for HF's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` (half-split pairing).

    Args:
        q, k: ``[b, h, s, d]`` (``unsqueeze_dim=1``, HF's attention layout) or ``[b, s, h, d]``
            (``unsqueeze_dim=2``); head counts may differ.
        cos, sin: ``[b, s, r]`` or ``[1, s, r]`` tables as HF's rotary embedding returns them (scaling included,
            halves duplicated); ``r <= d`` (dims ``r .. d-1`` pass through).
        unsqueeze_dim: the head dim of q/k, as in HF.

    Returns:
        ``(q_embed, k_embed)`` shaped like q/k, in ``promote_types(q.dtype, cos.dtype)`` (as HF), fp32 math.
        Other shapes (tables that are not 3-D, e.g. 2-D ``[s, r]``; q/k that are not 4-D; another
        ``unsqueeze_dim``), or tables that require grad, run HF's formula in plain torch so the result and its
        autograd stay exactly HF's.

    Raises:
        TypeError / ValueError: as :func:`apply_rope` for q/k; tables of the wrong shape or device.
    """
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    fused = (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4 and k.dim() == 4
             and unsqueeze_dim in (1, 2) and cos.dim() == 3 and not (cos.requires_grad or sin.requires_grad))
    if fused:  # check q/k in the kernel's [b, s, h, d] view (HF's [b, h, s, d] transposed)
        hf_layout = unsqueeze_dim == 1
        _check_qk(q.transpose(1, 2) if hf_layout else q, k.transpose(1, 2) if hf_layout else k, hf_layout=hf_layout)
    else:  # HF's formula, with its broadcasting: the layout is whatever it broadcasts to
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if q.device != k.device:
            raise ValueError(f"q and k are on different devices: q {q.device}, k {k.device}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if fused:
        # kernel view: [b, s, h, d]
        q4 = q.transpose(1, 2) if unsqueeze_dim == 1 else q
        k4 = k.transpose(1, 2) if unsqueeze_dim == 1 else k
        b, s, _, d = q4.shape
        r = cos.shape[-1]
        if cos.shape[1] != s or cos.shape[0] not in (1, b):
            also = f" or [1, {s}, r]" if b != 1 else ""
            raise ValueError(f"cos/sin have shape {tuple(cos.shape)}; expected [{b}, {s}, r]{also} for q "
                             f"{tuple(q.shape)} with unsqueeze_dim={unsqueeze_dim}")
        if r % 2 or r <= 0 or r > d:
            raise ValueError(f"cos/sin last dim {r} must be even, positive and <= head dim {d}")
        out_dtype = torch.promote_types(q.dtype, cos.dtype)
        if not torch.compiler.is_compiling():
            _select(q4, r)  # no backend for this device/dtype: the error, before anything runs
        qo, ko = torch.ops.ring_attn.rope_table_forward(q4, k4, cos, sin, out_dtype)
        if unsqueeze_dim == 1:
            qo, ko = qo.transpose(1, 2), ko.transpose(1, 2)
        return qo, ko
    q_out, k_out = reference.rope_cos_sin(q, k, cos, sin, unsqueeze_dim)
    return q_out, k_out


# ---------------------------------------------------------------------------------------------------------
# flash-attn's apply_rotary_emb (ring_attn.layers.rotary): one tensor, cos/sin tables indexed by position


def _rotary_table_launch(x4: torch.Tensor, out4: torch.Tensor, cos3: torch.Tensor, sin3: torch.Tensor,
                         interleaved: bool, backward: bool, k4: Optional[torch.Tensor] = None) -> None:
    """One table-mode launch rotating ``x4`` ``[B, S, H, D]`` into ``out4`` (the same tensor when in place: the
    dims past the table's are then left as they are; else copied). ``k4``: a second tensor rotated in place by
    the same tables in the same launch (the protocol's k), else none."""
    k4 = x4[:, :, :0] if k4 is None else k4
    kout4 = out4[:, :, :0] if k4.shape[2] == 0 else k4
    _select(x4, cos3.shape[-1]).rope(x4, k4, out4, kout4, rotary_dim=cos3.shape[-1], interleaved=interleaved,
                                     backward=backward, copy_pass=out4 is not x4, pos2=None, inv_freq=None,
                                     scaling=1.0, cos3=cos3, sin3=sin3, qy4=None, ky4=None, dtheta=None)


def _rotary_tables(cos: torch.Tensor, sin: torch.Tensor, positions, interleaved: bool,
                   inside: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's table-mode tables ``[B or 1, S, rotary_dim]`` (each element's own cos/sin) from flash-attn's
    ``[seqlen_ro, rotary_dim / 2]`` rows at int ``positions`` ``[B or 1, S]`` (or a ``slice`` of rows shared by
    every batch row); tokens where ``inside`` (bool, the shape of ``positions``) is False get the identity
    rotation (cos 1, sin 0: left as they are)."""
    if isinstance(positions, slice):
        c, s = cos[positions][None], sin[positions][None]
    else:
        c, s = cos[positions], sin[positions]
    if inside is not None:
        c, s = torch.where(inside[..., None], c, 1), torch.where(inside[..., None], s, 0)
    if interleaved:  # pairs (2i, 2i+1) share row i
        return c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)
    return torch.cat([c, c], -1), torch.cat([s, s], -1)


def rotate_by_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions,
                     interleaved: bool, inplace: bool = False, inside: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` ``[B, S, H, D]`` (or packed ``[T, H, D]`` with ``positions`` ``[1, T]``) with each token's first
    ``2 · cos.shape[1]`` dims rotated by row ``positions[b, s]`` of ``cos``/``sin`` ``[seqlen_ro, rotary_dim / 2]``
    (one table-mode launch of the RoPE kernel; fp32 math, fp64 for fp64 x; the other dims copied, or left as they
    are in place). No autograd and no checks: the caller has validated the shapes and that every position has
    a row; tokens where ``inside`` is False are left unrotated. What :func:`apply_rotary_emb` and
    ``flash_attn_with_kvcache``'s rotary embedding run."""
    cos3, sin3 = _rotary_tables(cos, sin, positions, interleaved, inside)
    out = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
    _rotary_table_launch(_as4d(x), _as4d(out), cos3, sin3, interleaved, backward=False)
    return out


class _RotaryEmb(torch.autograd.Function):
    """``x`` rotated by per-token tables ``cos3``/``sin3`` ``[B or 1, S, rotary_dim]`` (each element's own
    value); the backward is the transpose rotation (another launch)."""

    @staticmethod
    def forward(ctx, x, cos3, sin3, interleaved, inplace):
        out = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
        _rotary_table_launch(_as4d(x), _as4d(out), cos3, sin3, interleaved, backward=False)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(cos3, sin3)
        ctx.interleaved = interleaved
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos3, sin3 = ctx.saved_tensors
        gx = torch.empty_like(grad, memory_format=torch.contiguous_format)
        _rotary_table_launch(_as4d(grad), _as4d(gx), cos3, sin3, ctx.interleaved, backward=True)
        return gx, None, None, None, None


def _rotary_positions(x, seqlen_offsets, cu_seqlens, max_seqlen):
    """Each token's row of the cos/sin tables, int64 ``[B, S]`` (packed: ``[1, total]``; dense ``x`` with an int
    offset: the ``slice`` of rows every batch row reads); for packed ``x`` the rows that lie in some sequence
    (bool ``[1, total]``; the others keep position 0 and are left unrotated), else None; and ``(lowest,
    highest)`` position of those rows when known on the host without a device sync (an int offset over a dense
    ``x``, or anything on the CPU), else None (checked on the device)."""
    dev = x.device
    inside = None
    if not isinstance(seqlen_offsets, torch.Tensor) and (isinstance(seqlen_offsets, bool) or
                                                         not isinstance(seqlen_offsets, int) or seqlen_offsets < 0):
        raise ValueError(f"seqlen_offsets must be an int >= 0 or a tensor [batch], got {seqlen_offsets!r}")
    if cu_seqlens is None and not isinstance(seqlen_offsets, torch.Tensor):
        # every row reads table rows off .. off + s - 1: a slice of the tables (no index tensor, no gather)
        s = x.shape[1]
        return slice(seqlen_offsets, seqlen_offsets + s), None, ((seqlen_offsets, seqlen_offsets + s - 1) if s
                                                                  else None)
    if cu_seqlens is None:
        b, s = x.shape[0], x.shape[1]
        base = torch.arange(s, device=dev)[None, :]
        n_seqs = b
    else:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or \
                cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.device != dev:
            raise ValueError(f"cu_seqlens must be an int32 tensor [batch + 1] on {dev}")
        cu = cu_seqlens.long()
        sane = (cu[0] >= 0) & (cu[-1] <= x.shape[0]) & (cu[1:] >= cu[:-1]).all()
        what = f"cu_seqlens must be non-decreasing, from >= 0 to at most the {x.shape[0]} packed rows of x"
        if dev.type == "cpu":
            if not bool(sane):
                shown = cu.tolist()
                raise ValueError(f"{what}, got {shown if len(shown) <= 10 else shown[:10] + ['...']}")
        else:
            torch._assert_async(sane, what)
        t = torch.arange(x.shape[0], device=dev)
        seq = torch.searchsorted(cu[1:], t, right=True).clamp(max=cu.numel() - 2)
        inside = ((t >= cu[0]) & (t < cu[-1]))[None, :]  # rows past cu_seqlens[-1] belong to no sequence
        base = torch.where(inside, (t - cu[seq])[None, :], 0)
        n_seqs = cu.numel() - 1
    if isinstance(seqlen_offsets, torch.Tensor):
        if seqlen_offsets.dim() != 1 or seqlen_offsets.shape[0] != n_seqs or seqlen_offsets.dtype not in \
                (torch.int32, torch.int64) or seqlen_offsets.device != dev:
            raise ValueError(f"seqlen_offsets must be an int or an int32/int64 tensor [batch={n_seqs}] on {dev}, got "
                             f"{seqlen_offsets.dtype} {tuple(seqlen_offsets.shape)} on {seqlen_offsets.device}")
        offs = seqlen_offsets.long()
        pos = base + (offs[:, None] if cu_seqlens is None else offs[seq][None, :])
    else:
        pos = base + seqlen_offsets
    if inside is not None:
        pos = torch.where(inside, pos, 0)
    if dev.type == "cpu":
        used = pos if inside is None else pos[inside]
        return pos, inside, ((int(used.min()), int(used.max())) if used.numel() else None)
    return pos, inside, None


def check_rotary_x(name: str, x, dims, layout: str) -> None:
    """``x`` for the flash-attn rotary functions: a float16/bfloat16/float32/float64 tensor (TypeError) with
    ``dims`` dimensions (an int or a tuple of the accepted counts), else ValueError showing ``layout``."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _STORAGE_DTYPES:
        raise TypeError(f"{name} must be a float16/bfloat16/float32/float64 tensor {layout}, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() not in ((dims,) if isinstance(dims, int) else dims):
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")


def _check_rotary_tables(x: torch.Tensor, cos, sin, names: tuple[str, str] = ("cos", "sin"),
                         head_dim: Optional[int] = None) -> int:
    """flash-attn's ``[seqlen_ro, rotary_dim / 2]`` tables for ``x``: floating, on x's device, alike, with
    ``2 <= rotary_dim <= head_dim`` (x's last dim unless given). Returns ``rotary_dim``."""
    for name, t in zip(names, (cos, sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2 or t.device != x.device:
            raise ValueError(f"{name} must be a floating tensor [seqlen_ro, rotary_dim / 2] on {x.device}, got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}"
                             f"{' ' + str(tuple(t.shape)) if isinstance(t, torch.Tensor) else ''}")
    if cos.shape != sin.shape:
        raise ValueError(f"{names[0]} {tuple(cos.shape)} and {names[1]} {tuple(sin.shape)} must have the same "
                         f"shape")
    rotary_dim = 2 * cos.shape[1]
    head_dim = x.shape[-1] if head_dim is None else head_dim
    if not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim = 2 * {names[0]}.shape[1] = {rotary_dim} must be in [2, head_dim={head_dim}]")
    return rotary_dim


def _rotary_rows(x, tables, seqlen_offsets, cu_seqlens, max_seqlen, name: str):
    """Each token's table row and the packed rows in some sequence (:func:`_rotary_positions`), checked against
    the row count of every table in ``tables`` (``(cos,)`` or ``(cos, cos_k)``): on the host where the positions
    are known there (ValueError), else a device-side assert; clamped in bounds while that check is pending."""
    pos, inside, bounds = _rotary_positions(x, seqlen_offsets, cu_seqlens, max_seqlen)
    rows, which = min((t.shape[0], "cos/sin" if i == 0 else "cos_k/sin_k") for i, t in enumerate(tables))
    highest = bounds[1] if bounds is not None else None
    if highest is None and isinstance(seqlen_offsets, int) and max_seqlen is not None:
        highest = seqlen_offsets + int(max_seqlen) - 1  # flash-attn's bound: the tables cover max_seqlen rows
    if highest is not None and highest >= rows:
        raise ValueError(f"positions reach {highest} but {which} have {rows} rows (seqlen_ro): every "
                         f"position (token index + seqlen_offsets) must have a row")
    if bounds is not None and bounds[0] < 0:
        raise ValueError(f"seqlen_offsets put a token at position {bounds[0]}: positions must be >= 0")
    if isinstance(pos, slice):  # in bounds: checked above
        return pos, inside
    if bounds is None and pos.numel():
        torch._assert_async(((pos >= 0) & (pos < rows)).all(),
                            f"{name}: a position is negative or reaches past {which} ({rows} rows)")
    return pos.clamp(0, rows - 1), inside


@torch.compiler.disable  # host reads and Triton launches outside any graph (a graph break under compile)
def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """flash-attn's ``flash_attn.layers.rotary.apply_rotary_emb``: rotary embedding of the first ``rotary_dim``
    dims of ``x`` from cos/sin tables, one fused launch (the backend's RoPE kernel in table mode).

    Args:
        x: ``[batch, seqlen, heads, head_dim]``, or packed ``[total, heads, head_dim]`` with ``cu_seqlens``;
            float16, bfloat16, float32 or float64.
        cos, sin: ``[seqlen_ro, rotary_dim / 2]`` (row ``p``: position ``p``), floating, on x's device;
            ``rotary_dim <= head_dim``.
        interleaved: True rotates dims pairs ``(2i, 2i+1)`` (GPT-J); False ``(i, i + rotary_dim / 2)`` (GPT-NeoX).
        inplace: write the result into ``x`` and return it.
        seqlen_offsets: int, or int32/int64 ``[batch]``: token ``j`` of sequence ``b`` takes row
            ``j + seqlen_offsets[b]`` of the tables (decoding with a KV cache).
        cu_seqlens: None, or int32 ``[batch + 1]`` for packed x (positions restart at each sequence).
        max_seqlen: the longest packed sequence (an upper bound; used for the host-side table check).

    Returns:
        ``x`` rotated, same shape and dtype (math in float32, float64 for float64 x); dims past ``rotary_dim``
        unchanged. Differentiable with respect to x (not cos/sin).

    Raises:
        TypeError / ValueError naming the argument, before any launch; ValueError when a position reaches past
        ``seqlen_ro`` (flash-attn leaves such tokens unrotated; here it is an error: on the host when the
        offsets are an int or CPU tensors, a device-side assert otherwise).
    """
    check_rotary_x("x", x, 3 if cu_seqlens is not None else 4,
                   "[batch, seqlen, heads, head_dim] (or packed [total, heads, head_dim] with cu_seqlens)")
    rotary_dim = _check_rotary_tables(x, cos, sin)
    interleaved, inplace = check_flag("interleaved", interleaved), check_flag("inplace", inplace)
    pos, inside = _rotary_rows(x, (cos,), seqlen_offsets, cu_seqlens, max_seqlen, "apply_rotary_emb")
    if inplace:
        check_inplace_target("x", x)
        check_no_overlap("apply_rotary_emb", ("x", x))
    _select(x, rotary_dim)  # no backend for this device/dtype: the error, before anything runs
    if torch.is_grad_enabled() and x.requires_grad:
        return _RotaryEmb.apply(x, *_rotary_tables(cos, sin, pos, interleaved, inside), interleaved, inplace)
    return rotate_by_tables(x, cos, sin, pos, interleaved, inplace, inside)


# flash-attn's in-place forms (apply_rotary_emb_qkv_, apply_rotary_emb_kv_, RotaryEmbedding): the q and k parts
# of one packed tensor rotated where they lie


def _rotate_parts_launch(t: torch.Tensor, split, tq, tk, interleaved: bool, backward: bool) -> None:
    """Rotate in place the two 4-D views ``split(t)`` (either may have no heads): one launch when both take the
    same tables ``tq``, else one per view."""
    q4, k4 = split(t)
    if tk is None:
        _rotary_table_launch(q4, q4, *tq, interleaved, backward, k4=k4)
        return
    for part, (c3, s3) in ((q4, tq), (k4, tk)):
        if part.shape[2]:
            _rotary_table_launch(part, part, c3, s3, interleaved, backward)


class _RotaryParts(torch.autograd.Function):
    """``base`` with the views ``split(base)`` rotated in place (marked dirty); the backward rotates the same
    views of a copy of the gradient by the transpose rotation."""

    @staticmethod
    def forward(ctx, base, split, tq, tk, interleaved):
        _rotate_parts_launch(base, split, tq, tk, interleaved, backward=False)
        ctx.mark_dirty(base)
        ctx.save_for_backward(*tq, *(tk if tk is not None else ()))
        ctx.split, ctx.interleaved = split, interleaved
        return base

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        tq, tk = saved[:2], (saved[2:] if len(saved) == 4 else None)
        g = grad.clone(memory_format=torch.contiguous_format)
        _rotate_parts_launch(g, ctx.split, tq, tk, ctx.interleaved, backward=True)
        return g, None, None, None, None


@torch.compiler.disable  # host reads and Triton launches outside any graph (a graph break under compile)
def rotate_parts_(x: torch.Tensor, split, head_dim: int, cos, sin, cos_k=None, sin_k=None, interleaved=False,
                  seqlen_offsets=0, name: str = "rotary") -> torch.Tensor:
    """In place: the q-part and k-part of ``x`` (``[batch, seqlen, ...]``), the two 4-D views
    ``split(t) -> (q [b, s, h_q, head_dim], k [b, s, h_k, head_dim])`` of ``x`` (or of its gradient, same shape),
    rotated by flash-attn's tables: q by ``cos``/``sin``, k by ``cos_k``/``sin_k`` (default the same), row
    ``j + seqlen_offsets[b]`` for token ``j`` of sequence ``b``. Returns ``x``; differentiable with respect to
    x (the transpose rotation), not the tables. ``x`` has been shape-checked by the caller; the tables and
    offsets are checked here, before any launch (a position past a table raises, as in
    :func:`apply_rotary_emb`)."""
    rotary_dim = _check_rotary_tables(x, cos, sin, head_dim=head_dim)
    tables = (cos,)
    if cos_k is not None or sin_k is not None:
        if cos_k is None or sin_k is None:
            raise ValueError(f"{name}: cos_k and sin_k go together (got only "
                             f"{'cos_k' if sin_k is None else 'sin_k'})")
        if _check_rotary_tables(x, cos_k, sin_k, ("cos_k", "sin_k"), head_dim) != rotary_dim:
            raise ValueError(f"{name}: cos_k {tuple(cos_k.shape)} must cover the rotary dims of cos "
                             f"{tuple(cos.shape)}")
        tables = (cos, cos_k)
    interleaved = check_flag("interleaved", interleaved)
    pos, _ = _rotary_rows(x, tables, seqlen_offsets, None, None, name)
    check_inplace_target(f"{name}: the rotated tensor", x)
    check_no_overlap(name, ("the rotated tensor", x))
    q4, _ = split(x)
    _select(q4, rotary_dim)  # no backend for this device/dtype: the error, before anything runs
    tq = _rotary_tables(cos, sin, pos, interleaved)
    tk = None if len(tables) == 1 else _rotary_tables(cos_k, sin_k, pos, interleaved)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RotaryParts.apply(x, split, tq, tk, interleaved)
    _rotate_parts_launch(x, split, tq, tk, interleaved, backward=False)
    return x
