"""Fused RoPE: one Triton launch rotates q and k, angles computed in-kernel from global positions.

Public API (re-exported from ``ring_attn``):

* :func:`apply_rope` ``(q, k, positions, inv_freq, attention_scaling=1.0, interleaved=False, rotary_dim=None,
  inplace=False) -> (q_rot, k_rot)``: the angle ``position * inv_freq[i]`` is formed in-kernel in float64 (exact
  for integer positions below 2^29 and float32 ``inv_freq``), reduced modulo 2π with a three-piece Cody-Waite
  constant, and only then rounded to float32 for ``sin``/``cos``: accurate to ~1e-7 rad at positions up to 2^24,
  where a float32 product is off by up to 0.5 rad. No cos/sin table is read. Differentiable with respect to q, k
  and (when it requires grad) ``inv_freq``.
* :func:`apply_rope_cos_sin` ``(q, k, cos, sin, unsqueeze_dim=1)``: HF's ``apply_rotary_pos_emb`` signature,
  reading the given tables, for drop-in use.

Backend: ``ring_attn.backend.select(q.device)``: Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1``), else
the plain-torch fallback in ``ring_attn.reference`` (float32 math, float64 angles).

Layout of one kernel launch (the host views every tensor as 4-D, a packed ``[t, h, d]`` tensor as
``[1, t, h, d]``, so one program == one token ``(bi, si)``):

* program ``pid`` in ``[0, B*S)``: ``bi = pid // S``, ``si = pid % S``; it rotates every q head and every k
  head of that token (different head counts, one launch), so the angles are computed once per token.
"""
from __future__ import annotations

import weakref

import torch

from ring_attn import backend, reference

if backend.triton_available():
    import triton
    import triton.language as tl

__all__ = ["apply_rope", "apply_rope_cos_sin"]

_STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_POSITION_DTYPES = (torch.int32, torch.int64)
_INV_FREQ_DTYPES = (torch.float32, torch.float64)
# Elements per [heads, pairs] tile: bounds registers per program; the head loop covers the rest.
_TILE_ELEMENTS = 4096


# ---------------------------------------------------------------------------------------------------------
# Kernel
#
# Every "x" tensor below is viewed as [B, S, H, D] with element strides (stride_b, stride_s, stride_h, stride_d);
# a stride may be 0 (broadcast) and the last one need not be 1 (Triton specializes it when it is).
#
#   x_ptr   q or k (forward: the input; backward: the incoming gradient)      [B, S, H_x, D]
#   o_ptr   the result (forward: rotated x; backward: grad wrt the input)     [B, S, H_x, D]   may alias x_ptr
#   y_ptr   backward only, NEED_DTHETA: the forward's output, for d/dtheta    [B, S, H_x, D]
#   pos_ptr positions, int32/int64, angle mode                                [B, S] strides (pos_b, pos_s),
#                                                                             pos_b == 0 for one row of positions
#   inv_ptr inv_freq, fp32/fp64, angle mode                                   [HALF] contiguous
#   cos_ptr, sin_ptr  table mode: scaled cos/sin, HF layout                   [B, S, ROT] strides (cs_b, cs_s, cs_d)
#   dth_ptr backward only, NEED_DTHETA: per-token sum over heads of dL/dangle  [B*S, HALF] contiguous, fp32/fp64
#
# Pairing: pair f (0 <= f < HALF = ROT/2) is dims (f, f + HALF) (half-split) or (2f, 2f + 1) (INTERLEAVED).
# Dims ROT .. D-1 pass through; they are copied when COPY_PASS (out-of-place), skipped when in place.
#
# Forward, per pair: [y1, y2] = [[c1, -s1], [s2, c2]] @ [x1, x2], where in angle mode c1 = c2 = a*cos(theta),
# s1 = s2 = a*sin(theta) (a = attention scaling), and in table mode c1/s1 are read at x1's dim and c2/s2 at x2's.
#
# Backward (BACKWARD): dL/dx = M^T dL/dy, M^T = [[c1, s2], [-s1, c2]]: the same code as the forward with
# (s1, s2) -> (-s2, -s1); in angle mode that is the rotation by the negative angle.
#
# d/dtheta (NEED_DTHETA, angle mode): dy1/dtheta = -a(x1 sin + x2 cos) = -y2 and dy2/dtheta = a(x1 cos - x2 sin)
# = y1, so dL/dtheta_f = sum over heads of (g2 * y1 - g1 * y2), using the saved forward output y (valid for the
# in-place variant too). With theta = position * inv_freq, dL/dinv_freq_f = sum over tokens of
# position * dL/dtheta_f: the kernel writes one row per token and the host reduces in float64, so the result is
# deterministic (no atomics).


# Kernels are defined only where Triton imports (Linux x86_64 wheels); elsewhere every call takes the
# reference backend (ring_attn.backend.select never picks 'triton' without it).
if backend.triton_available():
    @triton.jit
    def _round_bf16_rtne(x):
        """float32 -> the nearest bfloat16 value (ties to even), still as float32. Only used under the Triton
        interpreter, whose float32 -> bfloat16 cast truncates (rounds toward zero) while the GPU rounds to nearest."""
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


    @triton.jit
    def _load_pairs(ptr, row, stride_d, hmask, HALF: tl.constexpr, ROT: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_F: tl.constexpr, INTERLEAVED: tl.constexpr, COMPUTE: tl.constexpr):
        """``(x1, x2)``, each ``[BLOCK_H, BLOCK_F]``: the two members of every pair of ``BLOCK_H`` head rows."""
        if INTERLEAVED:
            # one contiguous [BLOCK_H, 2*BLOCK_F] load (vectorizes), then de-interleave in registers
            dd = tl.arange(0, 2 * BLOCK_F)
            xx = tl.load(ptr + row + dd[None, :] * stride_d, mask=hmask & (dd[None, :] < ROT), other=0.0)
            x1, x2 = tl.split(tl.reshape(xx.to(COMPUTE), [BLOCK_H, BLOCK_F, 2]))
        else:
            f = tl.arange(0, BLOCK_F)
            mask = hmask & (f[None, :] < HALF)
            x1 = tl.load(ptr + row + f[None, :] * stride_d, mask=mask, other=0.0).to(COMPUTE)
            x2 = tl.load(ptr + row + (f[None, :] + HALF) * stride_d, mask=mask, other=0.0).to(COMPUTE)
        return x1, x2


    @triton.jit
    def _store_pairs(ptr, row, stride_d, hmask, r1, r2, HALF: tl.constexpr, ROT: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr, INTERLEAVED: tl.constexpr, FIX_BF16: tl.constexpr):
        """Inverse of :func:`_load_pairs`, rounding to the pointer's element type."""
        if FIX_BF16:
            r1 = _round_bf16_rtne(r1)
            r2 = _round_bf16_rtne(r2)
        if INTERLEAVED:
            dd = tl.arange(0, 2 * BLOCK_F)
            rr = tl.reshape(tl.join(r1, r2), [BLOCK_H, 2 * BLOCK_F])
            tl.store(ptr + row + dd[None, :] * stride_d, rr.to(ptr.dtype.element_ty), mask=hmask & (dd[None, :] < ROT))
        else:
            f = tl.arange(0, BLOCK_F)
            mask = hmask & (f[None, :] < HALF)
            tl.store(ptr + row + f[None, :] * stride_d, r1.to(ptr.dtype.element_ty), mask=mask)
            tl.store(ptr + row + (f[None, :] + HALF) * stride_d, r2.to(ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _rope_heads(x_ptr, o_ptr, y_ptr, x_base, o_base, y_base,
                    stride_xh, stride_xd, stride_oh, stride_od, stride_yh, stride_yd, n_heads,
                    c1, s1, c2, s2, dtheta,
                    HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_P: tl.constexpr,
                    INTERLEAVED: tl.constexpr, COPY_PASS: tl.constexpr, NEED_DTHETA: tl.constexpr,
                    COMPUTE: tl.constexpr, FIX_BF16: tl.constexpr):
        """Rotate all heads of one token of one tensor; returns ``dtheta`` plus this tensor's contribution."""
        for h0 in range(0, n_heads, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            hmask = h[:, None] < n_heads
            xrow = x_base + h[:, None].to(tl.int64) * stride_xh
            orow = o_base + h[:, None].to(tl.int64) * stride_oh
            x1, x2 = _load_pairs(x_ptr, xrow, stride_xd, hmask, HALF, ROT, BLOCK_H, BLOCK_F, INTERLEAVED, COMPUTE)
            r1 = x1 * c1[None, :] - x2 * s1[None, :]
            r2 = x2 * c2[None, :] + x1 * s2[None, :]
            _store_pairs(o_ptr, orow, stride_od, hmask, r1, r2, HALF, ROT, BLOCK_H, BLOCK_F, INTERLEAVED, FIX_BF16)
            if NEED_DTHETA:
                # backward: x holds the incoming gradient g, y the forward's output
                yrow = y_base + h[:, None].to(tl.int64) * stride_yh
                y1, y2 = _load_pairs(y_ptr, yrow, stride_yd, hmask, HALF, ROT, BLOCK_H, BLOCK_F, INTERLEAVED, COMPUTE)
                dtheta += tl.sum(x2 * y1 - x1 * y2, axis=0)
            if COPY_PASS:
                p = ROT + tl.arange(0, BLOCK_P)
                pmask = hmask & (p[None, :] < D)
                xp = tl.load(x_ptr + xrow + p[None, :] * stride_xd, mask=pmask, other=0.0)
                tl.store(o_ptr + orow + p[None, :] * stride_od, xp.to(o_ptr.dtype.element_ty), mask=pmask)
        return dtheta


    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, qy_ptr, ky_ptr,
        pos_ptr, inv_ptr, cos_ptr, sin_ptr, dth_ptr,
        S, HQ, HK, scaling,
        sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d,
        sqo_b, sqo_s, sqo_h, sqo_d, sko_b, sko_s, sko_h, sko_d,
        sqy_b, sqy_s, sqy_h, sqy_d, sky_b, sky_s, sky_h, sky_d,
        pos_b, pos_s, cs_b, cs_s, cs_d, sn_b, sn_s, sn_d,
        HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_P: tl.constexpr,
        INTERLEAVED: tl.constexpr, USE_TABLE: tl.constexpr, BACKWARD: tl.constexpr,
        COPY_PASS: tl.constexpr, NEED_DTHETA: tl.constexpr, COMPUTE: tl.constexpr, FIX_BF16: tl.constexpr,
    ):
        pid = tl.program_id(0)
        bi = (pid // S).to(tl.int64)
        si = (pid % S).to(tl.int64)
        f = tl.arange(0, BLOCK_F)
        fmask = f < HALF

        if USE_TABLE:
            if INTERLEAVED:
                d1 = 2 * f
                d2 = 2 * f + 1
            else:
                d1 = f
                d2 = f + HALF
            cbase = cos_ptr + bi * cs_b + si * cs_s
            sbase = sin_ptr + bi * sn_b + si * sn_s
            c1 = tl.load(cbase + d1 * cs_d, mask=fmask, other=0.0).to(COMPUTE)
            c2 = tl.load(cbase + d2 * cs_d, mask=fmask, other=0.0).to(COMPUTE)
            s1 = tl.load(sbase + d1 * sn_d, mask=fmask, other=0.0).to(COMPUTE)
            s2 = tl.load(sbase + d2 * sn_d, mask=fmask, other=0.0).to(COMPUTE)
        else:
            # Angle = position * inv_freq in float64: exact (an int below 2^29 times a 24-bit mantissa).
            pos = tl.load(pos_ptr + bi * pos_b + si * pos_s).to(tl.float64)
            inv = tl.load(inv_ptr + f, mask=fmask, other=0.0).to(tl.float64)
            ang = pos * inv
            # Reduce modulo 2*pi with 2*pi = C1 + C2 + C3, each exactly a float32 (Triton types Python float literals
            # as float32, so a single float64 constant would be silently rounded to 24 bits). n*Ci is exact in
            # float64 (n < 2^29, Ci 24 bits), so the remainder is good to ~1e-15 rad for every angle below 2^31 rad.
            n = (ang * 0.15915494309189535 + 0.5).to(tl.int64).to(tl.float64)
            red = ang - n * 6.2831854820251465
            red = red - n * -1.7484555314695172e-07
            red = red - n * -6.8604980400235275e-15
            red = red.to(COMPUTE)  # |red| <= pi (+ tiny): float32 sin/cos are accurate to ~1e-7 here
            c1 = tl.cos(red) * scaling
            s1 = tl.sin(red) * scaling
            c2 = c1
            s2 = s1
        if BACKWARD:
            # transpose of [[c1, -s1], [s2, c2]]: swap and negate the sines
            s1, s2 = -s2, -s1

        dtheta = tl.zeros([BLOCK_F], dtype=COMPUTE)
        dtheta = _rope_heads(q_ptr, qo_ptr, qy_ptr, bi * sq_b + si * sq_s, bi * sqo_b + si * sqo_s, bi * sqy_b + si * sqy_s,
                             sq_h, sq_d, sqo_h, sqo_d, sqy_h, sqy_d, HQ, c1, s1, c2, s2, dtheta,
                             HALF, ROT, D, BLOCK_HQ, BLOCK_F, BLOCK_P, INTERLEAVED, COPY_PASS, NEED_DTHETA, COMPUTE, FIX_BF16)
        dtheta = _rope_heads(k_ptr, ko_ptr, ky_ptr, bi * sk_b + si * sk_s, bi * sko_b + si * sko_s, bi * sky_b + si * sky_s,
                             sk_h, sk_d, sko_h, sko_d, sky_h, sky_d, HK, c1, s1, c2, s2, dtheta,
                             HALF, ROT, D, BLOCK_HK, BLOCK_F, BLOCK_P, INTERLEAVED, COPY_PASS, NEED_DTHETA, COMPUTE, FIX_BF16)
        if NEED_DTHETA:
            tl.store(dth_ptr + pid.to(tl.int64) * HALF + f, dtheta.to(dth_ptr.dtype.element_ty), mask=fmask)


# ---------------------------------------------------------------------------------------------------------
# Host launcher


def _as4d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x


def _launch(q4, k4, qo4, ko4, *, rotary_dim, interleaved, backward=False, copy_pass=True,
            pos2=None, inv_freq=None, scaling=1.0, cos3=None, sin3=None, qy4=None, ky4=None, dtheta=None):
    """One launch over ``B*S`` tokens. All q/k-like tensors are 4-D ``[B, S, H, D]`` views (any strides);
    ``pos2`` is ``[B or 1, S]``; ``cos3``/``sin3`` are ``[B or 1, S, ROT]``."""
    B, S, HQ, D = q4.shape
    HK = k4.shape[2]
    if B * S == 0:
        return
    half = rotary_dim // 2
    block_f = triton.next_power_of_2(half)
    cap = max(1, _TILE_ELEMENTS // block_f)
    block_hq = min(triton.next_power_of_2(max(HQ, 1)), cap)
    block_hk = min(triton.next_power_of_2(max(HK, 1)), cap)
    block_p = triton.next_power_of_2(max(D - rotary_dim, 1))
    use_table = cos3 is not None
    need_dtheta = dtheta is not None
    dummy = q4  # never dereferenced: the constexpr branches that would read it are compiled out

    def strides(t, n=4):
        if t is None:
            return (0,) * n
        return tuple(st if size != 1 else 0 for st, size in zip(t.stride(), t.shape))

    pos_strides = strides(pos2, 2)
    cs, sn = strides(cos3, 3), strides(sin3, 3)
    _rope_kernel[(B * S,)](
        q4, k4, qo4, ko4, qy4 if need_dtheta else dummy, ky4 if need_dtheta else dummy,
        pos2 if pos2 is not None else dummy, inv_freq if inv_freq is not None else dummy,
        cos3 if use_table else dummy, sin3 if use_table else dummy, dtheta if need_dtheta else dummy,
        S, HQ, HK, float(scaling),
        *strides(q4), *strides(k4), *strides(qo4), *strides(ko4), *strides(qy4), *strides(ky4),
        *pos_strides, *cs, *sn,
        HALF=half, ROT=rotary_dim, D=D, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_F=block_f, BLOCK_P=block_p,
        INTERLEAVED=bool(interleaved), USE_TABLE=use_table, BACKWARD=bool(backward),
        COPY_PASS=bool(copy_pass) and D > rotary_dim, NEED_DTHETA=need_dtheta,
        COMPUTE=tl.float64 if q4.dtype == torch.float64 else tl.float32,
        FIX_BF16=qo4.dtype == torch.bfloat16 and qo4.device.type == "cpu" and backend.interpreter_enabled(),
        num_warps=4,
    )


# ---------------------------------------------------------------------------------------------------------
# Validation (everything is checked before any launch)

# Positions already checked non-negative: id(tensor) -> (weakref, version). A model calls apply_rope once per
# layer with the same positions tensor; checking a CUDA tensor costs a device sync, so each tensor (at each
# in-place version) is checked once.
_CHECKED_POSITIONS: dict[int, tuple[weakref.ref, int]] = {}


def _check_nonnegative(positions: torch.Tensor) -> None:
    key = id(positions)
    seen = _CHECKED_POSITIONS.get(key)
    if seen is not None and seen[0]() is positions and seen[1] == positions._version:
        return
    if positions.numel():
        low = int(positions.min())
        if low < 0:
            raise ValueError(f"positions must be >= 0 (global token positions), got a minimum of {low}")
    if len(_CHECKED_POSITIONS) > 64:
        _CHECKED_POSITIONS.clear()
    try:
        _CHECKED_POSITIONS[key] = (weakref.ref(positions), positions._version)
    except TypeError:  # not weak-referenceable: just check every time
        pass


def _check_qk(q, k, name_q="q", name_k="k"):
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
        lead = "[b, s, *, d]" if q.dim() == 4 else "[t, *, d]"
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on {lead} (head counts may differ)")


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
    _check_nonnegative(positions)
    return rotary_dim


def _positions_2d(positions: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``[B or 1, S]`` view of the positions matching the 4-D view of q."""
    return positions.unsqueeze(0) if positions.dim() == 1 else positions


# ---------------------------------------------------------------------------------------------------------
# autograd


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, inv_freq, scaling, interleaved, rotary_dim, inplace):
        q4, k4 = _as4d(q), _as4d(k)
        qo, ko = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
        pos2 = _positions_2d(positions, q)
        _launch(q4, k4, _as4d(qo), _as4d(ko), rotary_dim=rotary_dim, interleaved=interleaved,
                copy_pass=not inplace, pos2=pos2, inv_freq=inv_freq, scaling=scaling)
        if inplace:
            ctx.mark_dirty(q, k)
        ctx.need_dtheta = ctx.needs_input_grad[3]
        ctx.meta = (scaling, interleaved, rotary_dim)
        if ctx.need_dtheta:
            ctx.save_for_backward(positions, inv_freq, qo, ko)
        else:
            ctx.save_for_backward(positions, inv_freq)
        return qo, ko

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq, gk):
        scaling, interleaved, rotary_dim = ctx.meta
        if ctx.need_dtheta:
            positions, inv_freq, qy, ky = ctx.saved_tensors
        else:
            (positions, inv_freq), qy, ky = ctx.saved_tensors, None, None
        dq, dk = torch.empty_like(gq), torch.empty_like(gk)
        gq4 = _as4d(gq)
        pos2 = _positions_2d(positions, gq)
        dtheta = None
        if ctx.need_dtheta:
            B, S = gq4.shape[:2]
            acc = torch.float64 if gq.dtype == torch.float64 else torch.float32
            dtheta = torch.empty((B * S, rotary_dim // 2), dtype=acc, device=gq.device)
        _launch(gq4, _as4d(gk), _as4d(dq), _as4d(dk), rotary_dim=rotary_dim, interleaved=interleaved,
                backward=True, pos2=pos2, inv_freq=inv_freq, scaling=scaling,
                qy4=_as4d(qy) if qy is not None else None, ky4=_as4d(ky) if ky is not None else None,
                dtheta=dtheta)
        dinv = None
        if dtheta is not None:
            B, S = gq4.shape[:2]
            pos_tok = pos2.expand(B, S).reshape(-1).to(torch.float64)
            dinv = (pos_tok[:, None] * dtheta.to(torch.float64)).sum(0).to(inv_freq.dtype)
        return dq, dk, None, dinv, None, None, None, None


class _RopeTableFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q4, k4, cos3, sin3, out_dtype):
        qo = torch.empty_like(q4, dtype=out_dtype)
        ko = torch.empty_like(k4, dtype=out_dtype)
        rot = cos3.shape[-1]
        _launch(q4, k4, qo, ko, rotary_dim=rot, interleaved=False, cos3=cos3, sin3=sin3)
        ctx.save_for_backward(cos3, sin3)
        ctx.in_dtype = q4.dtype
        return qo, ko

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq, gk):
        cos3, sin3 = ctx.saved_tensors
        dq = torch.empty_like(gq, dtype=ctx.in_dtype)
        dk = torch.empty_like(gk, dtype=ctx.in_dtype)
        _launch(gq, gk, dq, dk, rotary_dim=cos3.shape[-1], interleaved=False, backward=True, cos3=cos3, sin3=sin3)
        return dq, dk, None, None, None


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
        the kernel (accurate to ~1e-7 rad for positions up to 2^24).

    Raises:
        TypeError: wrong dtypes (q/k not floating, q and k differ, positions not int32/int64, inv_freq not float).
        ValueError: bad shapes (q/k disagree, positions not ``[s]``/``[b, s]``/``[t]``), odd, non-positive or
            too-large ``rotary_dim``, ``len(inv_freq) != rotary_dim / 2``, negative positions, tensors on
            different devices. All raised before any launch.
    """
    rotary_dim = _validate(q, k, positions, inv_freq, rotary_dim)
    if backend.select(q.device) == "triton":
        return _RopeFunction.apply(q, k, positions, inv_freq, float(attention_scaling), bool(interleaved),
                                   rotary_dim, bool(inplace))
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qr, kr = reference.rope(q, k, positions, inv_freq, attention_scaling, interleaved, rotary_dim, compute)
    if inplace:
        return q.copy_(qr), k.copy_(kr)
    return qr.to(q.dtype), kr.to(k.dtype)


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
        Other shapes (3-D tables, other ``unsqueeze_dim``), or tables that require grad, run HF's formula in
        plain torch so the result and its autograd stay exactly HF's.

    Raises:
        TypeError / ValueError: as :func:`apply_rope` for q/k; tables of the wrong shape or device.
    """
    hf_layout = isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4 and k.dim() == 4 \
        and unsqueeze_dim == 1
    # check q/k in the kernel's [b, s, h, d] view (HF's [b, h, s, d] transposed)
    _check_qk(q.transpose(1, 2) if hf_layout else q, k.transpose(1, 2) if hf_layout else k)
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    fused = (q.dim() == 4 and unsqueeze_dim in (1, 2) and cos.dim() == 3
             and not (cos.requires_grad or sin.requires_grad)
             and backend.select(q.device) == "triton")
    if fused:
        # kernel view: [b, s, h, d]
        q4 = q.transpose(1, 2) if unsqueeze_dim == 1 else q
        k4 = k.transpose(1, 2) if unsqueeze_dim == 1 else k
        b, s, _, d = q4.shape
        r = cos.shape[-1]
        if cos.shape[1] != s or cos.shape[0] not in (1, b):
            raise ValueError(f"cos/sin have shape {tuple(cos.shape)}; expected [{b}, {s}, r] or [1, {s}, r] "
                             f"for q {tuple(q.shape)} with unsqueeze_dim={unsqueeze_dim}")
        if r % 2 or r <= 0 or r > d:
            raise ValueError(f"cos/sin last dim {r} must be even, positive and <= head dim {d}")
        out_dtype = torch.promote_types(q.dtype, cos.dtype)
        qo, ko = _RopeTableFunction.apply(q4, k4, cos, sin, out_dtype)
        if unsqueeze_dim == 1:
            qo, ko = qo.transpose(1, 2), ko.transpose(1, 2)
        return qo, ko
    q_out, k_out = reference.rope_cos_sin(q, k, cos, sin, unsqueeze_dim)
    return q_out, k_out
