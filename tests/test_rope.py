"""apply_rope / apply_rope_cos_sin: oracle properties, HF equality, sharding, angle accuracy, in-place, errors.

CPU runs the Triton kernel under TRITON_INTERPRET=1 (set by conftest), so shapes here are small.
"""
import math
from fractions import Fraction
import os
import sys

import pytest
import torch
from hypothesis import given, strategies as st

from accuracy import BACKWARD, FORWARD, assert_within_rule
from ring_attn import backends, reference, rope_scaling
from ring_attn.ops.rope import apply_rope, apply_rope_cos_sin

# every test runs with automatic selection and pinned to the native and reference backends (conftest)
pytestmark = pytest.mark.usefixtures("cpu_backend")

LOW = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def rope_case(draw, dtypes=tuple(LOW)):
    packed = draw(st.booleans())
    b = 1 if packed else draw(st.integers(1, 2))
    s = draw(st.integers(1, 7))
    hq = draw(st.integers(1, 4))
    hk = draw(st.sampled_from([1, hq]))
    d = draw(st.sampled_from([2, 6, 8, 16, 24]))
    rotary_dim = draw(st.sampled_from(sorted({d, max(2, (d // 2) & ~1)})))
    dtype = draw(st.sampled_from(dtypes))
    interleaved = draw(st.booleans())
    pos_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    pos_kind = "t" if packed else draw(st.sampled_from(["s", "bs", "1s"]))
    max_pos = draw(st.sampled_from([8, 4096, 2**24]))
    theta = draw(st.sampled_from([1e4, 5e5, 1e6, 2.8e8]))
    scaling = draw(st.sampled_from([1.0, 1.25, 0.8]))
    strided = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)

    def make(h):
        if strided:  # a view with a padded head dim and heads-major storage (non-contiguous, last dim stride 1)
            base = torch.randn((b * s, h, d + 2) if packed else (b, h, s, d + 2), generator=g).to(dtype)
            x = base[..., :d] if packed else base[..., :d].transpose(1, 2)
            return x
        return torch.randn((b * s, h, d) if packed else (b, s, h, d), generator=g).to(dtype)

    q, k = make(hq), make(hk)
    shape = {"t": (b * s,), "s": (s,), "bs": (b, s), "1s": (1, s)}[pos_kind]
    positions = torch.randint(0, max_pos, shape, generator=g, dtype=torch.int64).to(pos_dtype)
    inv_freq, _ = rope_scaling.rope_parameters("default", rotary_dim, theta)
    return dict(q=q, k=k, positions=positions, inv_freq=inv_freq, attention_scaling=scaling,
                interleaved=interleaved, rotary_dim=rotary_dim)


def _oracle(c, dtype=torch.float64):
    return reference.rope(c["q"], c["k"], c["positions"], c["inv_freq"], c["attention_scaling"], c["interleaved"],
                          c["rotary_dim"], compute_dtype=dtype)


@given(rope_case())
def test_forward_matches_oracle(c):
    q_rot, k_rot = apply_rope(**c)
    want_q, want_k = _oracle(c)
    base_q, base_k = _oracle(c, c["q"].dtype)  # plain torch in the same low precision (exact angles)
    dtype = c["q"].dtype
    assert q_rot.dtype == dtype and k_rot.dtype == dtype
    assert_within_rule("q", q_rot, want_q, base_q, dtype, FORWARD)
    assert_within_rule("k", k_rot, want_k, base_k, dtype, FORWARD)
    # pass-through dims are copied bit for bit
    r = c["rotary_dim"]
    assert torch.equal(q_rot[..., r:], c["q"][..., r:]) and torch.equal(k_rot[..., r:], c["k"][..., r:])


@given(rope_case(), st.booleans())
def test_backward_matches_oracle(c, learn_freq):
    dtype = c["q"].dtype
    q = c["q"].detach().requires_grad_()
    k = c["k"].detach().requires_grad_()
    inv = c["inv_freq"].detach().clone().requires_grad_(learn_freq)
    args = {**c, "q": q, "k": k, "inv_freq": inv}
    q_rot, k_rot = apply_rope(**args)
    g = torch.Generator().manual_seed(1)
    gq = torch.randn(q_rot.shape, generator=g).to(dtype)
    gk = torch.randn(k_rot.shape, generator=g).to(dtype)
    inputs = [q, k] + ([inv] if learn_freq else [])
    got = torch.autograd.grad((q_rot, k_rot), inputs, (gq, gk))

    def ref_grads(compute):
        xs = [t.detach().to(torch.float64 if compute == torch.float64 else t.dtype).requires_grad_() for t in inputs]
        a = {**c, "q": xs[0], "k": xs[1], "inv_freq": xs[2] if learn_freq else c["inv_freq"]}
        out = reference.rope(a["q"], a["k"], a["positions"], a["inv_freq"], a["attention_scaling"], a["interleaved"],
                             a["rotary_dim"], compute_dtype=compute)
        return torch.autograd.grad(out, xs, (gq.to(compute), gk.to(compute)))

    want, base = ref_grads(torch.float64), ref_grads(dtype)
    for name, a, w, bl in zip(["dq", "dk"], got, want, base):
        assert_within_rule(name, a, w, bl, dtype, BACKWARD)
    if learn_freq:
        # dL/dinv_freq_f = sum over tokens of position * sum over heads of (g2 y1 - g1 y2), with y the forward
        # output as stored (rounded once to `dtype`, relative error <= u). A plain-torch baseline in bf16 is too
        # noisy a yardstick for one scalar per pair, so bound the error directly: 2 u sum pos (|g2 y1| + |g1 y2|).
        u = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
        y_q, y_k = _oracle(c)
        r, inter = c["rotary_dim"], c["interleaved"]
        pos = c["positions"].double()[..., None]
        bound = torch.zeros(r // 2, dtype=torch.float64)
        for y, gy in ((y_q, gq), (y_k, gk)):
            y1, y2, _ = reference.rope_pairs(y, r, inter)
            g1, g2, _ = reference.rope_pairs(gy.double(), r, inter)
            per_token = (g2.abs() * y1.abs() + g1.abs() * y2.abs()).sum(-2)  # [(b,) s, r/2]
            bound += (pos * per_token).reshape(-1, r // 2).sum(0)
        err = (got[2].double() - want[2]).abs()
        assert (err <= 2 * u * bound + 1e-5 * want[2].abs() + 1e-6).all(), (err, bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("interleaved,rotary_dim", [(False, 128), (True, 64)])
def test_many_token_blocks(dtype, interleaved, rotary_dim):
    """Shapes the strategy above is too small for: the Triton kernel's program count > 1 (16 or 8 tokens per
    program at d = 128), blocks straddling batch boundaries (S = 37), a masked partial last block, an odd head
    count (the two-heads-per-iteration loop's tail) and per-batch positions; forward, backward and d/dinv_freq."""
    b, s, d = 3, 37, 128
    g = torch.Generator().manual_seed(7)
    c = dict(q=torch.randn(b, s, 3, d, generator=g).to(dtype), k=torch.randn(b, s, 1, d, generator=g).to(dtype),
             positions=torch.randint(0, 2**20, (b, s), generator=g), attention_scaling=1.25,
             inv_freq=rope_scaling.rope_parameters("default", rotary_dim, 5e5)[0], interleaved=interleaved,
             rotary_dim=rotary_dim)
    test_forward_matches_oracle.hypothesis.inner_test(c)
    test_backward_matches_oracle.hypothesis.inner_test(c, True)


@pytest.mark.parametrize("interleaved,rotary_dim,packed", [(False, 6, False), (True, 8, True)])
def test_gradcheck_float64_kernel(interleaved, rotary_dim, packed):
    """float64 storage runs the kernel with float64 math: gradcheck q, k and the learnable inv_freq."""
    # the pinned backend, or the Triton kernel (interpreter) rather than the fallback
    assert backends.select("rope", torch.device("cpu")).NAME == (backends.forced() or "triton")
    g = torch.Generator().manual_seed(0)
    shape_q, shape_k = ((3, 2, 8), (3, 1, 8)) if packed else ((1, 3, 2, 8), (1, 3, 1, 8))
    q = torch.randn(shape_q, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(shape_k, generator=g, dtype=torch.float64, requires_grad=True)
    inv = rope_scaling.rope_parameters("default", rotary_dim, 1e4)[0].double().requires_grad_()
    pos = torch.tensor([0, 7, 1000])
    fn = lambda q, k, inv: apply_rope(q, k, pos, inv, 1.1, interleaved, rotary_dim)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, inv), fast_mode=True)


def test_reference_backend_gradcheck_and_agreement():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    inv = rope_scaling.rope_parameters("default", 8, 1e4)[0].double().requires_grad_()
    pos = torch.tensor([[0, 5, 9], [100, 2, 3]])
    with backends.force("reference"):
        assert torch.autograd.gradcheck(lambda q, k, inv: apply_rope(q, k, pos, inv, 0.9, True), (q, k, inv))
        ref = apply_rope(q.float(), k.float(), pos, inv.float(), 0.9, True)
    ker = apply_rope(q.float(), k.float(), pos, inv.float(), 0.9, True)
    for a, b in zip(ref, ker):
        assert (a - b).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------------------
# Angle accuracy


@pytest.mark.parametrize("theta", [1e4, 5e5, 2.8e8])
def test_angle_accuracy_near_2_pow_24(theta):
    """Rotating the unit vector (1, 0) gives (cos, sin) of the angle: compare it with float64 at positions near 2^24."""
    d = 128
    inv, _ = rope_scaling.rope_parameters("default", d, theta)
    inv = torch.cat([inv[:-1], torch.tensor([1.0])])  # include inv_freq = 1 (angle ~1.7e7 rad)
    pos = torch.tensor([2**24 - 1, 2**24 - 2, 2**24 - 1000, 2**23 + 12345, 16_000_000, 0], dtype=torch.int32)
    q = torch.zeros(1, pos.numel(), 1, d)
    q[..., : d // 2] = 1.0  # x1 = 1, x2 = 0 for every pair
    q_rot, _ = apply_rope(q, q.clone(), pos, inv)
    got = torch.atan2(q_rot[0, :, 0, d // 2 :].double(), q_rot[0, :, 0, : d // 2].double())
    exact = pos.double()[:, None] * inv.double()
    err = torch.remainder(got - exact + math.pi, 2 * math.pi) - math.pi
    assert err.abs().max().item() < 1e-6, err.abs().max().item()
    # the naive float32 product (what fp32 cos/sin tables are built from) is far off: the test has teeth
    naive = pos.float()[:, None] * inv
    naive_err = torch.remainder(naive.double() - exact + math.pi, 2 * math.pi) - math.pi
    assert naive_err.abs().max().item() > 1e-2


# 2*pi to 50 digits, for an exact reduction of the (exact) float64 angle in the oracle below
_TWO_PI = 2 * Fraction("3.14159265358979323846264338327950288419716939937510")


def _large_position_angle_error(dtype, device="cpu"):
    """Max angle error (rad) of the rotation of (1, 0) at positions up to the largest exact one, 2^29 - 1: the
    oracle reduces the exact float64 product modulo 2*pi in rational arithmetic, so it measures the kernel's
    range reduction, not the oracle's float64 rounding (~6e-8 rad at 5e8 rad)."""
    d = 128
    inv, _ = rope_scaling.rope_parameters("default", d, 1e4)
    # inv_freq = 1, ~pi/4 and the largest float32 below 2*pi (the documented bound: 2^29 turns at 2^29 - 1)
    inv = torch.cat([inv[:-3], torch.tensor([1.0, 0.7853981852531433, 6.2831850051879883])])
    pos = torch.tensor([2**29 - 1, 2**29 - 2, 2**28 + 3, 2**24 + 1, 123_456_789, 7, 0], dtype=torch.int64)
    q = torch.zeros(1, pos.numel(), 1, d, dtype=dtype)
    q[..., : d // 2] = 1.0  # x1 = 1, x2 = 0 for every pair
    q_rot, _ = apply_rope(q.to(device), q.to(device), pos.to(device), inv.to(device))
    q_rot = q_rot.cpu()
    got = torch.atan2(q_rot[0, :, 0, d // 2 :].double(), q_rot[0, :, 0, : d // 2].double())
    exact = torch.tensor([[float((Fraction(p) * Fraction(float(f))) % _TWO_PI) for f in inv.tolist()]
                          for p in pos.tolist()], dtype=torch.float64)
    err = torch.remainder(got - exact + math.pi, 2 * math.pi) - math.pi
    return err.abs().max().item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-7), (torch.float64, 1e-12)])
def test_angle_accuracy_at_large_positions(dtype, tol):
    """The documented angle error (<= 2e-7 rad in float32) holds up to position 2^29 - 1 (the interpreter runs
    the kernel's arithmetic in numpy; the GPU twin below checks the compiled kernel and its libdevice sin/cos)."""
    err = _large_position_angle_error(dtype)
    assert err <= tol, err


# ---------------------------------------------------------------------------------------------------------
# Sharding: rotate-then-shard == shard-then-rotate (global positions)


def _layout_index(layout: str, S: int, W: int, r: int) -> torch.Tensor:
    if layout == "contiguous":
        n = S // W
        return torch.arange(r * n, (r + 1) * n)
    if layout == "zigzag":
        n = S // (2 * W)
        return torch.cat([torch.arange(r * n, (r + 1) * n), torch.arange((2 * W - 1 - r) * n, (2 * W - r) * n)])
    if layout == "striped":
        return torch.arange(r, S, W)
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_positions_equal_sharded_output(layout, world):
    S = 2 * world * 2
    g = torch.Generator().manual_seed(world)
    q = torch.randn(2, S, 3, 16, generator=g).to(torch.float16)
    k = torch.randn(2, S, 1, 16, generator=g).to(torch.float16)
    offset = 2**20  # a later window of a long document
    positions = torch.arange(S) + offset
    inv, scale = rope_scaling.rope_parameters("yarn", 16, 5e5, factor=8.0, original_max_position_embeddings=1024)
    full_q, full_k = apply_rope(q, k, positions, inv, scale)
    seen = []
    for r in range(world):
        idx = _layout_index(layout, S, world, r)
        seen.append(idx)
        q_r, k_r = apply_rope(q[:, idx], k[:, idx], positions[idx], inv, scale)
        assert torch.equal(q_r, full_q[:, idx]) and torch.equal(k_r, full_k[:, idx])
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(S))  # the layout covers every token


def test_packed_sequences_equal_per_sequence():
    g = torch.Generator().manual_seed(5)
    lens = [3, 1, 4]
    t = sum(lens)
    q = torch.randn(t, 2, 8, generator=g)
    k = torch.randn(t, 1, 8, generator=g)
    positions = torch.cat([torch.arange(n) for n in lens]).to(torch.int32)
    inv, _ = rope_scaling.rope_parameters("default", 8, 1e4)
    pq, pk = apply_rope(q, k, positions, inv, interleaved=True)
    start = 0
    for n in lens:
        sq, sk = apply_rope(q[None, start : start + n], k[None, start : start + n], torch.arange(n), inv,
                            interleaved=True)
        assert torch.equal(sq[0], pq[start : start + n]) and torch.equal(sk[0], pk[start : start + n])
        start += n


# ---------------------------------------------------------------------------------------------------------
# In place


@pytest.mark.parametrize("interleaved", [False, True])
def test_inplace_leaves_no_stale_data(interleaved):
    g = torch.Generator().manual_seed(7)
    b, s, hq, hk, d = 2, 5, 4, 2, 16
    qkv = torch.randn(b, s, hq + 2 * hk, d, generator=g)  # fused projection output; q, k are views
    before = qkv.clone()
    q, k = qkv[:, :, :hq], qkv[:, :, hq : hq + hk]
    positions = torch.randint(0, 10_000, (b, s), generator=g)
    inv, _ = rope_scaling.rope_parameters("default", 12, 1e6)  # partial: 12 of 16 dims rotate
    want_q, want_k = apply_rope(q.clone(), k.clone(), positions, inv, 1.1, interleaved)
    out_q, out_k = apply_rope(q, k, positions, inv, 1.1, interleaved, inplace=True)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert torch.equal(qkv[:, :, :hq], want_q) and torch.equal(qkv[:, :, hq : hq + hk], want_k)
    assert torch.equal(qkv[:, :, hq + hk :], before[:, :, hq + hk :])  # v untouched
    assert torch.equal(qkv[..., 12:], before[..., 12:])  # pass-through dims untouched
    assert not torch.equal(qkv[:, :, :hq, :12], before[:, :, :hq, :12])  # and the rotation really happened


@pytest.mark.parametrize("view", [False, True])
def test_inplace_into_a_leaf_that_requires_grad_is_refused_before_any_write(view):
    # autograd refuses such a write only after the kernel has run (the leaf already rotated): ask first
    g = torch.Generator().manual_seed(9)
    leaf = torch.randn(1, 4, 3, 8, generator=g, requires_grad=True)
    q, k = (leaf[:, :, :2], leaf[:, :, 2:]) if view else (leaf, torch.randn(1, 4, 1, 8, generator=g))
    before = leaf.detach().clone()
    inv = rope_scaling.rope_parameters("default", 8, 1e4)[0]
    with pytest.raises(RuntimeError, match=r"q \(1, 4, \d, 8\) is a leaf tensor that requires grad"):
        apply_rope(q, k, torch.arange(4) + 7, inv, inplace=True)
    assert torch.equal(leaf.detach(), before)
    with torch.no_grad():  # as torch allows: an in-place write into a leaf outside autograd
        out, _ = apply_rope(q, k, torch.arange(4) + 7, inv, inplace=True)
    assert out.data_ptr() == q.data_ptr() and not torch.equal(leaf.detach(), before)


def test_inplace_writes_that_would_overlap_are_refused_before_any_write():
    # before 2026-12-08 these rotated the shared elements twice, silently (max error 2 to 4 on unit inputs)
    from ring_attn.ops.rope import apply_rotary_emb
    from ring_attn.layers.rotary import apply_rotary_emb_qkv_

    g = torch.Generator().manual_seed(11)
    inv = rope_scaling.rope_parameters("default", 8, 1e4)[0]
    pos = torch.arange(4)
    buf = torch.randn(2, 4, 5, 8, generator=g)
    before = buf.clone()
    cases = {
        "q is k": (buf[:, :, :2], buf[:, :, :2]),
        "overlapping heads": (buf[:, :, 0:3], buf[:, :, 2:4]),
        "interleaved pairs": (buf[:, :, 0:4:2], buf[:, :, 2:5:2]),  # heads 0, 2 and 2, 4
        "expanded q": (buf[:1, :, :1].expand(2, 4, 3, 8), buf[:, :, 4:]),
    }
    for name, (q, k) in cases.items():
        with pytest.raises(ValueError, match="share memory"):
            apply_rope(q, k, pos, inv, inplace=True)
        assert torch.equal(buf, before), name
    # disjoint views of one buffer (q and k of a fused projection; every other head) still work in place
    for q, k in ((buf[:, :, :3], buf[:, :, 3:]), (buf[:, :, 0::2], buf[:, :, 1::2])):
        want = apply_rope(q, k, pos, inv)
        apply_rope(q, k, pos, inv, inplace=True)
        assert torch.equal(q, want[0]) and torch.equal(k, want[1])
    cos, sin = torch.cos(pos[:, None] * inv), torch.sin(pos[:, None] * inv)
    with pytest.raises(ValueError, match=r"apply_rotary_emb: x \(2, 4, 3, 8\) .* has elements that share memory"):
        apply_rotary_emb(buf[:1, :, :1].expand(2, 4, 3, 8), cos, sin, inplace=True)
    with pytest.raises(ValueError, match="has elements that share memory"):
        apply_rotary_emb_qkv_(torch.randn(1, 4, 1, 2, 8, generator=g).expand(2, 4, 3, 2, 8), cos, sin)


def test_the_overlap_check_agrees_with_a_brute_force_one():
    # random strided views of one buffer with equal strides: shared elements found exactly as by listing them
    import random

    from ring_attn._contracts import _common_element

    rng = random.Random(0)

    def offsets(x):
        idx = torch.full(x.shape, x.storage_offset(), dtype=torch.long)
        for d in range(x.dim()):
            shape = [1] * x.dim()
            shape[d] = x.shape[d]
            idx = idx + (torch.arange(x.shape[d]) * x.stride(d)).reshape(shape)
        return set(idx.flatten().tolist())

    compared = shared = 0
    while compared < 300:
        base = torch.zeros(*[rng.randint(1, 6) for _ in range(rng.randint(1, 4))])

        def view():
            return base[tuple(slice(a, rng.randint(a + 1, n), rng.randint(1, 2))
                              for n in base.shape for a in [rng.randint(0, n - 1)])]
        a, b = view(), view()
        if a.stride() != b.stride():
            continue
        truth = bool(offsets(a) & offsets(b))
        assert _common_element(a, b) == truth, (tuple(base.shape), a.shape, a.storage_offset(), b.shape,
                                                b.storage_offset(), a.stride())
        compared, shared = compared + 1, shared + truth
    assert 50 < shared < 250


@pytest.mark.parametrize("kw, exc, match", [
    (dict(inplace="False"), TypeError, r"inplace must be a bool, got 'False' \(str\)"),
    (dict(interleaved="no"), TypeError, r"interleaved must be a bool, got 'no' \(str\)"),
    (dict(attention_scaling="2"), TypeError, r"attention_scaling must be a finite float, got '2' \(str\)"),
    (dict(attention_scaling=None), TypeError, r"attention_scaling must be a finite float, got None"),
    (dict(attention_scaling=float("nan")), ValueError, r"attention_scaling must be a finite float, got nan"),
    (dict(attention_scaling=torch.tensor(2.0, requires_grad=True)), ValueError,
     r"attention_scaling is a tensor that requires grad"),
])
def test_wrong_typed_options_are_refused(kw, exc, match):
    # they were coerced with bool() / float(): inplace="False" wrote into q, interleaved="no" interleaved
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    before = q.clone()
    with pytest.raises(exc, match=match):
        apply_rope(q, k, torch.arange(4), rope_scaling.rope_parameters("default", 8, 1e4)[0], **kw)
    assert torch.equal(q, before)
    # one-element tensors of any real dtype are numbers (an int tensor was taken by float() before)
    q0, k0 = apply_rope(q, k, torch.arange(4), rope_scaling.rope_parameters("default", 8, 1e4)[0], 2.0)
    for t in (torch.tensor(2), torch.tensor([2.0]), torch.tensor(2.0, dtype=torch.float64)):
        got = apply_rope(q, k, torch.arange(4), rope_scaling.rope_parameters("default", 8, 1e4)[0], t)
        assert torch.equal(got[0], q0) and torch.equal(got[1], k0)


def test_a_strided_inv_freq_is_read_by_its_strides():
    # a column of a [rotary_dim / 2, 2] parameter: before 2026-12-07 the Triton kernel read it as contiguous
    g = torch.Generator().manual_seed(10)
    q, k = torch.randn(1, 6, 2, 16, generator=g), torch.randn(1, 6, 1, 16, generator=g)
    inv = rope_scaling.rope_parameters("default", 16, 1e4)[0]
    table = torch.stack([inv, torch.zeros_like(inv)], 1).requires_grad_()
    view = table[:, 0]
    assert not view.is_contiguous()
    leaf = inv.clone().requires_grad_()
    got, want = apply_rope(q, k, torch.arange(6) + 100, view), apply_rope(q, k, torch.arange(6) + 100, leaf)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    (got[0].sum() + got[1].square().sum()).backward()
    (want[0].sum() + want[1].square().sum()).backward()
    assert torch.equal(table.grad[:, 0], leaf.grad) and not table.grad[:, 1].any()


def test_inplace_autograd_matches_out_of_place():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 4, 3, 8, generator=g, requires_grad=True)
    y = torch.randn(1, 4, 1, 8, generator=g, requires_grad=True)
    inv = rope_scaling.rope_parameters("default", 8, 1e4)[0].requires_grad_()
    pos = torch.arange(4) * 1000
    grads = []
    for inplace in (False, True):
        q, k = x * 1.0, y * 1.0  # non-leaf, so in place is legal
        qo, ko = apply_rope(q, k, pos, inv, inplace=inplace)
        (qo.square().sum() + (ko * 3).sum()).backward()
        grads.append([t.grad.clone() for t in (x, y, inv)])
        for t in (x, y, inv):
            t.grad = None
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Equality with HF's LlamaRotaryEmbedding + apply_rotary_pos_emb for every rope type

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

HF_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(8)],
                 "long_factor": [1.0 + 0.5 * i for i in range(8)], "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("rope_type", sorted(HF_TYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_hf_llama(rope_type, dtype):
    """HF path: fp32 angles -> cos/sin tables in the model dtype -> apply_rotary_pos_emb. Positions past the
    original length exercise dynamic/longrope's own updates; ours reads the same config via from_hf_config."""
    d, hq, hk, s = 16, 2, 1, 6
    config = LlamaConfig(hidden_size=d * hq, num_attention_heads=hq, num_key_value_heads=hk, head_dim=d,
                         max_position_embeddings=128, rope_parameters=dict(HF_TYPES[rope_type]))
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, s, hq, d, generator=g).to(dtype)
    k = torch.randn(1, s, hk, d, generator=g).to(dtype)
    position_ids = torch.tensor([[0, 1, 2, 60, 150, 200]])
    rotary = LlamaRotaryEmbedding(config)
    cos, sin = rotary(q, position_ids)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    hf_q, hf_k = hf_q.transpose(1, 2), hf_k.transpose(1, 2)

    seq_len = int(position_ids.max()) + 1
    inv, scale = rope_scaling.from_hf_config(config, seq_len=seq_len)
    assert torch.allclose(inv, rotary.inv_freq)  # same frequencies as HF's module after its dynamic update
    assert scale == pytest.approx(rotary.attention_scaling)
    q_rot, k_rot = apply_rope(q, k, position_ids, inv, scale)
    oq, ok = reference.rope(q, k, position_ids, inv, scale)
    if dtype == torch.float32:  # small positions: HF's fp32 angles are good to ~1e-5 here
        torch.testing.assert_close(q_rot, hf_q, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(k_rot, hf_k, atol=2e-5, rtol=1e-5)
    # and never worse than HF against the float64 oracle (HF is the "plain torch" baseline of the rule)
    assert_within_rule("q vs hf", q_rot, oq, hf_q, dtype, FORWARD)
    assert_within_rule("k vs hf", k_rot, ok, hf_k, dtype, FORWARD)

    # drop-in: apply_rope_cos_sin reads HF's tables; forward and backward against apply_rotary_pos_emb
    qh = q.transpose(1, 2).detach().requires_grad_()
    kh = k.transpose(1, 2).detach().requires_grad_()
    dq, dk = apply_rope_cos_sin(qh, kh, cos, sin)
    q2, k2 = qh.detach().clone().requires_grad_(), kh.detach().clone().requires_grad_()
    rq, rk = apply_rotary_pos_emb(q2, k2, cos, sin)
    assert dq.shape == rq.shape and dq.dtype == rq.dtype
    gq = torch.randn(rq.shape, generator=g).to(dtype)
    gk = torch.randn(rk.shape, generator=g).to(dtype)
    (dq * gq).sum().add((dk * gk).sum()).backward()
    (rq * gq).sum().add((rk * gk).sum()).backward()
    if dtype == torch.float32:
        for a, b in ((dq, rq), (dk, rk), (qh.grad, q2.grad), (kh.grad, k2.grad)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    else:  # HF rounds each product to bf16; ours rounds once: compare both to fp64 math on the same tables
        cq, ck = reference.rope_cos_sin(q.transpose(1, 2), k.transpose(1, 2), cos, sin,
                                        compute_dtype=torch.float64)
        assert_within_rule("q table", dq, cq, rq, dtype, FORWARD)
        assert_within_rule("k table", dk, ck, rk, dtype, FORWARD)


def test_cos_sin_layouts_and_fallback():
    g = torch.Generator().manual_seed(12)
    b, s, h, d = 2, 5, 3, 8
    q = torch.randn(b, s, h, d, generator=g)
    k = torch.randn(b, s, 1, d, generator=g)
    pos = torch.arange(s)[None].expand(b, s)
    cos, sin = reference.rope_table(pos, rope_scaling.rope_parameters("default", 6, 1e4)[0])  # partial: r=6
    got = apply_rope_cos_sin(q, k, cos, sin, unsqueeze_dim=2)  # [b, s, h, d] layout
    want = reference.rope_cos_sin(q, k, cos, sin, unsqueeze_dim=2)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, atol=1e-6, rtol=1e-6)
    # tables that need grad take HF's formula in torch (exact autograd)
    cos_g = cos.clone().requires_grad_()
    qo, _ = apply_rope_cos_sin(q, k, cos_g, sin, unsqueeze_dim=2)
    qo.sum().backward()
    assert cos_g.grad is not None and cos_g.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors before launch


def _ok():
    return dict(q=torch.randn(2, 4, 2, 8), k=torch.randn(2, 4, 1, 8), positions=torch.arange(4),
                inv_freq=rope_scaling.rope_parameters("default", 8, 1e4)[0])


@pytest.mark.parametrize("change,exc,needle", [
    (dict(rotary_dim=7), ValueError, "even"),
    (dict(rotary_dim=0), ValueError, "even"),
    (dict(rotary_dim=10, inv_freq=torch.ones(5)), ValueError, "larger than the head dim"),
    (dict(rotary_dim=6), ValueError, "expected [3]"),
    (dict(positions=torch.arange(5)), ValueError, "expected [4], [2, 4] or [1, 4]"),
    (dict(positions=torch.zeros(3, 4, dtype=torch.long)), ValueError, "positions have shape (3, 4)"),
    (dict(positions=torch.tensor([0, 1, -2, 3])), ValueError, "must be >= 0"),
    (dict(positions=torch.arange(4.0)), TypeError, "int32 or int64"),
    (dict(k=torch.randn(2, 4, 1, 8, dtype=torch.float64)), TypeError, "dtypes differ"),
    (dict(q=torch.randint(0, 3, (2, 4, 2, 8))), TypeError, "dtype torch.int64"),
    (dict(k=torch.randn(2, 5, 1, 8)), ValueError, "must agree"),
    (dict(k=torch.randn(2, 4, 1, 10)), ValueError, "must agree"),
    (dict(inv_freq=torch.ones(4, dtype=torch.float16)), TypeError, "inv_freq has dtype"),
    (dict(inv_freq=torch.ones(2, 2)), ValueError, "inv_freq has shape"),
    (dict(q=torch.randn(8, 2)), ValueError, "expected [b, s, h, d] or packed [t, h, d]"),
    (dict(positions=torch.arange(4), device="meta"), ValueError, "meta"),
])
def test_bad_input(change, exc, needle):
    args = _ok()
    change = dict(change)  # the parametrized dict is shared by every backend run of this test
    device = change.pop("device", None)
    args.update(change)
    if device is not None:
        args["inv_freq"] = args["inv_freq"].to(device)
    with pytest.raises(exc) as info:
        apply_rope(**args)
    assert needle in str(info.value), str(info.value)


def test_packed_positions_shape_error():
    with pytest.raises(ValueError, match=r"expected \[6\]"):
        apply_rope(torch.randn(6, 2, 8), torch.randn(6, 1, 8), torch.arange(6)[None], torch.ones(4))


def test_negative_positions_detected_after_in_place_edit():
    args = _ok()
    apply_rope(**args)  # checked once and remembered
    args["positions"][1] = -5  # bumps the tensor's version: checked again
    with pytest.raises(ValueError, match=">= 0"):
        apply_rope(**args)


@pytest.mark.parametrize("inplace", [False, True])
def test_positions_past_the_exact_range_are_refused(inplace):
    """Below 2^29 the angle's float64 product is exact (the <= 2e-7 rad bound); past it the error grows silently
    (5e-5 rad at 2^40, ~1 rad at 2^53), so such positions raise, also after an in-place edit."""
    args = _ok()
    args["positions"] = torch.arange(args["q"].shape[1]) + (2**29 - args["q"].shape[1])  # last one 2^29 - 1
    apply_rope(**args, inplace=inplace)
    args["positions"][-1] = 2**29
    with pytest.raises(ValueError, match=r"positions must be < 2\^29 = 536870912.*maximum of 536870912"):
        apply_rope(**args, inplace=inplace)


def test_cos_sin_bad_tables():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    cos = torch.ones(1, 5, 8)
    with pytest.raises(ValueError, match="cos/sin have shape"):
        apply_rope_cos_sin(q, k, cos, cos)
    with pytest.raises(ValueError, match="same shape"):
        apply_rope_cos_sin(q, k, torch.ones(1, 4, 8), torch.ones(1, 4, 6))
    # the shapes the caller passed, in HF's layout (they were shown transposed)
    with pytest.raises(ValueError, match=r"q \(1, 6, 4, 8\) and k \(1, 6, 5, 8\) must agree on \[b, \*, s, d\]"):
        apply_rope_cos_sin(torch.randn(1, 6, 4, 8), torch.randn(1, 6, 5, 8), torch.ones(1, 4, 8), torch.ones(1, 4, 8))


def test_cos_sin_2d_tables_broadcast_as_in_hf():
    # [s, r] tables with unsqueeze_dim=1 broadcast against [b, s, h, d] q/k in HF; the fused path's [b, h, s, d]
    # shape check refused GQA there, though the fall-back computes HF's formula
    g = torch.Generator().manual_seed(12)
    q, k = torch.randn(1, 6, 4, 8, generator=g), torch.randn(1, 6, 2, 8, generator=g)
    ang = torch.arange(6)[:, None].float() * torch.rand(4, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    for got, want in zip(apply_rope_cos_sin(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------
# Benchmark smoke (keeps benchmarks/bench_rope.py from rotting) and GPU checks


def test_bench_rope_smoke(tmp_path, monkeypatch, capsys):
    root = os.path.join(os.path.dirname(__file__), "..")
    monkeypatch.syspath_prepend(root)
    monkeypatch.setenv("OUT", str(tmp_path))
    sys.modules.pop("benchmarks.bench_rope", None)
    import benchmarks.bench_rope as bench

    rows = bench.main(["--device", "cpu", "--small", "--skip", "compile"])
    names = {r["impl"] for r in rows}
    assert {"ring_attn", "hf_eager", "copy"} <= names
    assert all(r["ms"] > 0 for r in rows)
    assert (tmp_path / "bench_rope.csv").exists()
    assert "share_of_copy" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kernel_against_oracle(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1024, 32, 128, generator=g).to(dtype)
    k = torch.randn(2, 1024, 8, 128, generator=g).to(dtype)
    positions = torch.randint(0, 2**24, (2, 1024), generator=g)
    inv, scale = rope_scaling.rope_parameters("yarn", 128, 5e5, factor=32.0, original_max_position_embeddings=8192)
    for interleaved in (False, True):
        got = apply_rope(q.cuda(), k.cuda(), positions.cuda(), inv.cuda(), scale, interleaved)
        want = reference.rope(q, k, positions, inv, scale, interleaved)
        base = reference.rope(q, k, positions, inv, scale, interleaved, compute_dtype=dtype)
        for name, a, w, b in zip("qk", got, want, base):
            assert_within_rule(name, a.cpu(), w, b, dtype, FORWARD)
    # backward with learnable frequencies
    qc, kc = q.cuda().requires_grad_(), k.cuda().requires_grad_()
    invc = inv.cuda().requires_grad_()
    out = apply_rope(qc, kc, positions.cuda(), invc, scale)
    sum(o.float().square().sum() for o in out).backward()
    assert torch.isfinite(invc.grad).all() and torch.isfinite(qc.grad.float()).all()


@pytest.mark.gpu
def test_gpu_angle_accuracy():
    d = 128
    inv, _ = rope_scaling.rope_parameters("default", d, 5e5)
    pos = torch.arange(2**24 - 4096, 2**24, dtype=torch.int32)
    q = torch.zeros(1, pos.numel(), 1, d)
    q[..., : d // 2] = 1.0
    q_rot, _ = apply_rope(q.cuda(), q.cuda(), pos.cuda(), inv.cuda())
    q_rot = q_rot.cpu()
    got = torch.atan2(q_rot[0, :, 0, d // 2 :].double(), q_rot[0, :, 0, : d // 2].double())
    exact = pos.double()[:, None] * inv.double()
    err = torch.remainder(got - exact + math.pi, 2 * math.pi) - math.pi
    assert err.abs().max().item() < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-7), (torch.float64, 1e-12)])
def test_gpu_angle_accuracy_at_large_positions(dtype, tol):
    """The compiled kernel (its fp64 quotient by the 1.5 * 2^52 rounding trick, its float literals as the real
    compiler types them, libdevice sin/cos) keeps <= 2e-7 rad up to position 2^29 - 1."""
    err = _large_position_angle_error(dtype, "cuda")
    assert err <= tol, err


# ---------------------------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph_and_opcheck():
    """apply_rope (learnable inv_freq too) and apply_rope_cos_sin are custom ops: torch.compile(fullgraph=True)
    traces them without a graph break (the positions' value check runs inside the op, outside the graph) and
    gives the eager values and gradients; torch.library.opcheck accepts the four ops (schema, fake tensor,
    autograd registration)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 4, 8, generator=g)
    k = torch.randn(2, 5, 2, 8, generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    inv = rope_scaling.rope_parameters("default", 8, 1e4)[0]
    cos = torch.randn(2, 5, 6, generator=g)
    sin = torch.randn(2, 5, 6, generator=g)

    def f(q, k, inv, qh, kh):
        qa, ka = apply_rope(q, k, pos, inv, attention_scaling=1.25)
        qb, kb = apply_rope_cos_sin(qh, kh, cos, sin)  # HF layout [b, h, s, d], 6 of 8 dims rotated
        return (qa * 2).sum() + ka.sum() + (qb * 3).sum() + kb.sum()

    def inputs():
        return [x.clone().requires_grad_() for x in (q, k, inv, q.transpose(1, 2), k.transpose(1, 2))]

    args, eager_args = inputs(), inputs()
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    y_eager = f(*eager_args)
    y.backward()
    y_eager.backward()
    torch.testing.assert_close(y, y_eager)
    for a, b in zip(args, eager_args):
        torch.testing.assert_close(a.grad, b.grad)
    ops = torch.ops.ring_attn
    torch.library.opcheck(ops.rope_forward.default, (q, k, pos, inv.clone().requires_grad_(), 1.25, False, 8))
    torch.library.opcheck(ops.rope_backward.default, (q, k, pos, inv, q, k, 1.0, True, 8))
    torch.library.opcheck(ops.rope_table_forward.default, (q, k, cos, sin, torch.float32))
    torch.library.opcheck(ops.rope_table_backward.default, (q, k, cos, sin, torch.float32))


def test_positions_in_range_is_the_check_apply_rope_makes():
    """ops.rope.positions_in_range answers what apply_rope accepts ([0, 2^29)); the HF patch asks it before
    choosing the fused kernel. A tensor rewritten in place is checked again (its in-place version changes)."""
    from ring_attn.ops.rope import MAX_POSITION, positions_in_range

    pos = torch.arange(8)
    assert positions_in_range(pos) and positions_in_range(torch.zeros(0, dtype=torch.long))
    assert not positions_in_range(torch.tensor([-1, 0, 1]))
    assert not positions_in_range(torch.tensor([0, MAX_POSITION]))
    assert positions_in_range(torch.tensor([0, MAX_POSITION - 1]))
    pos[3] = -2  # after a positive answer: in place, so asked again
    assert not positions_in_range(pos)
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        apply_rope(q, q, pos, torch.ones(4))
