"""scripts/gpu_check.sh's plumbing, on this machine: its ``selftest`` group runs a test file in two pytest shards
(``RING_ATTN_TEST_SHARD``) and a plain stage, and packs every log into the one archive that the GPU machine
sends back (it returns at most 8 files). The GPU stages themselves need a GPU."""
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(tmp_path, *args, **env):
    full = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_RAW=str(tmp_path / "raw"), **env)
    full.pop("RING_ATTN_TEST_SHARD", None)
    return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=300)


def _passed(log: str) -> int:
    m = re.search(r"(\d+) passed", log)
    return int(m.group(1)) if m else 0


def test_selftest_shards_and_bundles(tmp_path):
    res = _run(tmp_path, "selftest")
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_selftest.tgz", "summary_selftest.txt"]
    summary = (out / "summary_selftest.txt").read_text()
    assert "=== selftest_shards: exit 0" in summary and "=== selftest_plain: exit 0" in summary
    with tarfile.open(out / "gpu_check_selftest.tgz") as tar:
        names = {os.path.normpath(n) for n in tar.getnames()}
        logs = {n: tar.extractfile(n).read().decode() for n in tar.getnames() if n.endswith(".log")}
    assert {"environment.txt", "selftest_shards.0.log", "selftest_shards.1.log", "selftest_plain.log"} <= names
    shard_logs = [v for k, v in logs.items() if "selftest_shards." in k]
    # the two shards split the file's tests between them: each runs some, together all of them
    whole = subprocess.run(["python", "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                            "tests/test_package.py"], cwd=ROOT, capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "RING_ATTN_TEST_SHARD"})
    total = int(re.search(r"(\d+) tests? collected", whole.stdout).group(1))
    counts = [_passed(v) for v in shard_logs]
    assert all(c > 0 for c in counts) and sum(counts) == total, (counts, total)
    assert "plain stage ran" in next(v for k, v in logs.items() if "selftest_plain" in k)


def test_failing_stage_is_reported_and_fails_the_script(tmp_path):
    # no test matches: pytest exits 5 in both shards, the stage fails, the script says so and exits 1
    res = _run(tmp_path, "selftest", PYTEST_ADDOPTS="-k no_test_has_this_name")
    assert res.returncode == 1
    assert "FAILED stages: selftest_shards(5)" in res.stdout
    assert "=== selftest_shards: exit 5" in (tmp_path / "out" / "summary_selftest.txt").read_text()
    assert (tmp_path / "out" / "gpu_check_selftest.tgz").is_file()


def test_unknown_group_is_refused(tmp_path):
    res = _run(tmp_path, "benchmarks")
    assert res.returncode == 2
    assert "unknown stage group 'benchmarks'" in res.stderr


@pytest.mark.parametrize("value", ["2/2", "x", "1/0", "-1/3"])
def test_bad_shard_value_is_a_usage_error(value):
    res = subprocess.run(["python", "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                          "tests/test_package.py"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, RING_ATTN_TEST_SHARD=value))
    assert res.returncode != 0
    assert f"RING_ATTN_TEST_SHARD={value!r}" in res.stdout + res.stderr
