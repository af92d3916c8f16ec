"""The attention benchmark's smoke mode runs end to end (so the GPU script cannot rot unnoticed)."""
import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_attention_smoke(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "benchmarks" / "bench_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert mod.main(["--device", "cpu", "--small", "--peers", "sdpa-math", "--passes", "fwd,fwd+bwd", "--plot"]) == 0
    assert (tmp_path / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((tmp_path / "attention.csv").open()))
    impls = {r["impl"] for r in rows}
    assert impls == {"ring_attn", "sdpa-math"}, impls
    assert len(rows) == 2 * 2 * 2  # 2 shapes x 2 impls x 2 passes
    assert all(float(r["ms"]) > 0 and r["torch"] and r["date"] for r in rows)
    assert "TFLOP/s" in capsys.readouterr().out
