"""The attention functions' two routes to the same implementation: eagerly a plain autograd Function (less host
time per call than the custom-op machinery: ``benchmarks/bench_overhead.py``), traced (torch.compile, FakeTensor,
dispatch modes, tensor subclasses) the registered custom op. Both give the same bits, forward and backward (the
LSE's gradient and dropout included), and each route is taken where it should be."""
import pytest
import torch

import ring_attn
from ring_attn.ops import attention as ops_attention

pytestmark = pytest.mark.usefixtures("cpu_backend")


def _inputs(dense=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dense:
        shapes = [(2, 11, 4, 16), (2, 13, 2, 16), (2, 13, 2, 16)]
    else:
        shapes = [(17, 4, 16), (17, 2, 16), (17, 2, 16)]
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


def _op_route(q, k, v, cu, maxlen, p=0.0):
    """What the public functions ran before the eager route: the custom op and its registered autograd."""
    max_q, max_k = (q.shape[1], k.shape[1]) if cu is None else (maxlen, maxlen)
    out, lse, _ = torch.ops.ring_attn.flash_attn_forward(q, k, v, cu, cu, max_q, max_k, q.shape[-1] ** -0.5, True,
                                                         -1, -1, 0.0, None, p)
    return out, lse


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "varlen"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_eager_route_equals_the_custom_op(dense, p, cpu_backend):
    q, k, v = _inputs(dense)
    cu = None if dense else torch.tensor([0, 5, 5, 17], dtype=torch.int32)
    if dense:
        k, v = k.detach()[:, :11].requires_grad_(), v.detach()[:, :11].requires_grad_()
        run = lambda: ring_attn.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_lse=True)  # noqa: E731
    else:
        run = lambda: ring_attn.flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, dropout_p=p, causal=True,  # noqa
                                                       return_lse=True)
    torch.manual_seed(3)
    out, lse = run()
    torch.manual_seed(3)
    out2, lse2 = _op_route(q, k, v, cu, 12, p)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    g = torch.Generator().manual_seed(9)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    got = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse), retain_graph=True)
    want = torch.autograd.grad((out2, lse2), (q, k, v), (dout, dlse), retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # only the LSE used: its gradient alone flows (dout is None inside)
    got = torch.autograd.grad(lse, (q, k, v), dlse)
    want = torch.autograd.grad(lse2, (q, k, v), dlse)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_each_route_is_taken_where_it_should_be(monkeypatch, cpu_backend):
    if cpu_backend is not None:
        pytest.skip("the route does not depend on the backend")
    eager = []
    orig = ops_attention._Eager.apply
    monkeypatch.setattr(ops_attention._Eager, "apply", lambda *a: (eager.append(1), orig(*a))[1])
    q, k, v = _inputs()
    k, v = k[:, :11], v[:, :11]
    out = ring_attn.flash_attn_func(q, k, v, causal=True)
    assert eager == [1] and "_Eager" in type(out.grad_fn).__name__
    with torch.no_grad():  # no autograd graph at all
        assert ring_attn.flash_attn_func(q, k, v, causal=True).grad_fn is None
    assert eager == [1]
    # FakeTensor (shape propagation, export, meta-device tools): the custom op and its fake implementation
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode()
    fq, fk, fv = (mode.from_tensor(x.detach()) for x in (q, k, v))
    with mode:
        fake = ring_attn.flash_attn_func(fq, fk, fv, causal=True)
    assert eager == [1] and isinstance(fake, FakeTensor) and tuple(fake.shape) == tuple(q.shape)


def test_compiled_call_uses_the_custom_op(cpu_backend):
    if cpu_backend is not None:
        pytest.skip("the route does not depend on the backend")
    q, k, v = _inputs()
    k, v = k.detach()[:, :11].requires_grad_(), v.detach()[:, :11].requires_grad_()
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda a, b, c: ring_attn.flash_attn_func(a, b, c, causal=True), backend=backend,
                             fullgraph=True)
    out = compiled(q, k, v)
    assert torch.equal(out, ring_attn.flash_attn_func(q, k, v, causal=True))
    assert any("ring_attn.flash_attn_forward" in str(n.target) for gm in graphs for n in gm.graph.nodes)


@pytest.mark.parametrize("learn_theta", [False, True], ids=["fixed-theta", "learned-theta"])
def test_rope_eager_route_equals_the_custom_op(learn_theta, cpu_backend):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 9, 4, 16, generator=g).requires_grad_()
    k = torch.randn(2, 9, 2, 16, generator=g).requires_grad_()
    pos = torch.randint(0, 5000, (2, 9), generator=g)
    inv = (1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)).requires_grad_(learn_theta)
    qo, ko = ring_attn.apply_rope(q, k, pos, inv, attention_scaling=1.25)
    assert "_EagerRope" in type(qo.grad_fn).__name__
    qo2, ko2 = torch.ops.ring_attn.rope_forward(q, k, pos, inv, 1.25, False, 16)
    assert torch.equal(qo, qo2) and torch.equal(ko, ko2)
    gq, gk = torch.randn(qo.shape, generator=g), torch.randn(ko.shape, generator=g)
    wrt = (q, k, inv) if learn_theta else (q, k)
    got = torch.autograd.grad((qo, ko), wrt, (gq, gk))
    want = torch.autograd.grad((qo2, ko2), wrt, (gq, gk))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with torch.no_grad():
        assert ring_attn.apply_rope(q, k, pos, inv)[0].grad_fn is None


def test_jit_trace_records_the_custom_op(cpu_backend):
    if cpu_backend is not None:
        pytest.skip("the route does not depend on the backend")
    import warnings

    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 8, 2, 16, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python values it records as constants
        traced_fn = torch.jit.trace(lambda a, b, c: ring_attn.flash_attn_func(a, b, c, causal=True), (q, k, v))
    assert "ring_attn::flash_attn_forward" in [n.kind() for n in traced_fn.graph.nodes()]
    q2 = torch.randn(1, 8, 2, 16, generator=g)
    assert torch.equal(traced_fn(q2, k, v), ring_attn.flash_attn_func(q2, k, v, causal=True))


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_padded_attention_eager_route_equals_the_custom_op(p, cpu_backend):
    """padded_attention eagerly runs the custom ops' bodies through a plain autograd Function: the same bits as
    the registered op, forward and gradients; no autograd graph under no_grad; the op under FakeTensor."""
    from ring_attn.ops import padding as ops_padding

    q, k, v = _inputs()
    k, v = k.detach()[:, :11].requires_grad_(), v.detach()[:, :11].requires_grad_()
    q = q.detach()[:, :7].requires_grad_()
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[0, :3] = False  # left padding
    keep[1, 9:] = False  # right padding
    torch.manual_seed(4)
    out = ring_attn.padded_attention(q, k, v, keep, dropout_p=p, causal=True)
    assert "_EagerPadded" in type(out.grad_fn).__name__
    torch.manual_seed(4)
    out2 = torch.ops.ring_attn.padded_attention_forward(q, k, v, keep, 0.25, True, -1, -1, 0.0, p)[0]
    assert torch.equal(out, out2)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(out2, (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with torch.no_grad():
        torch.manual_seed(4)
        plain = ring_attn.padded_attention(q, k, v, keep, dropout_p=p, causal=True)
    assert plain.grad_fn is None and torch.equal(plain, out)
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    eager = []
    orig = ops_padding._EagerPadded.apply
    ops_padding._EagerPadded.apply = lambda *a: (eager.append(1), orig(*a))[1]
    try:
        mode = FakeTensorMode()
        fq, fk, fv, fkeep = (mode.from_tensor(x.detach()) for x in (q, k, v, keep))
        with mode:
            fake = ring_attn.padded_attention(fq, fk, fv, fkeep, causal=True)
    finally:
        ops_padding._EagerPadded.apply = orig
    assert not eager and isinstance(fake, FakeTensor) and tuple(fake.shape) == tuple(q.shape)
