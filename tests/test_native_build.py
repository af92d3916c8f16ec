"""Building and loading the native extension: the no-compiler install path, the runtime fallback, the benchmark.

* ``setup.py build_ext`` with no usable C++ compiler (``CXX=/nonexistent``) still exits 0 and says why the
  extension was not built (into a temporary build dir: the source tree is not touched).
* With ``ring_attn._C`` hidden, CPU ops select the reference backend and warn once, naming the import error.
* ``benchmarks/bench_cpu.py --quick`` runs end to end (the CPU benchmark cannot rot unnoticed).
"""
import csv
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import ring_attn
import ring_attn.backends as backends

ROOT = Path(__file__).resolve().parents[1]
NATIVE_BUILT_HERE = importlib.util.find_spec("ring_attn._C") is not None


def test_install_without_a_compiler_succeeds_and_says_why(tmp_path):
    env = dict(os.environ, CXX="/nonexistent/c++", CC="/nonexistent/cc")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ring_attn._C was NOT built" in proc.stderr, proc.stderr
    assert "C++17 compiler" in proc.stderr
    assert not list((tmp_path / "lib").rglob("_C*.so"))


def test_skip_switch(tmp_path):
    env = dict(os.environ, RING_ATTN_NO_NATIVE="1")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "RING_ATTN_NO_NATIVE is set" in proc.stderr


def test_missing_extension_falls_back_to_reference_and_warns_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "ring_attn._C", None)  # `import ring_attn._C` now raises ImportError
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backends, "_warned_native", False)
    backends._native_import_error.cache_clear()
    try:
        with backends.force(None):
            assert not backends.native_available()
            with pytest.warns(RuntimeWarning, match=r"ring_attn\._C is not available \((ModuleNotFound|Import)Error"):
                assert backends.select("attention", "cpu", torch.float32, 64).NAME == "reference"
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the second selection is silent
                assert backends.select("rope", "cpu", torch.float32, 64).NAME == "reference"
            q = torch.randn(1, 9, 2, 16)
            out = ring_attn.flash_attn_func(q, q, q, causal=True)  # the ops still work, on the reference
            assert out.shape == q.shape
            reasons = backends.backend_info(q)["ops"]["attention"]["rejected"]["native"]
            assert reasons == ["native: the C++ extension ring_attn._C is not built"]
    finally:
        backends._native_import_error.cache_clear()


def test_stale_extension_is_reported_not_called(monkeypatch):
    """An extension built from older sources (another ABI_VERSION) counts as unavailable, naming why."""
    import types

    monkeypatch.setitem(sys.modules, "ring_attn._C", types.SimpleNamespace(ABI_VERSION=1))
    backends._native_import_error.cache_clear()
    try:
        assert not backends.native_available()
        assert "ABI_VERSION 1, expected" in backends._native_import_error()
        assert "rebuild" in backends._native_import_error()
    finally:
        backends._native_import_error.cache_clear()
    monkeypatch.undo()
    if NATIVE_BUILT_HERE:
        assert backends.native_available()


def test_bench_cpu_quick(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / "benchmarks" / "bench_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("OUT", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--quick", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader((tmp_path / "bench_cpu.csv").open()))
    impls = {r["impl"] for r in rows}
    assert {"torch sdpa enable_gqa", "torch sdpa repeated kv", "ring_attn reference"} <= impls
    if backends.native_available():
        assert {"ring_attn native", "ring_attn apply_rope native"} <= impls
    assert all(float(r["seconds"]) > 0 and r["date"] for r in rows)
    assert "vs_best_peer" in capsys.readouterr().out
