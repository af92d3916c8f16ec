"""The host-overhead benchmark runs on CPU with ring_attn's launches stubbed (so the GPU stage cannot rot), writes
its CSV, and puts the launcher back afterwards."""
import csv
import os
import sys

import torch

import ring_attn
from ring_attn.backends.triton import attention as launcher

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_overhead as mod  # noqa: E402


def test_bench_overhead_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    kernel = launcher.fwd_autotuned_kernel
    rows = mod.main(["--device", "cpu", "--calls", "5"])
    assert {(r["case"].split()[0], r["impl"]) for r in rows} >= {("fwd", "ring_attn"), ("fwd+bwd", "sdpa"),
                                                                 ("decode", "ring_attn")}
    assert all(r["us_per_call"] > 0 for r in rows)
    saved = list(csv.DictReader((tmp_path / "bench_overhead.csv").open()))
    assert len(saved) == len(rows)
    assert launcher.fwd_autotuned_kernel is kernel  # the stubs are gone: kernels run again
    q = torch.randn(1, 5, 2, 16)
    assert ring_attn.flash_attn_func(q, q, q).abs().sum() > 0
