"""The console script checks every flag in the parent process: a bad one is a one-line argparse error with exit
status 2 (no traceback, nothing spawned); the demo prints its configuration at once and a line per phase."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ring_attn import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = ["rope-plan", "--head-dim", "128", "--theta", "5e5", "--trained", "8192", "--target", "262144"]


def _one_line_error(argv, capsys, *pieces):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"ring-attn {argv[0]}: error: "), lines[0]
    assert "Traceback" not in captured.err
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


@pytest.mark.parametrize("flags,pieces", [
    (["--world-size", "0"], ["--world-size 0", ">= 1"]),
    (["--world-size", "-1"], ["--world-size -1", ">= 1"]),
    (["-n", "0"], ["--world-size 0", ">= 1"]),
    (["--seqlen", "0"], ["--seqlen 0", ">= 1"]),
    (["--seqlen", "-5"], ["--seqlen -5", ">= 1"]),
    (["--batch", "0"], ["--batch 0", ">= 1"]),
    (["--heads", "0"], ["--heads 0", ">= 1"]),
    (["--kv-heads", "0"], ["--kv-heads 0", ">= 1"]),
    (["--iters", "0"], ["--iters 0", ">= 1"]),
    (["--head-dim", "0"], ["--head-dim 0", "[1, 256]"]),
    (["--head-dim", "512"], ["--head-dim 512", "[1, 256]"]),
    (["--heads", "3", "--kv-heads", "2"], ["--heads 3 --kv-heads 2", "multiple"]),
    (["--world-size", "two"], ["--world-size", "invalid int value: 'two'"]),
    (["--layout", "spiral"], ["--layout", "invalid choice"]),
    (["--dtype", "float64"], ["--dtype", "invalid choice"]),
    # a randomized CLI run spawned 300 gloo ranks for --world-size 100000 (orphaned when it was killed)
    (["--world-size", "100000", "--seqlen", "16", "--device", "cpu"], ["--world-size 100000", "at most 64"]),
    (["-n", "5", "-s", "4"], ["--world-size 5 --seqlen 4", "at least one token per rank"]),
    (["-n", "2", "-s", "99999999999", "--device", "cpu"], ["--seqlen 99999999999", "GiB", "this machine's"]),
])
def test_demo_bad_arguments(flags, pieces, capsys):
    _one_line_error(["demo", *flags], capsys, *pieces)


def test_demo_refusals_of_the_attention_op_are_reported_up_front(capsys, monkeypatch):
    """Whatever the attention op refuses stops in the parent, as a one-line error naming the flags."""
    import ring_attn

    def refuse(*args, **kwargs):
        raise NotImplementedError("head_dim 24 is not supported by this build")

    monkeypatch.setattr(ring_attn, "flash_attn_func", refuse)
    monkeypatch.setenv("RING_ATTN_BACKEND", "triton")
    _one_line_error(["demo", "--head-dim", "24"], capsys, "--head-dim 24", "the attention op refuses them",
                    "head_dim 24 is not supported by this build")
    assert os.environ["RING_ATTN_BACKEND"] == "triton"  # the trial call restores the environment


def test_demo_cuda_without_gpu(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    _one_line_error(["demo", "--device", "cuda"], capsys, "--device cuda", "no CUDA device")


@pytest.mark.parametrize("flags,pieces", [
    (["--theta", "0"], ["--theta 0.0", "> 1"]),
    (["--theta", "-3"], ["--theta -3.0", "> 1"]),
    (["--theta", "nan"], ["--theta nan", "finite"]),
    (["--trained", "0"], ["--trained 0", "2pi"]),
    (["--target", "0"], ["--target 0", "> 2pi"]),
    (["--head-dim", "0"], ["--head-dim 0"]),
    (["--head-dim", "7"], ["--head-dim 7", "even"]),
    (["--partial-rotary-factor", "0"], ["--partial-rotary-factor 0.0", "(0, 1]"]),
    (["--partial-rotary-factor", "1.5"], ["--partial-rotary-factor 1.5", "(0, 1]"]),
    (["--beta-fast", "1", "--beta-slow", "32"], ["--beta-fast 1.0 --beta-slow 32.0", "beta_fast >= beta_slow > 0"]),
    (["--beta-slow", "0"], ["--beta-slow 0.0", "beta_fast >= beta_slow > 0"]),
    (["--plot", "/nonexistent/x.png"], ["--plot /nonexistent/x.png", "does not exist"]),
    (["--theta", "abc"], ["--theta", "invalid float value: 'abc'"]),
    (["--rope-type", "nope"], ["--rope-type", "invalid choice"]),
    # past the plan's range (they raised OverflowError / "int too big" tracebacks, or ran for minutes)
    (["--theta", "1e300"], ["--theta 1e+300", "overflow a float64"]),
    (["--target", "99999999999999999999999"], ["--target 99999999999999999999999", "<= 2^29"]),
    (["--trained", "1073741824"], ["--trained 1073741824", "<= 2^29"]),
    (["--head-dim", "1000000000"], ["--head-dim 1000000000", "from 4 to 1024"]),
    (["--plot", ""], ["--plot ''", "expected a file name"]),  # exited 0 and wrote nothing
])
def test_rope_plan_bad_arguments(flags, pieces, capsys):
    argv = list(PLAN)
    for i in range(0, len(flags), 2):  # a flag given twice: argparse keeps the last, so append overrides
        argv += flags[i:i + 2]
    _one_line_error(argv, capsys, *pieces)


def test_rope_plan_plot_path_checked_up_front(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    _one_line_error(PLAN + ["--plot", str(tmp_path)], capsys, "is a directory")
    _one_line_error(PLAN + ["--plot", str(tmp_path / "x.nosuchformat")], capsys, "cannot write .nosuchformat")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions: make the check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if os.path.realpath(path) ==
                            os.path.realpath(locked) else real_access(path, mode, *a, **k))
    _one_line_error(PLAN + ["--plot", str(locked / "x.png")], capsys, "not writable")


def test_rope_plan_plot_without_matplotlib_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    _one_line_error(PLAN + ["--plot", str(tmp_path / "x.png")], capsys, "needs matplotlib", "ring-attn[bench]")


def test_no_traceback_through_the_console_script():
    """The installed entry point, run as a user would: exit 2, one stderr line."""
    for argv in (["demo", "--world-size", "0"], PLAN[:4] + ["0"] + PLAN[5:]):
        proc = subprocess.run([sys.executable, "-m", "ring_attn", *argv], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def _session_cpu_seconds(sid: int):
    """CPU seconds used so far by the processes of session ``sid`` (the demo, its ranks, multiprocessing's
    resource tracker; ranks that exited count through their parent's cutime/cstime), from /proc; None where
    there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    ticks = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": comm may hold spaces
        except OSError:  # exited meanwhile
            continue
        if int(fields[3]) == sid:  # field 6, session
            ticks += sum(int(x) for x in fields[11:15])  # fields 14-17: utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _run_watched(cmd, stall_s: float, cap_s: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session and return what it printed; fail the test when it hangs: no CPU time
    used by any process of the session for ``stall_s`` seconds (processes blocked on each other), or ``cap_s``
    seconds in all (the only limit where there is no /proc). Then the whole session is killed and the failure
    shows everything the command printed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "0"})
    poll = min(5.0, stall_s / 2, cap_s / 2)
    start = last_progress = time.monotonic()
    cpu = None
    while True:
        try:
            out, err = proc.communicate(timeout=poll)  # retrying after TimeoutExpired loses no output
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            now, used = time.monotonic(), _session_cpu_seconds(proc.pid)
            if used is not None and (cpu is None or used > cpu):
                cpu, last_progress = used, now
            stalled = used is not None and now - last_progress > stall_s
            if stalled or now - start > cap_s:
                break
    os.killpg(proc.pid, signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # a process that left the session still holds the pipes
        out, err = "(not available: a process outside the session keeps the output pipes open)", ""
    why = f"no CPU used by any of its processes for {stall_s:g} s" if stalled else f"still running after {cap_s:g} s"
    pytest.fail(f"{' '.join(cmd[1:])} hung ({why}; load average {os.getloadavg()}); killed its session. It "
                f"printed:\n{out}\n--- stderr ---\n{err}")


def _run_demo(argv) -> subprocess.CompletedProcess:
    """``ring-attn demo`` with ``argv``, watched for hangs (:func:`_run_watched`), not timed.

    Wall time is no measure of a hang here: the run is almost all start-up (three interpreters importing
    torch; each rank also imports the torch._dynamo/sympy stack on entering its first dispatch mode), so it
    takes 6-9 s on an idle 2-core machine and 43-77 s at load 10-12, in proportion to the load. The fixed 300 s
    limit this test had (subprocess.run's timeout) is a load threshold, not a hang detector: its one recorded
    failure, under heavy load, came without output, which is what its TimeoutExpired gives (it keeps none),
    and it left both ranks and the resource tracker running, loading the machine further. A hang (ranks
    blocked on each other, no CPU used) still fails, within 2 minutes, showing the phase it stopped in."""
    return _run_watched([sys.executable, "-u", "-m", "ring_attn", "demo", *argv], stall_s=120.0, cap_s=900.0)


def _ends_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` is gone, or a zombie until its (new) parent reaps it, within ``seconds`` (/proc)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_a_hang_fails_with_its_output_and_leaves_no_process():
    """The watchdog itself: a command whose processes all sleep fails (with what it printed) once no CPU was used
    for stall_s, and its child is killed with it; a command that spins fails at the cap."""
    if _session_cpu_seconds(os.getpid()) is None:
        pytest.skip("no /proc: only the cap applies")
    sleeper = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
               "time.sleep(600)']); print('child', c.pid, flush=True); time.sleep(600)")
    with pytest.raises(pytest.fail.Exception, match="no CPU used by any of its processes for 2 s") as info:
        _run_watched([sys.executable, "-c", sleeper], stall_s=2, cap_s=120)
    child = int(re.search(r"child (\d+)", str(info.value)).group(1))
    if not _ends_within(child, 5.0):
        pytest.fail(f"process {child} of the hung command is still running")
    with pytest.raises(pytest.fail.Exception, match="still running after 3 s"):
        _run_watched([sys.executable, "-c", "while True: pass"], stall_s=60, cap_s=3)


def test_spawned_ranks_die_with_the_demo_process():
    """A rank process exits when the demo process is killed (prctl PR_SET_PDEATHSIG), instead of running on as an
    orphan: a child that called demo._die_with_parent outlives its SIGKILLed parent by well under 5 s."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    parent = ("import os, subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
              "'import os, time; from ring_attn.ring import demo; demo._die_with_parent(os.getppid()); "
              "print(\"armed\", flush=True); time.sleep(600)']); print('child', c.pid, flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline().split()[1])
        assert proc.stdout.readline().strip() == "armed"  # the child shares the pipe
    finally:
        proc.kill()
        proc.wait()
    if not _ends_within(child, 5.0):
        os.kill(child, 9)
        pytest.fail(f"rank-like child {child} outlived the killed parent")


def test_ctrl_c_stops_the_demo_and_its_ranks():
    """Ctrl-C (SIGINT to the whole process group) mid-run: one line on stderr, status 130, no rank left; it used to
    print a KeyboardInterrupt traceback per process, and the ranks ran on for 20-30 s."""
    if not sys.platform.startswith("linux"):
        pytest.skip("process groups and /proc: Linux only")
    proc = subprocess.Popen([sys.executable, "-m", "ring_attn", "demo", "-n", "2", "-s", "131072", "--no-check"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True,  # its own group, as a terminal gives a job; SIGINT not ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:  # wait until the ranks compute (the progress lines)
            if "ring forward+backward:" in line:
                break
        ranks = [int(p) for p in subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True,
                                                text=True).stdout.split() if int(p) != proc.pid]
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "ring-attn demo: interrupted; the rank processes were stopped", err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert ranks and all(_ends_within(r, 10.0) for r in ranks), ranks


def test_demo_prints_configuration_and_progress():
    """A 2-rank gloo run: the configuration comes first, then one timed line per phase (on stderr), then PASS."""
    proc = _run_demo(["-n", "2", "-s", "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "16"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("ring-attn demo: 2 gloo rank(s) on CPU, causal zigzag, batch 1 x 64 tokens"), lines[0]
    assert not any(re.match(r"\[\s*\d+\.\d s\] ", line) for line in lines)  # progress goes to stderr
    progress = [line for line in proc.stderr.splitlines() if re.match(r"\[\s*\d+\.\d s\] ", line)]
    phases = ["spawning 2 rank process(es)", "process group up", "ring forward+backward: 1 timed",
              "ring forward+backward done", "single-device check: flash_attn_func", "single-device check done"]
    assert len(progress) == len(phases), progress
    for line, phase in zip(progress, phases):
        assert phase in line, (phase, line)
    elapsed = [float(re.match(r"\[\s*(\d+\.\d) s\]", line).group(1)) for line in progress]
    assert elapsed == sorted(elapsed)
    assert any("-> PASS" in line for line in lines)


def test_a_closed_stdout_is_not_a_traceback():
    """``ring-attn rope-plan ... | head -1``: the reader leaves before the plan is written; the command ends with
    status 1 and nothing on stderr (it used to print a BrokenPipeError traceback)."""
    read, write = os.pipe()
    os.close(read)  # every write to the pipe fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "ring_attn", *PLAN], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120, cwd=ROOT)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 1


def test_demo_under_a_launcher_refuses_another_world_size(capsys, monkeypatch):
    """Under torchrun the job's WORLD_SIZE decides; a different --world-size was silently ignored."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _one_line_error(["demo", "-n", "3", "-s", "64"], capsys, "--world-size 3", "WORLD_SIZE=2")


def test_demo_per_rank_count_includes_the_layout_padding():
    from ring_attn.ring import demo

    assert demo._per_rank(1000, 3, "zigzag") == "334 per rank, padded to 1002"  # was "333 per rank"
    assert demo._per_rank(64, 2, "zigzag") == "32 per rank"


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    # a KeyboardInterrupt inside a subcommand printed a traceback (kld, rope-plan); the demo already did this
    from ring_attn import rope_plan

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(rope_plan, "run", interrupted)
    assert cli.main(PLAN) == 130
    captured = capsys.readouterr()
    assert captured.err == "ring-attn rope-plan: interrupted\n" and captured.out == ""
