"""The decoding benchmark's smoke mode runs end to end on CPU (so the GPU stage cannot rot unnoticed): every
implementation that runs here is timed, checked against the float32 reference and written to the CSV."""
import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_decode_smoke(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "benchmarks" / "bench_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("OUT", str(tmp_path))
    rows = mod.main(["--device", "cpu", "--small", "--rep", "1"])
    assert {r["impl"] for r in rows} >= {"ring_attn", "ring_attn_nosplit", "sdpa", "ring_attn_paged16"}
    assert all(r["us"] > 0 and r["max_err"] < 1e-5 for r in rows)
    saved = list(csv.DictReader((tmp_path / "bench_decode.csv").open()))
    assert len(saved) == len(rows) and all(r["torch"] and r["date"] for r in saved)
