"""Triton kernel of fused RoPE: one program per ``BLOCK_T`` tokens rotates every q and k head of them, each
(token, pair) angle computed in-kernel once and reused for every head.

The host launcher, which picks ``BLOCK_T``, is ``ring_attn/backends/triton/rope.py``.
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
def _load_pairs(ptr, row, stride_d, tmask, HALF: tl.constexpr, ROT: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_F: tl.constexpr, INTERLEAVED: tl.constexpr, COMPUTE: tl.constexpr):
    """``(x1, x2)``, each ``[BLOCK_T, BLOCK_F]``: the two members of every pair, one head of ``BLOCK_T`` tokens
    (``row``: ``[BLOCK_T, 1]`` element offsets of the head's rows)."""
    if INTERLEAVED:
        # one contiguous [BLOCK_T, 2*BLOCK_F] load (vectorizes), then de-interleave in registers
        dd = tl.arange(0, 2 * BLOCK_F)
        xx = tl.load(ptr + row + dd[None, :] * stride_d, mask=tmask & (dd[None, :] < ROT), other=0.0)
        x1, x2 = tl.split(tl.reshape(xx.to(COMPUTE), [BLOCK_T, BLOCK_F, 2]))
    else:
        f = tl.arange(0, BLOCK_F)
        mask = tmask & (f[None, :] < HALF)
        x1 = tl.load(ptr + row + f[None, :] * stride_d, mask=mask, other=0.0).to(COMPUTE)
        x2 = tl.load(ptr + row + (f[None, :] + HALF) * stride_d, mask=mask, other=0.0).to(COMPUTE)
    return x1, x2


@triton.jit
def _store_pairs(ptr, row, stride_d, tmask, r1, r2, HALF: tl.constexpr, ROT: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, INTERLEAVED: tl.constexpr, FIX_BF16: tl.constexpr):
    """Inverse of :func:`_load_pairs`, rounding to the pointer's element type."""
    if FIX_BF16:
        r1 = _round_bf16_rtne(r1)
        r2 = _round_bf16_rtne(r2)
    if INTERLEAVED:
        dd = tl.arange(0, 2 * BLOCK_F)
        rr = tl.reshape(tl.join(r1, r2), [BLOCK_T, 2 * BLOCK_F])
        tl.store(ptr + row + dd[None, :] * stride_d, rr.to(ptr.dtype.element_ty), mask=tmask & (dd[None, :] < ROT))
    else:
        f = tl.arange(0, BLOCK_F)
        mask = tmask & (f[None, :] < HALF)
        tl.store(ptr + row + f[None, :] * stride_d, r1.to(ptr.dtype.element_ty), mask=mask)
        tl.store(ptr + row + (f[None, :] + HALF) * stride_d, r2.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_head(x_ptr, y_ptr, xrow, yrow, stride_xd, stride_yd, mask,
               HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_P: tl.constexpr,
               INTERLEAVED: tl.constexpr, COPY_PASS: tl.constexpr, NEED_DTHETA: tl.constexpr,
               COMPUTE: tl.constexpr):
    """Every load of one head of ``BLOCK_T`` tokens: ``(x1, x2, pass-through dims, y1, y2)`` (the last three are
    dummies when unused)."""
    x1, x2 = _load_pairs(x_ptr, xrow, stride_xd, mask, HALF, ROT, BLOCK_T, BLOCK_F, INTERLEAVED, COMPUTE)
    xp = x1
    if COPY_PASS:
        p = ROT + tl.arange(0, BLOCK_P)
        xp = tl.load(x_ptr + xrow + p[None, :] * stride_xd, mask=mask & (p[None, :] < D), other=0.0)
    y1 = x1
    y2 = x2
    if NEED_DTHETA:
        # backward: x holds the incoming gradient g, y the forward's output
        y1, y2 = _load_pairs(y_ptr, yrow, stride_yd, mask, HALF, ROT, BLOCK_T, BLOCK_F, INTERLEAVED, COMPUTE)
    return x1, x2, xp, y1, y2


@triton.jit
def _rotate_store(o_ptr, orow, stride_od, mask, x1, x2, xp, y1, y2, c1, s1, c2, s2, dtheta,
                  HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_P: tl.constexpr,
                  INTERLEAVED: tl.constexpr, COPY_PASS: tl.constexpr, NEED_DTHETA: tl.constexpr,
                  FIX_BF16: tl.constexpr):
    """The math and every store of one head (what :func:`_load_head` loaded); returns the updated ``dtheta``."""
    r1 = x1 * c1 - x2 * s1
    r2 = x2 * c2 + x1 * s2
    _store_pairs(o_ptr, orow, stride_od, mask, r1, r2, HALF, ROT, BLOCK_T, BLOCK_F, INTERLEAVED, FIX_BF16)
    if NEED_DTHETA:
        dtheta += x2 * y1 - x1 * y2
    if COPY_PASS:
        p = ROT + tl.arange(0, BLOCK_P)
        tl.store(o_ptr + orow + p[None, :] * stride_od, xp.to(o_ptr.dtype.element_ty), mask=mask & (p[None, :] < D))
    return dtheta


@triton.jit
def _rope_heads(x_ptr, o_ptr, y_ptr, x_base, o_base, y_base,
                stride_xh, stride_xd, stride_oh, stride_od, stride_yh, stride_yd, n_heads, tmask,
                c1, s1, c2, s2, dtheta,
                HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_P: tl.constexpr,
                INTERLEAVED: tl.constexpr, COPY_PASS: tl.constexpr, NEED_DTHETA: tl.constexpr,
                COMPUTE: tl.constexpr, FIX_BF16: tl.constexpr):
    """Rotate every head of ``BLOCK_T`` tokens of one tensor with the same ``[BLOCK_T, BLOCK_F]`` cos/sin
    (computed once by the caller); ``*_base`` are ``[BLOCK_T, 1]`` token row offsets. Returns ``dtheta`` plus
    this tensor's contribution.

    Two heads per iteration, both heads' loads issued before either's math and stores: the compiler may not move
    a load above a store itself (the output may alias the input), so this is what keeps two heads of loads in
    flight per thread. In place, every element is still read before it is written (by the same thread)."""
    for h in range(0, n_heads, 2):
        mask_b = tmask & ((h + 1 + tl.zeros([1, 1], dtype=tl.int32)) < n_heads)  # a tensor (interpreter too)
        xrow = x_base + h * stride_xh
        yrow = y_base + h * stride_yh
        xa1, xa2, xap, ya1, ya2 = _load_head(x_ptr, y_ptr, xrow, yrow, stride_xd, stride_yd, tmask,
                                             HALF, ROT, D, BLOCK_T, BLOCK_F, BLOCK_P, INTERLEAVED, COPY_PASS,
                                             NEED_DTHETA, COMPUTE)
        xb1, xb2, xbp, yb1, yb2 = _load_head(x_ptr, y_ptr, xrow + stride_xh, yrow + stride_yh, stride_xd, stride_yd,
                                             mask_b, HALF, ROT, D, BLOCK_T, BLOCK_F, BLOCK_P, INTERLEAVED,
                                             COPY_PASS, NEED_DTHETA, COMPUTE)
        orow = o_base + h * stride_oh
        dtheta = _rotate_store(o_ptr, orow, stride_od, tmask, xa1, xa2, xap, ya1, ya2, c1, s1, c2, s2, dtheta,
                               HALF, ROT, D, BLOCK_T, BLOCK_F, BLOCK_P, INTERLEAVED, COPY_PASS, NEED_DTHETA,
                               FIX_BF16)
        # a missing second head loaded zeros, so its dtheta term is 0 and its stores are masked off
        dtheta = _rotate_store(o_ptr, orow + stride_oh, stride_od, mask_b, xb1, xb2, xbp, yb1, yb2, c1, s1, c2, s2,
                               dtheta, HALF, ROT, D, BLOCK_T, BLOCK_F, BLOCK_P, INTERLEAVED, COPY_PASS,
                               NEED_DTHETA, FIX_BF16)
    return dtheta


@triton.jit
def rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, qy_ptr, ky_ptr,
    pos_ptr, inv_ptr, cos_ptr, sin_ptr, dth_ptr,
    S, n_tokens, HQ, HK, scaling,
    sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d,
    sqo_b, sqo_s, sqo_h, sqo_d, sko_b, sko_s, sko_h, sko_d,
    sqy_b, sqy_s, sqy_h, sqy_d, sky_b, sky_s, sky_h, sky_d,
    pos_b, pos_s, cs_b, cs_s, cs_d, sn_b, sn_s, sn_d,
    HALF: tl.constexpr, ROT: tl.constexpr, D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, USE_TABLE: tl.constexpr, BACKWARD: tl.constexpr,
    COPY_PASS: tl.constexpr, NEED_DTHETA: tl.constexpr, COMPUTE: tl.constexpr, FIX_BF16: tl.constexpr,
):
    # BLOCK_T consecutive tokens of the flattened [B*S] per program (they may straddle a batch boundary)
    # (token indices fit int32: B*S < 2^31; the division stays 32-bit, offsets are formed in int64)
    t32 = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tvalid = t32 < n_tokens
    tmask = tvalid[:, None]
    bi = (t32 // S).to(tl.int64)
    si = (t32 % S).to(tl.int64)
    t = t32.to(tl.int64)
    f = tl.arange(0, BLOCK_F)
    fmask = (f < HALF)[None, :]

    # Each (token, pair) cos/sin is formed once, in the [BLOCK_T, BLOCK_F] layout of the data tiles, and reused
    # for every head of q and k.
    if USE_TABLE:
        if INTERLEAVED:
            d1 = 2 * f
            d2 = 2 * f + 1
        else:
            d1 = f
            d2 = f + HALF
        cbase = (bi * cs_b + si * cs_s)[:, None]
        sbase = (bi * sn_b + si * sn_s)[:, None]
        cmask = tmask & fmask
        c1 = tl.load(cos_ptr + cbase + d1[None, :] * cs_d, mask=cmask, other=0.0).to(COMPUTE)
        c2 = tl.load(cos_ptr + cbase + d2[None, :] * cs_d, mask=cmask, other=0.0).to(COMPUTE)
        s1 = tl.load(sin_ptr + sbase + d1[None, :] * sn_d, mask=cmask, other=0.0).to(COMPUTE)
        s2 = tl.load(sin_ptr + sbase + d2[None, :] * sn_d, mask=cmask, other=0.0).to(COMPUTE)
    else:
        # Angle = position * inv_freq in float64: exact (an int below 2^29 times a 24-bit mantissa).
        pos = tl.load(pos_ptr + bi * pos_b + si * pos_s, mask=tvalid, other=0).to(tl.float64)
        inv = tl.load(inv_ptr + f, mask=f < HALF, other=0.0).to(tl.float64)
        ang = pos[:, None] * inv[None, :]
        # Quotient n = round(ang / 2pi) by adding and subtracting 1.5 * 2^52 (the float64 adder rounds to nearest;
        # valid for |ang / 2pi| < 2^51), not by float <-> int64 conversions. 1/(2pi) = INV_HI + INV_LO, each
        # exactly a float32, good to ~2^-48 relative: correct whether or not the Triton version at hand keeps a
        # Python float literal at float64 precision next to a float64 tensor (3.9 does; a 24-bit 1/(2pi) would
        # put n off by ~3 near 5e8 rad and cost the float32 remainder ~1e-6 rad). One extra fp64 FMA per angle.
        quo = ang * 0.15915493667125702 + ang * 6.4206382432985265e-09
        n = (quo + 6755399441055744.0) - 6755399441055744.0
        # Reduce modulo 2*pi with 2*pi = C1 + C2 + C3, each exactly a float32. n*Ci is exact in float64 (n < 2^29,
        # Ci 24 bits), so the remainder is good to ~1e-15 rad for every angle below 2^31 rad, |red| <= pi (+ tiny).
        red = ang - n * 6.2831854820251465
        red = red - n * -1.7484555314695172e-07
        red = red - n * -6.8604980400235275e-15
        red = red.to(COMPUTE)  # float32 sin/cos are accurate to ~1e-7 on [-pi, pi]
        c1 = tl.cos(red) * scaling
        s1 = tl.sin(red) * scaling
        c2 = c1
        s2 = s1
    if BACKWARD:
        # transpose of [[c1, -s1], [s2, c2]]: swap and negate the sines
        s1, s2 = -s2, -s1

    dtheta = tl.zeros([BLOCK_T, BLOCK_F], dtype=COMPUTE)
    dtheta = _rope_heads(q_ptr, qo_ptr, qy_ptr, (bi * sq_b + si * sq_s)[:, None], (bi * sqo_b + si * sqo_s)[:, None],
                         (bi * sqy_b + si * sqy_s)[:, None], sq_h, sq_d, sqo_h, sqo_d, sqy_h, sqy_d, HQ, tmask,
                         c1, s1, c2, s2, dtheta, HALF, ROT, D, BLOCK_T, BLOCK_F, BLOCK_P,
                         INTERLEAVED, COPY_PASS, NEED_DTHETA, COMPUTE, FIX_BF16)
    dtheta = _rope_heads(k_ptr, ko_ptr, ky_ptr, (bi * sk_b + si * sk_s)[:, None], (bi * sko_b + si * sko_s)[:, None],
                         (bi * sky_b + si * sky_s)[:, None], sk_h, sk_d, sko_h, sko_d, sky_h, sky_d, HK, tmask,
                         c1, s1, c2, s2, dtheta, HALF, ROT, D, BLOCK_T, BLOCK_F, BLOCK_P,
                         INTERLEAVED, COPY_PASS, NEED_DTHETA, COMPUTE, FIX_BF16)
    if NEED_DTHETA:
        tl.store(dth_ptr + t[:, None] * HALF + f[None, :], dtheta.to(dth_ptr.dtype.element_ty), mask=tmask & fmask)
