"""Spawn a gloo world once and collect what each rank saved: the harness shared by the *_workers modules.

Each workers module defines ``_worker(rank, world, init_file, outdir)``, which runs every case and saves its
results to ``outdir/rank{rank}.pt``; :func:`run_world` starts ``world`` such processes (spawn), waits with a
deadline (a hung rank fails the test instead of hanging it), kills only its own children, and loads the files.
"""
from __future__ import annotations

import os
import time

import torch


def run_world(worker, world: int, outdir: str, timeout_s: float) -> list[dict]:
    """Spawn ``world`` ranks running ``worker``; return each rank's results (index = rank)."""
    import torch.multiprocessing as mp

    os.makedirs(outdir, exist_ok=True)
    init_file = os.path.join(outdir, "store")
    ctx = mp.start_processes(worker, args=(world, init_file, outdir), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"world {world}: workers did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:  # only our own children, by handle
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
