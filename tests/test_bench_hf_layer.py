"""benchmarks/bench_hf_layer.py --quick: the patched, sdpa and eager layers all run and a CSV row each is written."""
import csv
import os
import sys

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_hf_layer  # noqa: E402


def test_quick_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench_hf_layer.main(["--quick", "--seqlen", "16", "--rep", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ring_attn" in out and "sdpa" in out and "eager" in out
    with open(tmp_path / "bench_hf_layer.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["impl"] for r in rows] == ["ring_attn", "sdpa", "eager"]
    assert all(float(r["ms"]) > 0 for r in rows)


def test_compiled_smoke(tmp_path, monkeypatch, capsys):
    """--compile: the patched and sdpa layers are timed under torch.compile (aot_eager here: no C++ build)."""
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench_hf_layer.main(["--quick", "--seqlen", "16", "--rep", "1", "--device", "cpu", "--skip", "eager",
                                "--compile", "aot_eager"]) == 0
    with open(tmp_path / "bench_hf_layer.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["impl"], r["compiled"]) for r in rows] == [("ring_attn", "aot_eager"), ("sdpa", "aot_eager")]
    assert all(float(r["ms"]) > 0 for r in rows)


def test_bad_seqlen():
    with pytest.raises(SystemExit) as e:
        bench_hf_layer.parse_args(["--seqlen", "0"])
    assert e.value.code == 2
