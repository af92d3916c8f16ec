"""Backends behind one protocol: the capability table, selection (order, pinning, reasons), backend_info, the
warn-once GPU fallback, lazy imports, and the protocol functions of the triton and reference modules."""
import dataclasses
import inspect
import subprocess
import sys
import warnings

import pytest
import torch

import ring_attn
from ring_attn import backends, reference
from ring_attn.backends import protocol

PROTOCOL_FUNCTIONS = ("attention_forward", "attention_delta", "attention_backward", "rope")


@pytest.fixture
def no_native(monkeypatch):
    """Selection as on a machine without the native extension, whether or not it is built here."""
    monkeypatch.setattr(backends, "native_available", lambda: False)


def test_capability_table_covers_every_backend_and_op():
    assert backends.BACKENDS == ("triton", "native", "reference")
    assert set(backends.CAPABILITIES) == {(b, op) for b in backends.BACKENDS for op in backends.OPS}
    for (name, op), cap in backends.CAPABILITIES.items():
        assert isinstance(cap, backends.Capability)
        lo, hi, mult = cap.head_dim
        assert lo >= 1 and mult >= 1 and (hi is None or hi >= lo)
        assert set(cap.dtypes) <= {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    for name in ("triton", "reference"):  # sliding windows, softcap and any head dim 1..256
        assert backends.CAPABILITIES[(name, "attention")].window
        assert backends.CAPABILITIES[(name, "attention")].softcap
        assert backends.CAPABILITIES[(name, "attention")].head_dim == (1, 256, 1)
        assert backends.CAPABILITIES[(name, "rope")].fp64
    assert backends.CAPABILITIES[("triton", "attention")].devices == ("cuda", "cpu")
    assert backends.CAPABILITIES[("reference", "attention")].devices is None


def test_selection_order_and_pinning(monkeypatch, no_native):
    cpu = torch.device("cpu")
    assert backends.interpreter_enabled()  # conftest sets TRITON_INTERPRET=1 on CPU-only machines
    assert backends.select("attention", cpu, torch.float32, 64).NAME == "triton"
    with backends.force("reference"):
        mod = backends.select("attention", cpu, torch.float32, 64)
        assert mod.NAME == "reference" and mod is sys.modules["ring_attn.backends.reference"]
        with backends.force(None):
            assert backends.select("rope", cpu).NAME == "triton"
    monkeypatch.setenv("RING_ATTN_BACKEND", "reference")
    assert backends.select("rope", cpu, torch.float64, 8).NAME == "reference"
    assert backends.forced() == "reference"
    monkeypatch.setenv("RING_ATTN_BACKEND", "tpu")
    with pytest.raises(ValueError, match="RING_ATTN_BACKEND='tpu' is not a backend"):
        backends.select("attention", cpu)
    monkeypatch.delenv("RING_ATTN_BACKEND")
    with pytest.raises(ValueError, match="backend 'tpu' is not one of"):
        with backends.force("tpu"):
            pass
    with pytest.raises(ValueError, match="op 'matmul' is not one of"):
        backends.select("matmul", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends.select("attention", cpu, torch.float16, 64).NAME == "reference"


def test_pinned_backend_that_cannot_run_lists_its_reasons(no_native):
    with backends.force("native"):
        with pytest.raises(RuntimeError, match="native: the C.. extension ring_attn._C is not built"):
            backends.select("attention", "cpu", torch.float32, 64)


def test_not_supported_reasons_lists_every_unmet_requirement(monkeypatch):
    cap = backends.CAPABILITIES[("triton", "attention")]
    monkeypatch.setitem(backends.CAPABILITIES, ("triton", "attention"),
                        dataclasses.replace(cap, head_dim=(8, 256, 8), window=False, softcap=False))
    reasons = backends.not_supported_reasons("triton", "attention", "cpu", torch.float64, 12, varlen=True,
                                             merge=True, window=(16, 0), softcap=30.0)
    text = "\n".join(reasons)
    assert all(r.startswith("triton: ") for r in reasons)
    assert "dtype float64 is not supported for attention" in text
    assert "head dim 12 is not supported for attention (expected a multiple of 8 in [8, 256])" in text
    assert "window=(16, 0) is not supported" in text and "softcap=30.0 is not supported" in text
    assert len(reasons) == 4  # varlen and merge are supported
    monkeypatch.undo()
    assert backends.not_supported_reasons("triton", "attention", "cpu", torch.float32, 12, window=(16, 0),
                                          softcap=30.0) == []
    assert backends.not_supported_reasons("reference", "attention", "cuda", torch.float16, 64) == []
    assert backends.not_supported_reasons("reference", "rope", "cpu", torch.float64, 6) == []
    assert backends.not_supported_reasons("xla", "rope", "cpu") == [
        "unknown backend 'xla' (expected one of ('triton', 'native', 'reference'))"]
    assert any("device type 'cuda'" in r for r in backends.not_supported_reasons("native", "rope", "cuda"))


def test_no_backend_error_names_every_reason(no_native):
    with pytest.raises(RuntimeError) as exc:
        backends.select("attention", "cpu", torch.float64, 64)
    msg = str(exc.value)
    for name in backends.BACKENDS:
        assert f"{name}: " in msg
    assert "native: the C++ extension ring_attn._C is not built" in msg


def test_backend_info(monkeypatch, no_native):
    assert ring_attn.backend_info is backends.backend_info
    q = torch.randn(1, 4, 2, 64)
    info = ring_attn.backend_info(q)
    assert info["inputs"] == {"device": "cpu", "dtype": torch.float32, "head_dim": 64, "varlen": False}
    assert info["pinned"] is None
    for op in backends.OPS:
        assert info["ops"][op]["backend"] == "triton"
        rejected = info["ops"][op]["rejected"]
        assert set(rejected) == {"native", "reference"}
        assert rejected["native"] == ["native: the C++ extension ring_attn._C is not built"]
        assert "comes first" in rejected["reference"][0]
    assert ring_attn.backend_info(q[0])["inputs"]["varlen"] is True
    with backends.force("reference"):
        info = ring_attn.backend_info(device="cpu", dtype=torch.float16, head_dim=128)
        assert info["pinned"] == "reference" and info["ops"]["attention"]["backend"] == "reference"
        assert info["ops"]["attention"]["rejected"]["triton"] == ["triton: not the pinned backend ('reference')"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    info = ring_attn.backend_info(device="cpu", dtype=torch.float64, head_dim=64)
    assert info["ops"]["attention"]["backend"] is None  # fp64 attention: nobody
    assert info["ops"]["rope"]["backend"] == "reference"
    assert any("TRITON_INTERPRET=1" in r for r in info["ops"]["rope"]["rejected"]["triton"])
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        ring_attn.backend_info([1, 2])


def test_gpu_fallback_to_reference_warns_once(monkeypatch, no_native):
    monkeypatch.setattr(backends, "triton_available", lambda: False)
    monkeypatch.setattr(backends, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for op in ("attention", "rope", "attention"):
            assert backends.select(op, torch.device("cuda"), torch.float16, 64).NAME == "reference"
        backends.select("attention", "cpu", torch.float32, 64)  # a CPU fallback does not warn
    fallback = [w for w in caught if "falls back" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert "triton: the triton package is not importable" in str(fallback[0].message)
    monkeypatch.setattr(backends, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught, backends.force("reference"):
        warnings.simplefilter("always")
        backends.select("attention", torch.device("cuda"))  # pinned on purpose: no warning
    assert not [w for w in caught if "falls back" in str(w.message)]


def test_backend_modules_are_imported_only_when_chosen():
    code = (
        "import sys, torch, ring_attn\n"
        "from ring_attn import backends\n"
        "assert not [m for m in sys.modules if m.startswith('ring_attn.backends.')], sorted(sys.modules)\n"
        "with backends.force('reference'):\n"
        "    ring_attn.flash_attn_func(*(torch.randn(1, 8, 1, 16) for _ in range(3)))\n"
        "assert 'ring_attn.backends.reference' in sys.modules\n"
        "assert 'ring_attn.backends.triton' not in sys.modules\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-2000:]


@pytest.mark.parametrize("name", ["triton", "reference"])
def test_backend_modules_implement_the_protocol(name):
    mod = __import__(f"ring_attn.backends.{name}", fromlist=["NAME"])
    assert mod.NAME == name
    for fn in PROTOCOL_FUNCTIONS:
        want = inspect.signature(getattr(protocol.Backend, fn))
        got = inspect.signature(getattr(mod, fn))
        want_params = [(p.name, p.kind) for p in want.parameters.values() if p.name != "self"]
        assert [(p.name, p.kind) for p in got.parameters.values()] == want_params, fn
    q = torch.randn(1, 4, 1, 16)
    out, lse = torch.empty_like(q), torch.empty(1, 1, 4)
    common = dict(softmax_scale=0.25, causal=False, causal_offset=None, seqs=None, merge=False)
    for window, softcap in (((2, 0), 0.0), ((-1, -1), 5.0)):  # the protocol's window and softcap are honoured
        mod.attention_forward(q, q, q, out, lse, window=window, softcap=softcap, **common)
        o, l = reference.attention(q.double(), q.double(), q.double(), 0.25, window=window, softcap=softcap)
        torch.testing.assert_close(out.double(), o, rtol=0, atol=1e-5)
        torch.testing.assert_close(lse.double(), l, rtol=0, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_reference_backend_rope_against_the_oracle(interleaved):
    """The reference module's protocol ``rope`` (angle mode with partial rotary, table mode), forward and
    backward, against the float64 oracle; gradients of the table mode by gradcheck."""
    from ring_attn.backends import reference as ref_backend

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, 3, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 5, 1, 16, generator=g, dtype=torch.float64)
    pos = torch.tensor([[0, 3, 9, 100, 7]] * 2)
    inv = 1.0 / 10000 ** (torch.arange(0, 12, 2, dtype=torch.float64) / 12)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    none = dict(cos3=None, sin3=None, qy4=None, ky4=None, dtheta=None)
    ref_backend.rope(q, k, qo, ko, rotary_dim=12, interleaved=interleaved, backward=False, copy_pass=True,
                     pos2=pos, inv_freq=inv, scaling=0.7, **none)
    wq, wk = reference.rope(q, k, pos, inv, 0.7, interleaved, 12)
    torch.testing.assert_close(qo, wq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ko, wk, rtol=1e-12, atol=1e-12)
    # backward is the transpose: rotating back recovers the input
    bq, bk = torch.empty_like(q), torch.empty_like(k)
    ref_backend.rope(qo, ko, bq, bk, rotary_dim=12, interleaved=interleaved, backward=True, copy_pass=True,
                     pos2=pos, inv_freq=inv, scaling=1 / 0.7, **none)
    torch.testing.assert_close(bq, q, rtol=1e-12, atol=1e-12)
    if not interleaved:  # table mode (HF layout, half-split only)
        cos, sin = reference.rope_table(pos, inv.float(), 0.7, torch.float64)
        qt = q.transpose(1, 2).detach().requires_grad_()  # HF's [b, h, s, d]
        kt = k.transpose(1, 2).detach().requires_grad_()
        with backends.force("reference"):
            got = ring_attn.apply_rope_cos_sin(qt, kt, cos, sin)
            assert torch.autograd.gradcheck(lambda a, b: ring_attn.apply_rope_cos_sin(a, b, cos, sin), (qt, kt))
        want = reference.rope_cos_sin(qt, kt, cos, sin, compute_dtype=torch.float64)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("var,value", [("RING_ATTN_BWD", "fusedd"), ("RING_ATTN_FWD", "tmaa"),
                                       ("RING_ATTN_AUTOTUNE", "yes")])
def test_misspelt_kernel_switches_raise_on_every_backend(var, value, monkeypatch):
    """The switches select Triton kernels, but a misspelt value is an error whichever backend runs the call (the
    CPU backends used to ignore it silently, so the typo surfaced only on a GPU)."""
    q = torch.randn(1, 4, 2, 8)
    monkeypatch.setenv(var, value)
    for name in ("native", "reference"):
        with backends.force(name), pytest.raises(ValueError, match=f"{var}='{value}'"):
            ring_attn.flash_attn_func(q, q, q, causal=True)


def test_a_bad_tile_file_is_refused_on_every_backend(tmp_path, monkeypatch):
    """RING_ATTN_TILES is read where the call's arguments are checked (in the ring: before any collective),
    whichever backend runs it, when Triton is installed."""
    pytest.importorskip("triton")
    q = torch.randn(1, 4, 2, 8)
    path = tmp_path / "tiles.json"
    path.write_text("[1]")
    monkeypatch.setenv("RING_ATTN_TILES", str(path))
    for name in ("native", "reference"):
        with backends.force(name), pytest.raises(ValueError, match="RING_ATTN_TILES=.*record 0: expected a JSON"):
            ring_attn.flash_attn_func(q, q, q, causal=True)


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (this machine may have no GPU): what the device guard reads."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_triton_launches_run_on_the_tensors_device(monkeypatch):
    """Triton launches on the current device: each protocol function of the triton backend makes its first tensor
    argument's GPU current for the call (a model spread over GPUs, e.g. device_map="auto", calls on cuda:1 from a
    process whose current device is cuda:0), and leaves CPU tensors and calls already on that device alone."""
    pytest.importorskip("triton")
    import ring_attn.backends.triton as tb

    entered, seen = [], []

    class Guard:
        def __init__(self, device):
            entered.append(torch.device(device).index)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    current = {"index": 0}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "device", Guard)
    fn = tb.on_tensor_device(lambda *a, **k: seen.append((len(entered), k.get("tag"))) or "result")
    x = torch.zeros(2).as_subclass(_OnCuda1)
    assert fn(None, x, tag="a") == "result" and entered == [1] and seen == [(1, "a")]  # first *tensor* argument
    current["index"] = 1
    fn(x, tag="b")  # already current: no switch
    fn(torch.zeros(2), tag="c")  # CPU: no switch
    assert entered == [1] and seen[1:] == [(1, "b"), (1, "c")]
    for name in PROTOCOL_FUNCTIONS:  # every entry point the dispatcher calls goes through the guard
        assert getattr(tb, name).__wrapped__ is getattr(tb.attention if name != "rope" else
                                                        sys.modules["ring_attn.backends.triton.rope"], name)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_flash_attn_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 300, 4, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    want = ring_attn.flash_attn_func(*(t.cuda(0) for t in (q, k, v)), causal=True)
    qs, ks, vs = (t.cuda(1).requires_grad_() for t in (q, k, v))
    got = ring_attn.flash_attn_func(qs, ks, vs, causal=True)
    got.float().sum().backward()
    assert torch.cuda.current_device() == 0
    if torch.cuda.get_device_capability(0) == torch.cuda.get_device_capability(1):  # same tiles: same bits
        assert torch.equal(got.cpu(), want.cpu())
    else:
        torch.testing.assert_close(got.cpu().float(), want.cpu().float(), atol=2e-2, rtol=2e-2)
    assert all(t.grad is not None and t.grad.device.index == 1 for t in (qs, ks, vs))
