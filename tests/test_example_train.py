"""examples/train_long_context.py at a tiny size: 2 ranks under torchrun, and resume == uninterrupted."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_long_context.py")


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               RING_ATTN_BACKEND="reference")
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(args, timeout=120):
    p = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def _final_loss(out):
    m = re.search(r"final loss (\S+)$", out.strip().splitlines()[-1])
    assert m, out
    return float(m.group(1))


def test_two_ranks_under_torchrun(tmp_path):
    p = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              SCRIPT, "--stages", "16,48", "--steps", "2", "--ckpt", str(tmp_path)])
    assert "stage 1 (48 tok, default" in p.stderr  # second stage has its own (NTK) theta; progress on stderr
    loss = _final_loss(p.stdout)
    assert 3.0 < loss < 8.0  # ~ln(256) for a random model
    assert os.path.exists(tmp_path / "latest.pt")


def test_resume_equals_uninterrupted(tmp_path):
    common = [sys.executable, SCRIPT, "--stages", "16,32", "--steps", "2", "--rope", "yarn"]
    whole = _final_loss(_run(common + ["--ckpt", str(tmp_path / "a")]).stdout)
    first = _run(common + ["--ckpt", str(tmp_path / "b"), "--max-steps-this-run", "3"])
    assert "stopped after 3 steps (stage 1, step 1)" in first.stdout
    second = _run(common + ["--ckpt", str(tmp_path / "b"), "--resume"])
    assert "resumed from" in second.stdout and "1 steps in this run" in second.stdout
    assert _final_loss(second.stdout) == whole


def test_resume_at_a_stage_without_its_own_rope(tmp_path):
    """Stage 1 (32 tokens, within the model's trained 32) has no RoPE of its own: it trains with the model's, in an
    uninterrupted run as in a resumed one (the uninterrupted run kept stage 0's NTK theta, the resumed one the
    model's: different losses; found by a randomized training run)."""
    common = [sys.executable, SCRIPT, "--stages", "64,32", "--steps", "2"]
    whole = _run(common + ["--ckpt", str(tmp_path / "a")])
    assert "stage 0 (64 tok, default" in whole.stderr and "θ=1e+04" not in whole.stderr.split("stage 1")[0]
    assert "stage 1 (32 tok, default θ=1e+04)" in whole.stderr
    _run(common + ["--ckpt", str(tmp_path / "b"), "--max-steps-this-run", "2"])
    second = _run(common + ["--ckpt", str(tmp_path / "b"), "--resume"])
    assert "stage 1 (32 tok, default θ=1e+04)" in second.stderr
    assert _final_loss(second.stdout) == _final_loss(whole.stdout)


def test_argument_errors():
    p = subprocess.run([sys.executable, SCRIPT, "--resume"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert p.returncode == 2 and "--resume needs --ckpt" in p.stderr


@pytest.mark.parametrize("argv,needle", [
    (["--stages", "abc"], "--stages: expected comma-separated sequence lengths"),
    (["--stages", "0"], "--stages: expected sequence lengths >= 2"),
    (["--plan", "/nonexistent/plan.json"], "--plan: '/nonexistent/plan.json' is not a readable"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_bad_flags_are_one_line_usage_errors(argv, needle):
    """Each used to pass argparse and end in a traceback (on every rank under torchrun)."""
    p = subprocess.run([sys.executable, SCRIPT, *argv], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
