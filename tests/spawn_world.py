"""Spawn a gloo world once and collect what each rank saved: the harness shared by the *_workers modules.

Each workers module defines ``_worker(rank, world, init_file, outdir)``, which runs every case inside
:func:`worker_group` (it joins the group, and saves the results dict to ``outdir/rank{rank}.pt`` at the end);
:func:`run_world` starts ``world`` such processes (spawn), waits with a deadline (a hung rank fails the test
instead of hanging it), kills only its own children, and loads the files.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from typing import Iterator

import torch


@contextlib.contextmanager
def worker_group(rank: int, world: int, init_file: str, outdir: str) -> Iterator[dict]:
    """In a spawned rank: one thread, the reference backend by default, a gloo group through the file store;
    yields the results dict, then saves it and tears the group down."""
    os.environ["RING_ATTN_BACKEND"] = "reference"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results: dict = {}
    try:
        yield results
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        # every rank is done with the group before any tears it down (the intermittent gloo abort at exit,
        # "terminate called without an active exception", was the group outliving destroy_process_group:
        # see tests/test_ring_teardown.py)
        dist.barrier()
        dist.destroy_process_group()


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
