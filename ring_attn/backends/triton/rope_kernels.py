"""Triton kernel of fused RoPE: one program per token rotates every q and k head, angles computed in-kernel.

Moved verbatim from ``ring_attn/ops/rope.py``; the host launcher is ``ring_attn/backends/triton/rope.py``.
"""
import triton
import triton.language as tl

__all__ = ["rope_kernel"]

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
def rope_kernel(
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
