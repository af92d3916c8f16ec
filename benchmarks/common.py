"""Shared helpers for the benchmark scripts: environment facts, timing, a readable table, CSV rows, PNG.

Every benchmark measures this package *and* its peers in the same process, and every CSV row carries the
GPU name and clocks (nvidia-ml-py when importable), library versions and the date, so numbers from different
runs can be told apart.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

# the --dtype choices of the benchmark scripts
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def environment() -> dict:
    """GPU name, SM clock, memory clock, driver, and torch/triton/transformers versions."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = "not installed"
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device() if torch.cuda.is_available() else 0)
        env["gpu"] = pynvml.nvmlDeviceGetName(handle)
        env["sm_clock_mhz"] = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
        env["mem_clock_mhz"] = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        env["max_sm_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
        env["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception as exc:  # no nvidia-ml-py or no NVIDIA driver: say so in the row
        env["gpu"] = env["device"]
        env["nvml"] = f"unavailable ({type(exc).__name__})"
    return env


def time_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench`` on CUDA; wall clock on CPU)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    import statistics
    import time

    fn()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Print ``rows`` as an aligned text table with the given columns."""
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def append_csv(path: str | os.PathLike, rows: Iterable[dict], env: dict) -> Path:
    """Append ``rows`` (each merged with ``env``) to the CSV at ``path``, writing a header for a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**env, **r} for r in rows]
    if not rows:
        return path
    fields = list(rows[0].keys())
    for r in rows[1:]:
        fields += [k for k in r if k not in fields]
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def out_dir(default: str = "bench_out") -> Path:
    """Where results go: ``$OUT`` when set (the GPU machine), else ``./bench_out``."""
    path = Path(os.environ.get("OUT") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path
