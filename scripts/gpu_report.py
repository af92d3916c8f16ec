"""Turn what ``scripts/gpu_check.sh`` brought back into the markdown that goes into ``benchmarks/RESULTS.md``, with
issue 9's targets checked.

    python scripts/gpu_report.py /path/to/gpu_check_tests.tgz /path/to/gpu_check_bench.tgz > report.md

Each argument is an archive ``gpu_check_<stages>.tgz`` (unpacked to a temporary folder) or a folder holding what
one was packed from; a ``summary_<stages>.txt`` beside an archive is read too. What is printed, where present:

* the card and versions (``environment.txt``) and every stage's exit code and seconds;
* the GPU tests: each pytest process's last line and every FAILED test;
* attention (``attention.csv``): TFLOP/s of ring_attn and of each peer per shape, mask and pass, the best peer
  and ring_attn's ratio to it, then the targets (Llama-3-8B shape and d=64, forward and forward+backward) with
  met / missed;
* the backward variants (tiles before issue 9, the 5-matmul backward with atomics and in a fixed order) and the
  forward variants (tuned tiles, TMA + warp specialisation) against the shipped default of the same run, and what
  the fixed order costs against atomics (target: at most 10 %);
* RoPE (``bench_rope.csv``: share of copy bandwidth, target 90 %), decoding (``bench_decode.csv``), host time per
  call (``bench_overhead.csv``), the HF layer (``bench_hf_layer.csv``) and the ring (``bench_ring.csv``) as
  measured.

Reads only; nothing here needs a GPU (the test suite runs it on a synthetic archive).
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
import tarfile
import tempfile
from pathlib import Path

# issue 9's targets (TFLOP/s, H100, bf16): (shape as bench_attention writes it, mask, pass) -> target
TARGETS = {
    ("1x16384 32/8 d128", "causal", "fwd"): 430.0,
    ("1x16384 32/8 d128", "causal", "fwd+bwd"): 405.0,
    ("4x4096 32/32 d64", "causal", "fwd"): 350.0,
    ("4x4096 32/32 d64", "causal", "fwd+bwd"): 295.0,
}
ROPE_TARGET = 0.90  # share of copy bandwidth
ORDER_COST_TARGET = 0.10  # fused-ordered (deterministic) vs fused (atomics): at most 10 % slower
PEERS = ("sdpa-flash", "sdpa-cudnn", "flex")
# gpu_check.sh's variant runs: sub-folder -> what it is
VARIANTS = {
    "before_tiles": "backward tiles before issue 9",
    "fused_bwd": "5-matmul backward, dQ by atomics (RING_ATTN_BWD=fused)",
    "fused_ordered_bwd": "5-matmul backward, dQ in a fixed order (RING_ATTN_BWD=fused-ordered)",
    "tuned_tiles": "forward tiles from this run's autotuning",
    "tma_fwd": "forward on tensor descriptors + warp specialisation (RING_ATTN_FWD=tma)",
}


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _unpack(arg: str, tmp: Path) -> tuple[Path, list[Path]]:
    """(folder with the results, summary files found beside it)."""
    p = Path(arg)
    if p.is_dir():
        return p, sorted(p.glob("summary_*.txt"))
    if not p.is_file():
        raise SystemExit(f"gpu_report: {arg}: no such archive or folder")
    dest = tmp / p.name.replace(".tgz", "")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(p) as tar:
        try:
            tar.extractall(dest, filter="data")
        except TypeError:  # Python before 3.10.12 / 3.11.4: no extraction filters
            tar.extractall(dest)
    return dest, sorted(p.parent.glob("summary_*.txt"))


def _table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
        return str(v)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return out


def _attention_pivot(rows: list[dict]) -> dict:
    """{(shape, mask, pass): {impl: tflops}} (the last measurement of each wins: CSVs are appended to)."""
    table: dict = {}
    for r in rows:
        table.setdefault((r["shape"], r["mask"], r["pass"]), {})[r["impl"]] = _num(r["tflops"])
    return table


def attention_section(main: dict) -> list[str]:
    lines = ["### Attention (TFLOP/s, higher is better; peers measured in the same process)", ""]
    impls = ["ring_attn"] + [p for p in PEERS if any(p in v for v in main.values())]
    rows = []
    for (shape, mask, pas), v in main.items():
        peers = {p: v[p] for p in PEERS if p in v}
        best = max(peers.items(), key=lambda kv: kv[1]) if peers else None
        ours = v.get("ring_attn", float("nan"))
        rows.append([shape, mask, pas] + [v.get(i, "-") for i in impls] +
                    [best[0] if best else "-", f"{ours / best[1]:.2f}" if best and best[1] > 0 else "-"])
    lines += _table(["shape", "mask", "pass", *impls, "best peer", "ours / best"], rows)
    lines += ["", "Targets (issue 9):", ""]
    trows = []
    for (shape, mask, pas), target in TARGETS.items():
        got = main.get((shape, mask, pas), {}).get("ring_attn")
        status = "not measured" if got is None else ("met" if got >= target else "missed")
        trows.append([shape, mask, pas, target, "-" if got is None else got, status])
    lines += _table(["shape", "mask", "pass", "target", "ring_attn", "status"], trows)
    return lines


def variants_section(root: Path, main: dict) -> list[str]:
    lines = []
    runs = {name: _attention_pivot(_read_csv(root / name / "attention.csv")) for name in VARIANTS}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return lines
    lines += ["", "### Kernel variants against the shipped default of the same run (ring_attn, TFLOP/s)", ""]
    rows = []
    for name, table in runs.items():
        for key, v in table.items():
            got, base = v.get("ring_attn"), main.get(key, {}).get("ring_attn")
            if got is None:
                continue
            rows.append([VARIANTS[name], *key, got, "-" if base is None else base,
                         "-" if not base else f"{got / base:.2f}"])
    lines += _table(["variant", "shape", "mask", "pass", "TFLOP/s", "default's", "variant / default"], rows)
    fused, ordered = runs.get("fused_bwd", {}), runs.get("fused_ordered_bwd", {})
    costs = []
    for key in fused:
        a, o = fused[key].get("ring_attn"), ordered.get(key, {}).get("ring_attn")
        if a and o:
            cost = a / o - 1.0  # time(ordered) / time(atomics) - 1
            costs.append([*key, a, o, f"{100 * cost:.1f} %",
                          "met" if cost <= ORDER_COST_TARGET else "missed"])
    if costs:
        lines += ["", f"What the fixed dQ order costs (target: at most {100 * ORDER_COST_TARGET:.0f} % slower "
                      f"than atomics):", ""]
        lines += _table(["shape", "mask", "pass", "atomics", "ordered", "cost", "status"], costs)
    return lines


def rope_section(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", f"### RoPE (target: ring_attn at {100 * ROPE_TARGET:.0f} % of copy bandwidth)", ""]
    if rows[0].get("shape"):
        lines += [rows[0]["shape"], ""]
    out = []
    for r in rows:
        share = _num(r.get("share_of_copy"))
        status = ("met" if share >= ROPE_TARGET else "missed") if r["impl"] == "ring_attn" else ""
        out.append([r["impl"], r.get("pass_name", ""), _num(r["ms"]), _num(r["gb_s"]), f"{share:.2f}", status])
    return lines + _table(["impl", "pass", "ms", "GB/s", "share of copy", "status"], out)


def simple_section(title: str, rows: list[dict], cols: list[str]) -> list[str]:
    if not rows:
        return []
    body = [[_num(r.get(c)) if re.fullmatch(r"-?[\d.]+(e-?\d+)?", str(r.get(c, ""))) else r.get(c, "")
             for c in cols] for r in rows]
    return ["", f"### {title}", ""] + _table(cols, body)


def tests_section(root: Path) -> list[str]:
    logs = sorted(root.glob("gpu_tests*.log"))
    if not logs:
        return []
    lines = ["", "### GPU tests", ""]
    for log in logs:
        text = log.read_text(errors="replace")
        last = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|error|no tests ran)\b", ln)]
        lines.append(f"- `{log.name}`: {last[-1].strip('= ') if last else 'no pytest summary (killed?)'}")
        lines += [f"  - {ln.strip()}" for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return lines


def report(args: list[str]) -> str:
    lines = ["## GPU run", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for arg in args:
            root, summaries = _unpack(arg, Path(tmp))
            env = (root / "environment.txt")
            lines += [f"From `{Path(arg).name}`:", ""]
            if env.is_file():
                tail = [ln for ln in env.read_text(errors="replace").splitlines() if ln.strip()]
                lines += [f"- environment: {tail[-1] if tail else '(empty)'}"]
            for s in summaries:
                lines += [f"- {ln.strip('= ')}" for ln in s.read_text().splitlines() if ln.startswith("===")]
            lines += tests_section(root)
            main = _attention_pivot(_read_csv(root / "attention.csv"))
            if main:
                lines += [""] + attention_section(main)
            lines += variants_section(root, main)
            lines += rope_section(_read_csv(root / "bench_rope.csv"))
            lines += simple_section("Decoding (flash_attn_with_kvcache shapes)", _read_csv(root / "bench_decode.csv"),
                                    ["impl", "shape", "us", "GB/s", "of_copy", "max_err"])
            lines += simple_section("Host time per call (us; tiny shapes, one sync per loop)",
                                    _read_csv(root / "bench_overhead.csv"), ["case", "impl", "us_per_call", "mode"])
            lines += simple_section("Llama-3-8B decoder layer (patched vs sdpa vs eager)",
                                    _read_csv(root / "bench_hf_layer.csv"),
                                    ["impl", "compiled", "seqlen", "dtype", "ms", "vs_sdpa"])
            lines += simple_section("Ring (one-rank NCCL group on one GPU; model: W GPUs over each link)",
                                    _read_csv(root / "bench_ring.csv"),
                                    ["passes", "seqlen", "single_ms", "ring_ms", "compute_ms", "exposed_ms",
                                     "efficiency", "offdiag_tflops"])
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="gpu_check_<stages>.tgz archives or folders")
    args = ap.parse_args(argv)
    sys.stdout.write(report(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
