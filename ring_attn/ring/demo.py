"""``ring-attn demo``: ring attention over N ranks, checked against the single-device op.

With no arguments on a machine without GPUs it spawns 4 gloo ranks on the CPU, runs causal attention over a
16k-token sequence (zigzag layout) forward and backward, gathers the result and compares it with
``flash_attn_func`` on the whole sequence in one process, and prints the error, the time, each rank's peak
memory and the throughput. With N GPUs it spawns N ranks (one per GPU) with NCCL and the Triton kernels.
Under ``torchrun`` it uses the job's ranks instead of spawning.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import resource
import signal
import sys
import tempfile
import time

import torch

from ring_attn._cli_support import physical_memory
from ring_attn.ring import layout as ring_layout

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_DEFAULTS = dict(heads=2, kv_heads=1, head_dim=64, dtype="float32")
GPU_DEFAULTS = dict(heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")


class PeakTensorMemory:
    """Peak bytes of CPU tensor storages created while active: a TorchDispatchMode sees every aten op's
    outputs (storage sizes) and a weakref finalizer on each storage sees it freed. Tensors that existed
    before entering are not counted; allocations internal to one aten kernel are not seen."""

    def __init__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.live, self.current, self.peak = {}, 0, 0
        self._finalizers = []

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key and key not in tracker.live:
                            tracker.live[key] = st.nbytes()
                            tracker.current += st.nbytes()
                            tracker.peak = max(tracker.peak, tracker.current)
                            fin = weakref.finalize(st, tracker._free, key)
                            fin.atexit = False
                            tracker._finalizers.append(fin)
                return out

        self._mode = _Mode()

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self._mode.__exit__(*exc)
        finally:  # stop tracking: storages still alive are no longer followed
            for fin in self._finalizers:
                fin.detach()
            self._finalizers.clear()
            self.live.clear()
            self.current = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpus = torch.cuda.device_count()
    parser.add_argument("--world-size", "-n", type=int, default=None,
                        help=f"ranks (default: the number of GPUs, or 4 gloo ranks on CPU, at most "
                             f"{MAX_CPU_RANKS} there; here: {gpus or 4})")
    parser.add_argument("--seqlen", "-s", type=int, default=16384, help="global sequence length (default 16384)")
    parser.add_argument("--batch", "-b", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--heads", type=int, default=None,
                        help="query heads (default: 2 on CPU, small so the default run, whose single-device check "
                             "on the whole sequence dominates, takes under 2 minutes on 2 cores; 32 on GPU, "
                             "Llama-3-8B)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads, GQA (default: 1 on CPU, 8 on GPU)")
    parser.add_argument("--head-dim", type=int, default=None, help="head dim (default: 64 on CPU, 128 on GPU)")
    parser.add_argument("--layout", choices=("zigzag", "contiguous", "striped"), default="zigzag",
                        help="how the sequence is split over the ranks (default zigzag: balanced causal work)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--no-causal", dest="causal", action="store_false", help="full (non-causal) attention")
    parser.add_argument("--forward-only", action="store_true", help="skip the backward pass")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: 1 on CPU, 10 on GPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA (NCCL) when GPUs exist, else CPU (gloo)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the single-device comparison (it needs the whole sequence on rank 0)")


def _use_cuda(args) -> bool:
    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


def _under_torchrun() -> bool:
    """Whether this process is a rank of a launched job (torchrun): its ranks exist already, none is spawned."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _world(args, use_cuda: bool) -> int:
    if _under_torchrun():  # the job decides
        return int(os.environ["WORLD_SIZE"])
    if args.world_size is not None:
        return args.world_size
    return torch.cuda.device_count() if use_cuda else 4


def _resolve(args) -> dict:
    use_cuda = _use_cuda(args)
    d = GPU_DEFAULTS if use_cuda else CPU_DEFAULTS

    def pick(value, default):
        return default if value is None else value

    return dict(world=_world(args, use_cuda), cuda=use_cuda, seqlen=args.seqlen, batch=args.batch,
                heads=pick(args.heads, d["heads"]), kv_heads=pick(args.kv_heads, d["kv_heads"]),
                head_dim=pick(args.head_dim, d["head_dim"]), dtype=pick(args.dtype, d["dtype"]),
                layout=args.layout, causal=args.causal, backward=not args.forward_only,
                iters=pick(args.iters, 10 if use_cuda else 1), check=args.check, t0=time.monotonic(),
                parent=os.getpid())


#: gloo ranks the demo spawns at most on one machine's CPU (each is a process with its own torch)
MAX_CPU_RANKS = 64


def check_args(args) -> None:
    """Check every flag in this (the parent) process, before any rank is spawned.

    Ranges: ``--world-size``, ``--seqlen``, ``--batch``, ``--heads``, ``--kv-heads``, ``--iters`` >= 1;
    ``--heads`` a multiple of ``--kv-heads``; ``--head-dim`` in [1, 256]; ``--device cuda`` needs a visible GPU and
    ``--world-size`` at most the GPU count, on the CPU at most :data:`MAX_CPU_RANKS`, and at most ``--seqlen``
    (any ``--seqlen`` from there works: ``shard`` pads what the layout cannot split and the ring masks the
    padding); the inputs every rank builds on the host fit this machine's memory. Last, one tiny
    ``flash_attn_func`` call with the run's heads, head dim and dtype on the CPU reference backend, so that
    anything the attention op refuses is reported here rather than by every rank.

    Raises:
        ValueError: naming the flag, the value and what is accepted.
    """
    for flag, value in (("--world-size", args.world_size), ("--seqlen", args.seqlen), ("--batch", args.batch),
                        ("--heads", args.heads), ("--kv-heads", args.kv_heads), ("--iters", args.iters)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: expected an int >= 1")
    if args.head_dim is not None and not 1 <= args.head_dim <= 256:
        raise ValueError(f"--head-dim {args.head_dim}: expected an int in [1, 256]")
    if _under_torchrun() and args.world_size is not None and args.world_size != int(os.environ["WORLD_SIZE"]):
        raise ValueError(f"--world-size {args.world_size}: this is a rank of a launched job of "
                         f"WORLD_SIZE={os.environ['WORLD_SIZE']} processes; drop --world-size (the launcher decides) "
                         f"or launch {args.world_size} processes")
    use_cuda = _use_cuda(args)
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible (use --device cpu for gloo ranks on the CPU)")
    cfg = _resolve(args)
    if use_cuda and cfg["world"] > torch.cuda.device_count() and not _under_torchrun():
        raise ValueError(f"--world-size {cfg['world']}: needs {cfg['world']} GPUs (NCCL ranks cannot share a GPU); "
                         f"{torch.cuda.device_count()} visible")
    if not use_cuda and not _under_torchrun() and cfg["world"] > MAX_CPU_RANKS:
        raise ValueError(f"--world-size {cfg['world']}: expected at most {MAX_CPU_RANKS} gloo ranks (processes) on "
                         f"this machine's CPU")
    if cfg["world"] > cfg["seqlen"]:
        raise ValueError(f"--world-size {cfg['world']} --seqlen {cfg['seqlen']}: expected at least one token per rank "
                         f"(--seqlen >= --world-size)")
    _check_host_memory(cfg)
    if cfg["heads"] % cfg["kv_heads"]:
        raise ValueError(f"--heads {cfg['heads']} --kv-heads {cfg['kv_heads']}: expected --heads to be a multiple "
                         "of --kv-heads (grouped-query attention)")
    _trial_call(cfg)


def _check_host_memory(cfg: dict) -> None:
    """Every rank process builds the whole run's q, k, v and dout in float32 on the host (seeded, so the ranks
    agree) before keeping its shard: refuse up front a run whose processes on this machine together need more
    than its physical memory (a typo such as --seqlen 99999999999 otherwise fails in every rank with a
    traceback)."""
    physical = physical_memory()
    if physical is None:  # not reported on this platform: nothing to compare with
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", cfg["world"]))
    per_rank = 4 * cfg["batch"] * cfg["seqlen"] * cfg["head_dim"] * 2 * (cfg["heads"] + cfg["kv_heads"])
    if local * per_rank > physical:
        raise ValueError(f"--seqlen {cfg['seqlen']} --batch {cfg['batch']} --heads {cfg['heads']} --kv-heads "
                         f"{cfg['kv_heads']} --head-dim {cfg['head_dim']}: each rank builds the whole inputs on the "
                         f"host ({per_rank / 2**30:.3g} GiB in float32, {local} rank process(es) here), more than "
                         f"this machine's {physical / 2**30:.3g} GiB")


def _trial_call(cfg: dict) -> None:
    """One forward (+ backward) of ``flash_attn_func`` on 4 tokens with the run's heads / head dim / dtype, on
    the CPU reference backend (cheap, and its argument checks are the op's): a refusal becomes a ValueError
    that names the flags."""
    import ring_attn

    saved = os.environ.get("RING_ATTN_BACKEND")
    os.environ["RING_ATTN_BACKEND"] = "reference"
    try:
        dtype = DTYPES[cfg["dtype"]]
        q = torch.zeros(1, 4, cfg["heads"], cfg["head_dim"], dtype=dtype, requires_grad=cfg["backward"])
        k, v = (torch.zeros(1, 4, cfg["kv_heads"], cfg["head_dim"], dtype=dtype, requires_grad=cfg["backward"])
                for _ in range(2))
        out = ring_attn.flash_attn_func(q, k, v, causal=cfg["causal"])
        if cfg["backward"]:
            out.sum().backward()
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise ValueError(f"--heads {cfg['heads']} --kv-heads {cfg['kv_heads']} --head-dim {cfg['head_dim']} "
                         f"--dtype {cfg['dtype']}: the attention op refuses them: {exc}") from exc
    finally:
        if saved is None:
            os.environ.pop("RING_ATTN_BACKEND", None)
        else:
            os.environ["RING_ATTN_BACKEND"] = saved


def _progress(cfg: dict, message: str) -> None:
    """One progress line on stderr (stdout holds the configuration and the results), ``[elapsed s] message``,
    flushed at once (elapsed since the command started). The
    spawned ranks stamp their lines against the parent's ``t0``: ``time.monotonic`` (CLOCK_MONOTONIC on Linux)
    is one clock for every process of the machine and, unlike the wall clock, never steps back."""
    print(f"[{time.monotonic() - cfg['t0']:7.1f} s] {message}", file=sys.stderr, flush=True)


def _per_rank(s: int, world: int, layout: str) -> str:
    """``"N per rank"``: each rank's token count, after ``shard`` pads what the layout cannot split."""
    padded = ring_layout.padded_length(s, world, layout)
    return f"{padded // world} per rank" + (f", padded to {padded}" if padded != s else "")


def _describe(cfg: dict) -> str:
    s, world = cfg["seqlen"], cfg["world"]
    where = f"{world} NCCL rank(s) on GPUs" if cfg["cuda"] else f"{world} gloo rank(s) on CPU"
    passes = "forward+backward" if cfg["backward"] else "forward"
    return (f"ring-attn demo: {where}, {'causal' if cfg['causal'] else 'full'} {cfg['layout']}, batch "
            f"{cfg['batch']} x {s} tokens ({_per_rank(s, world, cfg['layout'])}), heads "
            f"{cfg['heads']}/{cfg['kv_heads']}, "
            f"head_dim {cfg['head_dim']}, {cfg['dtype']}; {cfg['iters']} timed {passes} iteration(s); "
            f"single-device check {'on' if cfg['check'] else 'off (--no-check)'}")


def _sync(cfg):
    if cfg["cuda"]:
        torch.cuda.synchronize()


def _die_with_parent(parent: int) -> None:
    """A spawned rank exits when the demo process dies (killed, timed out): no orphaned ranks left running.
    Linux only (prctl PR_SET_PDEATHSIG); elsewhere ranks end at the group's timeout."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _worker(rank: int, cfg: dict, init: str, result_path: str) -> None:
    import torch.distributed as dist

    if init != "env://":
        _die_with_parent(cfg["parent"])
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us

    if not cfg["cuda"]:
        # the Triton interpreter is far too slow here: the native C++ backend when built, else the reference
        from ring_attn.backends import native_available

        os.environ.setdefault("RING_ATTN_BACKEND", "native" if native_available() else "reference")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg["world"]))
    world = cfg["world"]
    if cfg["cuda"]:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    kw = dict(backend="nccl" if cfg["cuda"] else "gloo", timeout=datetime.timedelta(minutes=10))
    if init == "env://":
        dist.init_process_group(init_method="env://", **kw)
        rank = dist.get_rank()
    else:
        dist.init_process_group(init_method=init, rank=rank, world_size=world, **kw)
    if rank == 0:
        _progress(cfg, f"process group up: {world} rank(s) ({kw['backend']}); building and sharding the inputs ...")
    try:
        _run_rank(rank, cfg, result_path)
        dist.barrier()  # every rank done before any tears the group down (gloo can abort otherwise)
    finally:
        dist.destroy_process_group()


def _run_rank(rank, cfg, result_path):
    import torch.distributed as dist

    import ring_attn

    world, dtype = cfg["world"], DTYPES[cfg["dtype"]]
    device = torch.device("cuda", torch.cuda.current_device()) if cfg["cuda"] else torch.device("cpu")
    b, s, hq, hkv, d = cfg["batch"], cfg["seqlen"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    layout = cfg["layout"]
    # every rank makes the same global tensors (seeded), keeps its shard; rank 0 keeps the whole for the check
    g = torch.Generator(device="cpu").manual_seed(1234)
    full = [torch.randn(b, s, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv, hq)]
    q, k, v, dout = (ring_attn.shard(x, dim=1, layout=layout).to(device) for x in full)
    if rank != 0 or not cfg["check"]:
        del full
    q.requires_grad_(cfg["backward"])
    k.requires_grad_(cfg["backward"])
    v.requires_grad_(cfg["backward"])

    def ring_step(timings):
        _sync(cfg)
        t0 = time.perf_counter()
        out = ring_attn.ring_attn_func(q, k, v, causal=cfg["causal"], layout=layout, seqlen=s)  # any length
        _sync(cfg)
        t1 = time.perf_counter()
        if cfg["backward"]:
            out.backward(dout)
            _sync(cfg)
        t2 = time.perf_counter()
        timings.append((t1 - t0, t2 - t1))
        return out

    passes = "forward+backward" if cfg["backward"] else "forward"
    if cfg["cuda"]:  # autotune, NCCL setup and the signature check happen here, outside the timing
        if rank == 0:
            _progress(cfg, f"warm-up: 2 untimed ring {passes} iterations (Triton autotune, NCCL setup)")
        for _ in range(2):
            q.grad = k.grad = v.grad = None
            ring_step([])
        torch.cuda.reset_peak_memory_stats()
    timings = []
    mem = PeakTensorMemory() if not cfg["cuda"] else None
    if mem is not None:
        with PeakTensorMemory():  # the first dispatch mode of a process costs seconds of one-time setup
            torch.zeros(1).add_(1)
    dist.barrier()
    if rank == 0:
        _progress(cfg, f"ring {passes}: {cfg['iters']} timed iteration(s) on {world} rank(s) ...")
    for _ in range(cfg["iters"]):
        q.grad = k.grad = v.grad = None
        if mem is not None:
            with mem:
                out = ring_step(timings)
        else:
            out = ring_step(timings)
    dist.barrier()
    fwd = sorted(t[0] for t in timings)[len(timings) // 2]
    bwd = sorted(t[1] for t in timings)[len(timings) // 2]
    peak = torch.cuda.max_memory_allocated() if cfg["cuda"] else mem.peak
    stats = dict(rank=rank, s_local=q.shape[1], fwd_ms=fwd * 1e3, bwd_ms=bwd * 1e3, peak_mb=peak / 2**20,
                 rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 backend=ring_attn.backend_info(q)["ops"]["attention"]["backend"])
    all_stats = [None] * world
    dist.all_gather_object(all_stats, stats)

    gathered = [ring_attn.unshard(out.detach(), dim=1, layout=layout, seqlen=s)]
    if cfg["backward"]:
        gathered += [ring_attn.unshard(x.grad, dim=1, layout=layout, seqlen=s) for x in (q, k, v)]
    if rank != 0:
        return
    _progress(cfg, f"ring {passes} done")
    line = (f"result: {world} rank(s), {'NCCL on ' + torch.cuda.get_device_name() if cfg['cuda'] else 'gloo on CPU'}"
            f" ({stats['backend']} backend), {'causal' if cfg['causal'] else 'full'} {layout}, batch {b} x {s} "
            f"tokens ({_per_rank(s, world, layout)}), heads {hq}/{hkv}, head_dim {d}, {cfg['dtype']}")
    print(line)
    print(f"{'rank':>4} {'s_local':>8} {'fwd ms':>10} {'bwd ms':>10} {'peak tensor MB':>15} {'max RSS MB':>11}")
    for st in all_stats:
        bwd = f"{st['bwd_ms']:>10.1f}" if cfg["backward"] else f"{'-':>10}"  # --forward-only: no backward ran
        print(f"{st['rank']:>4} {st['s_local']:>8} {st['fwd_ms']:>10.1f} {bwd} "
              f"{st['peak_mb']:>15.1f} {st['rss_mb']:>11.0f}")
    ring_ms = max(st["fwd_ms"] + st["bwd_ms"] for st in all_stats)
    print(f"ring {passes}: {ring_ms:.1f} ms (slowest rank) -> {b * s / (ring_ms / 1e3):,.0f} tokens/s")
    result = dict(config=cfg, ranks=all_stats, ring_ms=ring_ms)
    if cfg["check"]:
        torch.set_num_threads(os.cpu_count() or 1)  # the other ranks are done computing
        _progress(cfg, f"single-device check: flash_attn_func {passes} on all {s} tokens in one process "
                       f"({'the longest phase on CPU; ' if not cfg['cuda'] else ''}--no-check skips it) ...")
        qf, kf, vf = (x.to(device).requires_grad_(cfg["backward"]) for x in full[:3])
        _sync(cfg)
        t0 = time.perf_counter()
        ref = ring_attn.flash_attn_func(qf, kf, vf, causal=cfg["causal"])
        _sync(cfg)
        t1 = time.perf_counter()
        if cfg["backward"]:
            ref.backward(full[3].to(device))
            _sync(cfg)
        t2 = time.perf_counter()
        print(f"single device flash_attn_func ({passes}, one process): {(t2 - t0) * 1e3:.1f} ms "
              f"(forward {(t1 - t0) * 1e3:.1f} ms)")
        refs = [ref.detach()] + ([qf.grad, kf.grad, vf.grad] if cfg["backward"] else [])
        names = ["out", "dq", "dk", "dv"][: len(refs)]
        errs = {}
        for n, a, r in zip(names, gathered, refs):
            a, r = a.double(), r.double()
            errs[n] = dict(max_abs=(a - r).abs().max().item(),
                           rel=((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        ok = all(e["rel"] <= tol for e in errs.values())
        print("max error vs single device: " + ", ".join(
            f"{n} {e['max_abs']:.2e} (rel {e['rel']:.2e})" for n, e in errs.items())
            + f" -> {'PASS' if ok else 'FAIL'} (relative tolerance {tol:g})")
        result.update(errors=errs, ok=ok)
        _progress(cfg, "single-device check done")
    with open(result_path, "w") as f:
        json.dump(result, f)


def run(args) -> int:
    """Run the demo (``check_args`` has checked ``args``); return 0, or 1 when the check against one device fails."""
    cfg = _resolve(args)
    under_torchrun = _under_torchrun()
    if not under_torchrun or int(os.environ["RANK"]) == 0:
        print(_describe(cfg), flush=True)
    with tempfile.TemporaryDirectory(prefix="ring-attn-demo-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        t0 = time.perf_counter()
        if under_torchrun:  # this process is one rank
            _worker(int(os.environ["RANK"]), cfg, "env://", result_path)
            if int(os.environ["RANK"]) != 0:
                return 0
        else:
            import torch.multiprocessing as mp

            _progress(cfg, f"spawning {cfg['world']} rank process(es) ({'NCCL' if cfg['cuda'] else 'gloo'}); each "
                           "starts Python and imports torch ...")
            ctx = mp.start_processes(_worker, args=(cfg, f"file://{os.path.join(tmp, 'store')}", result_path),
                                     nprocs=cfg["world"], join=False, start_method="spawn")
            try:
                while not ctx.join():
                    pass
            except KeyboardInterrupt:  # Ctrl-C: the ranks ignore SIGINT; stop them here, one line, status 130
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                for p in ctx.processes:
                    p.join(10)
                print("ring-attn demo: interrupted; the rank processes were stopped", file=sys.stderr)
                return 130
        with open(result_path) as f:
            result = json.load(f)
        where = ("this rank, after the launcher started the processes" if under_torchrun
                 else "including process start-up")
        print(f"total wall time {time.perf_counter() - t0:.1f} s ({where})")
    return 0 if result.get("ok", True) else 1
