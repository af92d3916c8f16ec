"""``ring_attn.ops.padding.padded_attention``: a padded batch with a 2-D key-padding mask, as one custom op (what
the HF patch runs for padded batches, eagerly and under torch.compile).

* every backend (automatic: the Triton interpreter here; native; reference): forward and gradients against the
  float64 oracle ``reference.attention_padded`` (each row's real tokens as one sequence), over left / right
  padding, holes, a fully padded row, GQA, a prefix cache (fewer queries than keys), causal and not, a window
  with left padding, softcap;
* an all-ones mask takes the dense kernels: the same bits as ``flash_attn_func``;
* dropout: the same mask and bits as ``flash_attn_varlen_func`` on the gathered rows with the seed drawn;
* the plan is cached on the mask (once per mask tensor) and redone after an in-place change;
* argument errors name the argument; a window over a row with holes is refused;
* ``torch.library.opcheck`` of the op and ``torch.compile(fullgraph=True)`` over it (no graph break).
"""
import pytest
import torch

import ring_attn
from accuracy import BACKWARD, FORWARD, assert_within_rule
from ring_attn import reference
from ring_attn.ops import padding

pytestmark = pytest.mark.usefixtures("cpu_backend")


def _mask(b, s, kind, g):
    keep = torch.ones(b, s, dtype=torch.bool)
    if kind == "left":
        for i in range(b):
            keep[i, : int(torch.randint(0, s - 1, (1,), generator=g))] = False
    elif kind == "right":
        for i in range(b):
            keep[i, s - int(torch.randint(0, s - 1, (1,), generator=g)):] = False
    elif kind == "holes":
        keep = torch.rand(b, s, generator=g) > 0.35
        keep[:, -1] = True
    elif kind == "empty-row":
        keep[0] = False
        keep[1, :3] = False
    return keep


CASES = [  # b, s_q, s_k, h_q, h_kv, d, causal, window, softcap, mask kind
    (3, 13, 13, 4, 2, 16, True, (-1, -1), 0.0, "left"),
    (2, 17, 17, 2, 2, 32, True, (-1, -1), 0.0, "right"),
    (2, 15, 15, 4, 1, 16, True, (-1, -1), 0.0, "holes"),
    (2, 11, 11, 2, 2, 16, False, (-1, -1), 0.0, "holes"),
    (3, 9, 9, 2, 1, 16, True, (-1, -1), 0.0, "empty-row"),
    (2, 3, 14, 4, 2, 16, True, (-1, -1), 0.0, "left"),     # a prefix cache: queries are the last 3 keys
    (2, 16, 16, 2, 2, 16, True, (4, 0), 2.0, "left"),      # a sliding window (left padding), softcap
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_matches_the_oracle(case, dtype):
    b, s_q, s_k, h_q, h_kv, d, causal, window, softcap, kind = case
    g = torch.Generator().manual_seed(hash(case) % 2 ** 31)
    q = torch.randn(b, s_q, h_q, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, s_k, h_kv, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, s_k, h_kv, d, generator=g).to(dtype).requires_grad_()
    keep = _mask(b, s_k, kind, g)
    out = padding.padded_attention(q, k, v, keep, causal=causal, window_size=window, softcap=softcap)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qo, ko, vo = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference.attention_padded(qo, ko, vo, keep, causal=causal, window=window, softcap=softcap)
    ref_grads = torch.autograd.grad(ref, (qo, ko, vo), dout.double())
    qb, kb, vb = (x.detach().requires_grad_() for x in (q, k, v))
    base = reference.attention_padded(qb, kb, vb, keep, causal=causal, window=window, softcap=softcap,
                                      compute_dtype=dtype)
    base_grads = torch.autograd.grad(base, (qb, kb, vb), dout)
    real_q = keep[:, -s_q:]
    assert torch.all(out[~real_q] == 0)  # padded query rows: zeros
    assert_within_rule("out", out.double(), ref, base.double(), dtype, FORWARD)
    for name, x, r, bl in zip("qkv", grads, ref_grads, base_grads):
        assert_within_rule(f"d{name}", x.double(), r, bl.double(), dtype, BACKWARD)
    # padded keys get no gradient; padded queries neither
    assert torch.all(grads[1][~keep] == 0) and torch.all(grads[2][~keep] == 0) and torch.all(grads[0][~real_q] == 0)


def test_all_ones_mask_is_the_dense_call():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 12, 2, 16, generator=g).requires_grad_() for _ in range(3))
    keep = torch.ones(2, 12, dtype=torch.int64)  # an integer mask (as tokenizers return) is accepted
    out = padding.padded_attention(q, k, v, keep, causal=True)
    dense = ring_attn.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out, dense)
    dout = torch.randn(out.shape, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, (q, k, v), dout),
                                                   torch.autograd.grad(dense, (q, k, v), dout)))


def test_dropout_equals_the_varlen_call_on_the_real_rows(cpu_backend):
    g = torch.Generator().manual_seed(2)
    b, s, h, d = 2, 10, 2, 16
    q, k, v = (torch.randn(b, s, h, d, generator=g).requires_grad_() for _ in range(3))
    keep = _mask(b, s, "left", g)
    torch.manual_seed(7)
    out = padding.padded_attention(q, k, v, keep, dropout_p=0.3, causal=True)
    idx = keep.reshape(-1).nonzero().reshape(-1)
    lens = keep.sum(1)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
    qp, kp, vp = (x.reshape(b * s, h, d)[idx] for x in (q, k, v))
    torch.manual_seed(7)  # the same seed drawn, the same Dropout(rows, keys): the same mask
    ref = ring_attn.flash_attn_varlen_func(qp, kp, vp, cu, cu, int(lens.max()), int(lens.max()), dropout_p=0.3,
                                           causal=True)
    assert torch.equal(out.reshape(b * s, h, d)[idx], ref)
    assert (out - padding.padded_attention(q, k, v, keep, causal=True)).abs().max() > 0.05  # dropout did act
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout.reshape(b * s, h, d)[idx])
    assert all(torch.equal(a, w) for a, w in zip(got, want))


def test_plan_is_cached_on_the_mask_and_redone_after_an_in_place_change():
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, :3] = False
    plan = padding.unpad_plan(keep, 8)
    assert padding.unpad_plan(keep, 8) is plan and not plan.dense and plan.max_k == 8 and plan.max_q == 8
    assert plan.cu_k.tolist() == [0, 5, 13] and not plan.holes
    keep[0, :3] = True  # in place
    again = padding.unpad_plan(keep, 8)
    assert again is not plan and again.dense
    keep[1, 4] = False
    assert padding.unpad_plan(keep, 8).holes


def test_window_over_a_row_with_holes_is_refused():
    q = k = v = torch.randn(1, 8, 1, 16)
    keep = torch.ones(1, 8, dtype=torch.bool)
    keep[0, 3] = False
    with pytest.raises(NotImplementedError, match="holes"):
        padding.padded_attention(q, k, v, keep, causal=True, window_size=(2, 0))


@pytest.mark.parametrize("mask,err,match", [
    (torch.ones(2, 8), TypeError, "key_padding_mask must be a bool or integer tensor"),
    (torch.ones(2, 7, dtype=torch.bool), ValueError, r"key_padding_mask must be \[batch, seqlen_k\]"),
    ([[1] * 8] * 2, TypeError, "key_padding_mask must be a bool or integer tensor"),
])
def test_bad_masks_name_the_argument(mask, err, match):
    q = k = v = torch.randn(2, 8, 1, 16)
    with pytest.raises(err, match=match):
        padding.padded_attention(q, k, v, mask)


@pytest.mark.parametrize("b,s_q,s_k", [(0, 4, 4), (2, 0, 0), (2, 0, 5)])
def test_empty_batches_and_no_queries_give_empty_results(b, s_q, s_k):
    """Empty shapes are what flash_attn_func returns for them (they failed in the plan's reductions, and with no
    query but some keys the plan took every key as a query)."""
    q = torch.randn(b, s_q, 2, 8, requires_grad=True)
    k = torch.randn(b, s_k, 1, 8, requires_grad=True)
    m = torch.ones(b, s_k, dtype=torch.bool)
    if b and s_k:
        m[0, :2] = False
    out = ring_attn.padded_attention(q, k, k, m, causal=True)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and not k.grad.any()
    compiled = torch.compile(ring_attn.padded_attention, backend="aot_eager", fullgraph=True)
    assert compiled(q, k, k, m).shape == q.shape


def test_more_queries_than_keys_is_refused():
    q, k = torch.randn(1, 9, 1, 16), torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="seqlen_q"):
        padding.padded_attention(q, k, k, torch.ones(1, 8, dtype=torch.bool))


def test_opcheck_and_one_graph_under_compile(cpu_backend):
    if cpu_backend is not None:
        pytest.skip("the op's registration does not depend on the backend")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 9, 2, 16, generator=g).requires_grad_() for _ in range(3))
    keep = _mask(2, 9, "left", g)
    args = (q, k, v, keep, 0.25, True, -1, -1, 0.0, 0.0)
    torch.library.opcheck(torch.ops.ring_attn.padded_attention_forward, args)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: padding.padded_attention(*a, causal=True), backend="aot_eager",
                             fullgraph=True)
    out = compiled(q, k, v, keep)
    assert torch.equal(out, padding.padded_attention(q, k, v, keep, causal=True))
    dout = torch.randn(out.shape, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(
        torch.autograd.grad(out, (q, k, v), dout),
        torch.autograd.grad(padding.padded_attention(q, k, v, keep, causal=True), (q, k, v), dout)))



@pytest.mark.gpu
def test_gpu_padded_batch_compiled_with_inductor():
    """bf16 on the GPU: left padding with GQA 8/2, d=128, causal, under torch.compile(fullgraph=True) with
    inductor: out and gradients against the float64 oracle, by the accuracy rule."""
    g = torch.Generator(device="cuda").manual_seed(0)
    b, s = 3, 200
    mk = lambda h: torch.randn(b, s, h, 128, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = mk(8).requires_grad_(), mk(2).requires_grad_(), mk(2).requires_grad_()
    keep = torch.ones(b, s, dtype=torch.bool, device="cuda")
    keep[0, :37] = False
    keep[2, :150] = False
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: padding.padded_attention(*a, causal=True), fullgraph=True)
    out = fn(q, k, v, keep)
    dout = mk(8)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qo, ko, vo = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference.attention_padded(qo, ko, vo, keep, causal=True)
    ref_grads = torch.autograd.grad(ref, (qo, ko, vo), dout.double())
    qb, kb, vb = (x.detach().requires_grad_() for x in (q, k, v))
    base = reference.attention_padded(qb, kb, vb, keep, causal=True, compute_dtype=torch.bfloat16)
    base_grads = torch.autograd.grad(base, (qb, kb, vb), dout)
    assert_within_rule("out", out.double(), ref, base.double(), torch.bfloat16, FORWARD)
    for name, x, r, bl in zip("qkv", grads, ref_grads, base_grads):
        assert_within_rule(f"d{name}", x.double(), r, bl.double(), torch.bfloat16, BACKWARD)
