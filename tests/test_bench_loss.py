"""benchmarks/bench_loss.py --quick: every implementation runs, agrees with torch's loss, and writes a CSV row."""
import csv
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_loss  # noqa: E402


def test_quick_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench_loss.main(["--quick", "--device", "cpu", "--rep", "1", "--skip", "compile"]) == 0
    out = capsys.readouterr().out
    assert "skipped compile: --skip" in out
    with open(tmp_path / "bench_loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["impl"] for r in rows][:3] == ["torch", "ring_attn_logits", "ring_attn_linear"]
    assert all(float(r["ms"]) > 0 and float(r["loss_rel_diff"]) < 1e-5 for r in rows)


def test_bad_tokens():
    with pytest.raises(SystemExit) as e:
        bench_loss.parse_args(["--tokens", "0"])
    assert e.value.code == 2
