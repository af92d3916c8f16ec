"""The ring benchmark's CPU smoke mode runs end to end (so the script cannot rot without a GPU)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_ring_smoke_mode(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(ROOT), RING_ATTN_BACKEND="reference")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ring.py"), "--device", "cpu",
                           "--small", "--s-local", "32", "64"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "efficiency" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "bench_ring.csv").open()))
    assert [(r["s_local"], r["passes"]) for r in rows] == [("32", "fwd"), ("32", "fwd+bwd"), ("64", "fwd"),
                                                           ("64", "fwd+bwd")]
    for r in rows:
        assert float(r["ring_ms"]) > 0 and float(r["single_ms"]) > 0 and float(r["efficiency"]) > 0
        assert 0 < float(r["model_eff_nvlink_w8"]) <= 1 and int(r["min_s_local_ib"]) >= 1
        assert r["world"] == "1" and r["torch"]
