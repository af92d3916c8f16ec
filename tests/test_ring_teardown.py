"""destroy_process_group really ends a gloo group that ring attention used: its worker threads are gone.

A group kept alive past destroy_process_group keeps gloo's worker threads running into interpreter exit; one
of them still releasing a tensor then tries to take the GIL during finalisation and the process aborts
("terminate called without an active exception"): about one run in sixty of the two-rank training example on
a loaded 2-core machine. Four things kept the group alive: a per-group cache of RingComm objects in
ring_attn, the RingComm held by the autograd graph of an output the script still references, an HF patch left
active, and torch binding ``group.WORLD`` as a default argument of ``torch.distributed.nn.functional`` when
ring_attn's first attention call imports it (through torch._dynamo) after init_process_group.

The check is deterministic: this file, run as a script in a fresh interpreter (the lazy import only happens
in one), spawns two gloo ranks that import ring_attn, init the group, run the ring's forward and backward
(real P2P exchanges) and the single-device op, keep the ring's output alive, leave a patch_hf patch active
on a tiny Llama that ran a forward over the ring (when transformers is installed), destroy the group, and
list their threads.
"""
from __future__ import annotations

import datetime
import importlib.util
import os
import subprocess
import sys

import torch

GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")
WORLD = 2
HF = importlib.util.find_spec("transformers") is not None


def _subprocess_env() -> dict:
    """This environment with the repository and tests/ importable, one thread, no Triton interpreter."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended while we listed
            pass
    return names


def _rank(rank, outdir):
    os.environ["RING_ATTN_BACKEND"] = "reference"
    torch.set_num_threads(1)
    import torch.distributed as dist

    import ring_attn  # before init_process_group, as a training script does

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(outdir, 'store')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    g = torch.Generator().manual_seed(0)
    q, k, v = (ring_attn.shard(torch.randn(1, 8 * WORLD, 2, 16, generator=g), layout="zigzag").requires_grad_()
               for _ in range(3))
    out = ring_attn.ring_attn_func(q, k, v, causal=True, group=dist.group.WORLD)
    out.sum().backward()  # `out` stays referenced, as a script's last loss does
    # the single-device op too (its first call imports torch._dynamo, which binds group.WORLD as a default)
    ring_attn.flash_attn_func(q.detach(), k.detach(), v.detach(), causal=True)
    if HF:  # a patched HF model, the patch left active (as a script that never calls undo() leaves it)
        from hf_models import build

        from ring_attn.integrations import hf

        model = build("llama")
        patch = hf.patch_hf(model, group=dist.group.WORLD)
        local = hf.shard_batch({"input_ids": torch.randint(0, 64, (1, 8 * WORLD), generator=g)})
        with torch.no_grad():
            model(input_ids=local["input_ids"], position_ids=local["position_ids"])
    dist.barrier()
    # sampled after a collective: gloo names its run-loop threads (pt_gloo_runloop) on their first work item,
    # and torch < 2.12's gloo leaves its TCP loop thread unnamed, so right after init nothing is named there
    during = _thread_names()
    dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.txt"), "w") as f:
        f.write(" ".join(during) + "\n" + " ".join(_thread_names()) + "\n")
    del out
    if HF:
        patch.undo()


def test_destroy_process_group_ends_gloo_threads(tmp_path):
    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("reads thread names from /proc")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=_subprocess_env(),
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    for rank in range(WORLD):
        during, after = (line.split() for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines())
        assert any(n in GLOO_THREADS for n in during), (rank, during)  # the probe does see gloo's threads
        left = [n for n in after if n in GLOO_THREADS]
        assert not left, f"rank {rank}: gloo threads still running after destroy_process_group: {left}"


WEAK_GROUP_SCRIPT = """
import gc, os, sys, tempfile
import torch.distributed as dist
from ring_attn.ring.comm import weak_group
dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "store"), rank=0,
                        world_size=1)
get, default = weak_group(dist.group.WORLD, "owner X"), weak_group(None, "owner Y")
assert get() is dist.group.WORLD and default() is None
dist.destroy_process_group()
gc.collect()
assert default() is None
try:
    get()
except RuntimeError as e:
    print(e)
else:
    sys.exit("no error after destroy_process_group")
"""


def test_weak_group_names_its_owner_once_the_group_is_gone():
    p = subprocess.run([sys.executable, "-c", WEAK_GROUP_SCRIPT], env=_subprocess_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "owner X: its process group no longer exists (destroy_process_group was called)" in p.stdout


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(sys.argv[1],), nprocs=WORLD, join=True)
