"""ring_attn.cross_entropy_sum / linear_cross_entropy_sum: the float64 oracle, memory (what autograd keeps), errors.

Accuracy rule (tests/accuracy.py): the oracle is ``reference.cross_entropy_sum`` in float64; the baseline is what
training code does without these functions (``F.cross_entropy(logits.float(), reduction="sum")`` on logits in the
low precision, the logits formed by a matmul in that precision for the linear form).
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from accuracy import BACKWARD, FORWARD, assert_within_rule
import ring_attn
from ring_attn import reference

F = torch.nn.functional
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _targets(n, vocab, ignored, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (n,), generator=g)
    t[torch.randperm(n, generator=g)[:ignored]] = -100
    return t


def _capped(z, scale, cap):
    z = z * scale
    return torch.tanh(z / cap) * cap if cap else z


@given(n=st.integers(1, 12), vocab=st.integers(2, 40), ignored=st.integers(0, 3), rows=st.sampled_from([1, 3, 64]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_cross_entropy_sum_matches_the_oracle(n, vocab, ignored, rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * 4).to(dtype)
    t = _targets(n, vocab, min(ignored, n), seed)
    x64 = logits.double().requires_grad_()
    oracle = reference.cross_entropy_sum(x64, t)
    (g_oracle,) = torch.autograd.grad(oracle, x64)
    xb = logits.clone().requires_grad_()
    base = F.cross_entropy(xb.float(), t, reduction="sum")
    (g_base,) = torch.autograd.grad(base, xb)
    x = logits.clone().requires_grad_()
    got = ring_attn.cross_entropy_sum(x, t, block_bytes=4 * vocab * rows)
    (g_got,) = torch.autograd.grad(got, x)
    assert got.dtype == torch.float32 and g_got.dtype == dtype
    assert_within_rule("loss", got.reshape(1), oracle.reshape(1), base.reshape(1), torch.float32, FORWARD)
    assert_within_rule("grad", g_got, g_oracle, g_base, dtype, BACKWARD)
    assert (g_got[t == -100] == 0).all()


@given(n=st.integers(1, 10), vocab=st.integers(2, 30), hidden=st.integers(1, 12), ignored=st.integers(0, 2),
       rows=st.sampled_from([1, 4, 64]), transform=st.sampled_from([(1.0, 0.0), (0.5, 0.0), (1.0, 2.0), (2.0, 3.0)]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_linear_cross_entropy_sum_matches_the_oracle(n, vocab, hidden, ignored, rows, transform, dtype, seed):
    scale, cap = transform
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(dtype)
    w = torch.randn(vocab, hidden, generator=g).to(dtype)
    t = _targets(n, vocab, min(ignored, n), seed)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    oracle = reference.cross_entropy_sum(h64 @ w64.t(), t, logit_scale=scale, softcap=cap)
    go = torch.autograd.grad(oracle, (h64, w64))
    hb, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
    base = F.cross_entropy(_capped((hb @ wb.t()).float(), scale, cap), t, reduction="sum")
    gb = torch.autograd.grad(base, (hb, wb))
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = ring_attn.linear_cross_entropy_sum(hg, wg, t, logit_scale=scale, softcap=cap,
                                             block_bytes=4 * vocab * rows)
    gg = torch.autograd.grad(got, (hg, wg))
    assert_within_rule("loss", got.reshape(1), oracle.reshape(1), base.reshape(1), torch.float32, FORWARD)
    for name, a, o, b in zip(("d hidden", "d weight"), gg, go, gb):
        assert a.dtype == dtype
        assert_within_rule(name, a, o, b, dtype, BACKWARD)


def test_float64_inputs_are_computed_in_float64():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, -100, 3, 3])
    got = ring_attn.cross_entropy_sum(x, t)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, F.cross_entropy(x, t, reduction="sum"), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("offset", [1e4, -1e4, 300.0])
def test_logits_sharing_a_large_offset_keep_float32_accuracy(offset):
    """The log-sum-exp is kept as (row max, log of the shifted sum): one float32 LSE of logits near 1e4 rounds by
    5e-4, which went into every probability (gradient error 4.7e-5 where F.cross_entropy's is 2e-8, found by a
    randomized run). Loss and gradient must be as accurate as F.cross_entropy on the same float32 logits."""
    g = torch.Generator().manual_seed(0)
    logits = offset + 2 * torch.randn(8, 1000, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    x64 = logits.double().requires_grad_()
    oracle = F.cross_entropy(x64, t, reduction="sum")
    (g_oracle,) = torch.autograd.grad(oracle, x64)
    for blocks in (4 * 1000, 4 * 1000 * 8):
        x = logits.clone().requires_grad_()
        got = ring_attn.cross_entropy_sum(x, t, block_bytes=blocks)
        (g_got,) = torch.autograd.grad(got, x)
        assert abs(got.item() - oracle.item()) <= 2e-7 * oracle.item()
        assert (g_got.double() - g_oracle).abs().max().item() <= 1e-7
    h = torch.cat([torch.randn(8, 15, generator=g), torch.ones(8, 1)], 1)
    w = torch.cat([torch.randn(1000, 15, generator=g), torch.full((1000, 1), offset)], 1)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    oracle = F.cross_entropy(h64 @ w64.t(), t, reduction="sum")
    go = torch.autograd.grad(oracle, (h64, w64))
    hb, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
    base = F.cross_entropy(hb @ wb.t(), t, reduction="sum")
    gb = torch.autograd.grad(base, (hb, wb))
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = ring_attn.linear_cross_entropy_sum(hg, wg, t, block_bytes=4 * 1000 * 3)
    gg = torch.autograd.grad(got, (hg, wg))
    assert_within_rule("loss", got.reshape(1), oracle.reshape(1), base.reshape(1), torch.float32, FORWARD)
    for name, a, o, b in zip(("d hidden", "d weight"), gg, go, gb):
        assert_within_rule(name, a, o, b, torch.float32, BACKWARD)


@pytest.mark.parametrize("ignore_index", [7, 100, 2**40])
def test_ignore_index_may_be_any_int(ignore_index):
    """F.cross_entropy accepts an ignore_index at or past the vocabulary (the ignored rows were gathered at it:
    an index error)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, ignore_index, 3, ignore_index])
    want = F.cross_entropy(x, t, ignore_index=ignore_index, reduction="sum")
    got = ring_attn.cross_entropy_sum(x, t, ignore_index=ignore_index)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    h = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    want = F.cross_entropy(h @ w.t(), t, ignore_index=ignore_index, reduction="sum")
    got = ring_attn.linear_cross_entropy_sum(h, w, t, ignore_index=ignore_index)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        torch.testing.assert_close(a, b)


def test_shapes_at_the_edges():
    # [b, s] rows with flat or shaped targets agree; hidden size 0 (every logit 0): N log V, as F.cross_entropy
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (2, 3), generator=g)
    want = F.cross_entropy(x.reshape(6, 5), t.reshape(6), reduction="sum")
    for tt in (t, t.reshape(6)):
        torch.testing.assert_close(ring_attn.cross_entropy_sum(x, tt), want, rtol=1e-14, atol=0)
    h = torch.zeros(2, 3, 0, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(5, 0, dtype=torch.float64, requires_grad=True)
    got = ring_attn.linear_cross_entropy_sum(h, w, t)
    torch.testing.assert_close(got, torch.tensor(6 * math.log(5), dtype=torch.float64), rtol=1e-14, atol=0)
    gh, gw = torch.autograd.grad(got, (h, w))
    assert gh.shape == h.shape and gw.shape == w.shape


def test_ignored_rows_get_exactly_zero_gradient_whatever_they_hold():
    # F.cross_entropy gives NaN there (softmax of a NaN / inf row times 0); the docstring promises zero
    x = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [float("inf"), 1.0], [-float("inf"), -float("inf")]],
                     requires_grad=True)
    t = torch.tensor([0, -100, -100, -100])
    loss = ring_attn.cross_entropy_sum(x, t)
    (g,) = torch.autograd.grad(loss * 3.0, x)
    assert torch.isfinite(loss) and not g[1:].any()
    torch.testing.assert_close(g[0], 3.0 * (torch.softmax(x[0].detach(), 0) - torch.tensor([1.0, 0.0])))


def test_logit_scale_takes_a_one_element_tensor_as_softcap_does():
    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    assert torch.equal(ring_attn.linear_cross_entropy_sum(h, w, t, logit_scale=torch.tensor(0.5)),
                       ring_attn.linear_cross_entropy_sum(h, w, t, logit_scale=0.5))


def _saved_sizes(fn):
    """numel and storage pointer of every tensor autograd saves while ``fn`` runs."""
    saved = []

    def pack(t):
        saved.append((t.numel(), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_autograd_keeps_no_logits_sized_float32_tensor():
    """What makes these functions lean: ``F.cross_entropy(logits.float())`` saves a [N, V] float32 tensor (the
    premise, checked), ``cross_entropy_sum`` saves the logits themselves (no copy) and [N]-sized tensors, and
    ``linear_cross_entropy_sum`` saves nothing of the logits' size at all."""
    n, vocab, hidden = 32, 64, 8
    logits = torch.randn(n, vocab, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, vocab, (n,))
    plain = _saved_sizes(lambda: F.cross_entropy(logits.float(), t, reduction="sum"))
    assert any(numel >= n * vocab and ptr != logits.untyped_storage().data_ptr() for numel, ptr in plain)
    ours = _saved_sizes(lambda: ring_attn.cross_entropy_sum(logits, t))
    big = [(numel, ptr) for numel, ptr in ours if numel >= n * vocab]
    assert big == [(n * vocab, logits.untyped_storage().data_ptr())]
    h = torch.randn(n, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    assert max(numel for numel, _ in _saved_sizes(lambda: ring_attn.linear_cross_entropy_sum(h, w, t))) < n * vocab


@pytest.mark.parametrize("call,exc,word", [
    (lambda: ring_attn.cross_entropy_sum(torch.randn(3, 5), torch.tensor([0.0, 1.0, 2.0])), TypeError, "targets"),
    (lambda: ring_attn.cross_entropy_sum(torch.randn(3, 5), torch.tensor([0, 1])), ValueError, "targets"),
    (lambda: ring_attn.cross_entropy_sum(torch.randn(3, 5), torch.tensor([0, -3, 1])), RuntimeError,
     r"targets\[1\] = -3 is outside \[0, 5\)"),
    (lambda: ring_attn.cross_entropy_sum(torch.randn(3, 5), torch.tensor([0, 5, 9])), RuntimeError,
     r"targets\[1\] = 5 is outside \[0, 5\) and is not ignore_index \(2 such row"),
    (lambda: ring_attn.linear_cross_entropy_sum(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 7])),
     RuntimeError, r"targets\[2\] = 7"),
    # targets of the rows' size but another shape would pair targets with the wrong rows (accepted before
    # 2026-12-07: [s, b] targets for [b, s] logits gave a wrong loss)
    (lambda: ring_attn.cross_entropy_sum(torch.randn(2, 3, 5), torch.zeros(3, 2, dtype=torch.long)), ValueError,
     r"targets have shape \(3, 2\); expected \[2, 3\] or \[6\]"),
    (lambda: ring_attn.cross_entropy_sum(torch.randn(3, 5), torch.zeros(1, 3, dtype=torch.long)), ValueError,
     r"targets have shape \(1, 3\); expected \[3\]"),
    (lambda: ring_attn.linear_cross_entropy_sum(torch.randn(2, 3, 4), torch.randn(5, 4),
                                                torch.zeros(3, 2, dtype=torch.long)), ValueError, "targets"),
    (lambda: ring_attn.cross_entropy_sum(torch.randn(3, 5), torch.tensor([0, 1, 2]), ignore_index=2**70),
     ValueError, "ignore_index must fit in int64"),
    (lambda: ring_attn.cross_entropy_sum(torch.arange(6).reshape(2, 3), torch.tensor([0, 1])), TypeError, "logits"),
    (lambda: ring_attn.linear_cross_entropy_sum(torch.randn(3, 4), torch.randn(5, 3), torch.tensor([0, 1, 2])),
     ValueError, "weight"),
    (lambda: ring_attn.linear_cross_entropy_sum(torch.randn(3, 4), torch.randn(5, 4).double(),
                                                torch.tensor([0, 1, 2])), TypeError, "dtype"),
    (lambda: ring_attn.linear_cross_entropy_sum(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]),
                                                softcap=-1.0), ValueError, "softcap"),
    (lambda: ring_attn.linear_cross_entropy_sum(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]),
                                                softcap=float("nan")), ValueError, "softcap"),
    (lambda: ring_attn.linear_cross_entropy_sum(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]),
                                                logit_scale=float("inf")), ValueError, "logit_scale"),
    (lambda: ring_attn.linear_cross_entropy_sum(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]),
                                                logit_scale="2"), TypeError, "logit_scale"),
    (lambda: ring_attn.linear_cross_entropy_sum(torch.randn(4), torch.randn(5, 4), torch.tensor([0])),
     ValueError, "hidden"),
    # a learnable scale or cap would get no gradient (they were read with .item(), silently)
    (lambda: ring_attn.linear_cross_entropy_sum(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]),
                                                logit_scale=torch.tensor(0.5, requires_grad=True)), ValueError,
     "logit_scale is a tensor that requires grad"),
    (lambda: ring_attn.linear_cross_entropy_sum(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]),
                                                softcap=torch.tensor(30.0, requires_grad=True)), ValueError,
     "softcap is a tensor that requires grad"),
    # a numpy array is named as such (its dtype read as if float32 were refused)
    (lambda: ring_attn.cross_entropy_sum(torch.randn(3, 5).numpy(), torch.tensor([0, 1, 2])), TypeError,
     "logits must be a floating-point torch.Tensor, got ndarray"),
    (lambda: ring_attn.linear_cross_entropy_sum(torch.randn(3, 4), torch.randn(0, 4), torch.tensor([0, 1, 2])),
     ValueError, "vocab"),
    (lambda: ring_attn.cross_entropy_sum(torch.randn(3, 0), torch.tensor([0, 1, 2])), ValueError, "vocabulary"),
    (lambda: ring_attn.cross_entropy_sum(torch.randn(3, 5), torch.tensor([0, 1, 2]), ignore_index=1.5),
     TypeError, "ignore_index"),
    (lambda: ring_attn.cross_entropy_sum(torch.randn(3, 5), torch.tensor([0, 1, 2]), block_bytes="1k"),
     TypeError, "block_bytes"),
    (lambda: ring_attn.cross_entropy_sum(torch.randn(3, 5), torch.tensor([0, 1, 2]), block_bytes=0),
     ValueError, "block_bytes"),
])
def test_errors_name_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_linear_form_under_autocast_computes_what_the_autocast_dtype_computes():
    """Under autocast the head's matmuls run in autocast's dtype in the forward *and* in the backward's
    recomputation (a backward that recomputed the logits in float32 would pair them with the forward's bf16
    log-sum-exp): the result is bit for bit that of the same call on inputs already in bf16."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(9, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    t = _targets(9, 40, 2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ring_attn.linear_cross_entropy_sum(h, w, t, softcap=3.0, block_bytes=4 * 40 * 4)
    gh, gw = torch.autograd.grad(got, (h, w))
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    want = ring_attn.linear_cross_entropy_sum(hb, wb, t, softcap=3.0, block_bytes=4 * 40 * 4)
    wh, ww = torch.autograd.grad(want, (hb, wb))
    assert torch.equal(got, want)
    assert torch.equal(gh, wh.float()) and torch.equal(gw.bfloat16(), ww)
    with pytest.raises(TypeError, match="autocast"):
        ring_attn.linear_cross_entropy_sum(h, w.detach().bfloat16(), t)  # mixed dtypes outside autocast


@pytest.mark.gpu
def test_gpu_memory_and_values():
    """On a GPU: fwd+bwd of head + cross entropy at 8192 tokens x 32000 vocabulary, bf16. The peak memory on top of
    the inputs is well under the plain path's (whose float32 copies alone are 3 x 1 GB) and the values agree."""
    dev = torch.device("cuda")
    n, vocab, hidden = 8192, 32000, 1024
    g = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(n, hidden, device=dev, generator=g) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device=dev, generator=g) * hidden ** -0.5).bfloat16().requires_grad_()
    t = torch.randint(0, vocab, (n,), device=dev, generator=g)

    def peak(fn):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = fn()
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), torch.cuda.max_memory_allocated() - base, h.grad.clone(), w.grad.clone()

    plain = peak(lambda: F.cross_entropy((h @ w.t()).float(), t, reduction="sum"))
    logits = peak(lambda: ring_attn.cross_entropy_sum(h @ w.t(), t))
    linear = peak(lambda: ring_attn.linear_cross_entropy_sum(h, w, t, block_bytes=32 * 2**20))
    logits_bytes = n * vocab * 2
    assert logits[1] < 0.5 * plain[1], (logits[1], plain[1])
    # no logits-sized tensor at all: blocks of 32 MB, the float32 weight-gradient accumulator, the gradients
    assert linear[1] < logits_bytes, (linear[1], logits_bytes)
    for got in (logits, linear):
        assert abs(got[0].item() - plain[0].item()) <= 1e-3 * abs(plain[0].item())
        for a, b in zip(got[2:], plain[2:]):
            assert (a.float() - b.float()).abs().max().item() <= 2e-2 * max(1.0, b.float().abs().max().item())


def test_numpy_float32_options_are_taken_without_warnings():
    # np.float32 compared with float64's bounds warned "overflow encountered in cast"
    import warnings

    import numpy as np

    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ring_attn.linear_cross_entropy_sum(h, w, t, logit_scale=np.float32(0.5), softcap=np.float32(30.0))
    assert torch.equal(got, ring_attn.linear_cross_entropy_sum(h, w, t, logit_scale=0.5, softcap=30.0))
