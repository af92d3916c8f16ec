"""``ring-attn rope-plan``: plan a RoPE context extension from a trained length to a target length.

Prints, for a head dim, a base theta and the two lengths:

* the theta of static NTK-aware scaling, ``theta * s ** (d / (d - 2))`` with ``s = target / trained``, and the
  theta of the critical-dimension rule ``theta ** (ln(target / 2pi) / ln(trained / 2pi))`` (Liu et al. 2023,
  "Scaling Laws of RoPE-based Extrapolation"): the base at which the last pair that completed a rotation within
  the trained length stretches to exactly the target length;
* YaRN's parameters for that factor: the correction range (pairs kept, blended, interpolated, from
  ``beta_fast``/``beta_slow``) and the attention factor ``0.1 ln(s) + 1``;
* one row per dimension pair of the chosen scheme (``--rope-type``): wavelength, full rotations within the
  trained and the target length, and which pairs never complete a rotation;
* the angle error of float32 and bfloat16 cos/sin tables at the target length (the angle recovered from the
  table against the float64 angle), next to the in-kernel float64-angle math of ``ring_attn.apply_rope``;
* with ``--plot out.png``, wavelength per pair with both lengths marked (needs matplotlib: the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

import torch

from ring_attn import rope_scaling
from ring_attn._cli_support import json_safe
from ring_attn.ops.rope import MAX_POSITION

SCHEMES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3", "critical")
# Positions evaluated for the table-error estimate: all of them up to this many, else a sample (see _positions).
_MAX_EVAL_POSITIONS = 1 << 16
#: the largest head dim planned (real models use <= 512; the plan evaluates every pair at up to 2^16 positions)
MAX_PLAN_HEAD_DIM = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--head-dim", type=int, required=True, help="attention head size (e.g. 128)")
    parser.add_argument("--theta", type=float, required=True, help="the model's RoPE base (rope_theta)")
    parser.add_argument("--trained", type=int, required=True, help="context length the model was trained on")
    parser.add_argument("--target", type=int, required=True, help="context length to reach")
    parser.add_argument("--rope-type", choices=SCHEMES, default="default",
                        help="scheme whose per-pair table and table errors are shown (default: theta unchanged; "
                             "critical: default rope with the critical-dimension theta)")
    parser.add_argument("--partial-rotary-factor", type=float, default=1.0, help="fraction of head dims rotated")
    parser.add_argument("--beta-fast", type=float, default=32.0, help="YaRN beta_fast (default 32)")
    parser.add_argument("--beta-slow", type=float, default=1.0, help="YaRN beta_slow (default 1)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of text")
    parser.add_argument("--plot", metavar="PNG", help="write a plot of wavelength per pair (needs matplotlib)")


# ---------------------------------------------------------------------------------------------------------
# Argument checks: run by the CLI before any computation (a one-line argparse error, exit 2) and by plan()


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_plan_args(head_dim: int, theta: float, trained: int, target: int, rope_type: str = "default",
                    partial_rotary_factor: float = 1.0, beta_fast: float = 32.0, beta_slow: float = 1.0) -> int:
    """Check :func:`plan`'s arguments; return the rotary dim ``int(head_dim * partial_rotary_factor)``.

    Raises:
        ValueError: naming the flag, the value and the accepted range: ``rope_type`` not in ``SCHEMES``;
            ``theta`` not a finite number > 1 (the theta rules take its log); ``trained`` not an int > 2pi
            (the rules take ``ln(trained / 2pi)``); ``target`` not an int > 2pi; ``partial_rotary_factor``
            outside (0, 1]; a rotary dim that is odd or < 4; ``beta_fast``/``beta_slow`` not finite numbers
            with ``beta_fast >= beta_slow > 0`` (equal: a one-pair ramp, as in transformers and
            :mod:`ring_attn.rope_scaling`).
    """
    if rope_type not in SCHEMES:
        raise ValueError(f"--rope-type (rope_type) {rope_type!r}: expected one of {SCHEMES}")
    if not _is_number(theta) or theta <= 1:
        raise ValueError(f"--theta {theta!r}: expected a finite number > 1 (the RoPE base; the theta rules take "
                         "its log)")
    if isinstance(trained, bool) or not isinstance(trained, int) or not 2 * math.pi < trained <= MAX_POSITION:
        raise ValueError(f"--trained {trained!r}: expected an int > 2pi, i.e. >= 7 (the rules take "
                         f"ln(trained / 2pi)), and <= 2^29 = {MAX_POSITION} (apply_rope's positions)")
    if isinstance(target, bool) or not isinstance(target, int) or not 2 * math.pi < target <= MAX_POSITION:
        raise ValueError(f"--target {target!r}: expected an int > 2pi, i.e. >= 7 (the critical-dimension rule "
                         "takes ln(target / 2pi); below it the rule's theta falls under 1), and <= 2^29 = "
                         f"{MAX_POSITION} (apply_rope's positions)")
    if not _is_number(partial_rotary_factor) or not 0 < partial_rotary_factor <= 1:
        raise ValueError(f"--partial-rotary-factor {partial_rotary_factor!r}: expected a number in (0, 1]")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 1 <= head_dim <= MAX_PLAN_HEAD_DIM:
        raise ValueError(f"--head-dim {head_dim!r}: expected an int from 4 to {MAX_PLAN_HEAD_DIM}")
    dim = int(head_dim * partial_rotary_factor)
    if dim < 4 or dim % 2:
        raise ValueError(f"--head-dim {head_dim} with --partial-rotary-factor {partial_rotary_factor}: rotary dim "
                         f"int(head_dim * partial_rotary_factor) = {dim}; expected an even number >= 4")
    if not _is_number(beta_fast) or not _is_number(beta_slow) or not beta_fast >= beta_slow > 0:
        raise ValueError(f"--beta-fast {beta_fast!r} --beta-slow {beta_slow!r}: expected finite numbers with "
                         "beta_fast >= beta_slow > 0")
    try:  # the theta rules must give finite float64 bases
        rules = (critical_theta(theta, trained, target), ntk_theta(theta, target / trained, dim))
    except OverflowError:
        rules = (math.inf,)
    if not all(math.isfinite(r) for r in rules):
        raise ValueError(f"--theta {theta!r}: the theta rules for --trained {trained} --target {target} overflow a "
                         "float64; expected a smaller theta")
    return dim


def check_plot_path(path: str) -> None:
    """Check up front that ``--plot PATH`` can be written: matplotlib is installed, the directory exists and is
    writable, ``PATH`` is not a directory and its extension is a format matplotlib writes.

    Raises:
        ValueError: naming the path and what is wrong.
    """
    import importlib.util
    import os

    if not path.strip():  # an empty --plot "" wrote nothing and said nothing
        raise ValueError(f"--plot {path!r}: expected a file name such as plan.png")
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"--plot {path}: needs matplotlib, which is not installed: pip install 'ring-attn[bench]' "
                         "(or pip install matplotlib)")
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--plot {path}: is a directory; expected a file name such as {os.path.join(path, 'plan.png')}")
    if not os.path.isdir(directory):
        raise ValueError(f"--plot {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"--plot {path}: directory {directory} is not writable")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
        if ext not in formats:
            raise ValueError(f"--plot {path}: matplotlib cannot write .{ext} files; expected one of "
                             f"{', '.join('.' + f for f in sorted(formats))}")


def check_args(args: argparse.Namespace) -> None:
    """The CLI's up-front check of every flag (``ring-attn`` turns the ValueError into an argparse error)."""
    check_plan_args(args.head_dim, args.theta, args.trained, args.target, args.rope_type,
                    args.partial_rotary_factor, args.beta_fast, args.beta_slow)
    if args.plot is not None:
        check_plot_path(args.plot)


# ---------------------------------------------------------------------------------------------------------
# The plan (pure computation; run() only formats it)


def critical_theta(theta: float, trained: int, target: int) -> float:
    """Liu et al. 2023: ``theta ** (ln(target / 2pi) / ln(trained / 2pi))``."""
    return theta ** (math.log(target / (2 * math.pi)) / math.log(trained / (2 * math.pi)))


def ntk_theta(theta: float, factor: float, dim: int) -> float:
    """Static NTK-aware scaling: ``theta * factor ** (d / (d - 2))``."""
    return theta * factor ** (dim / (dim - 2))


def critical_dimension(theta: float, trained: int, dim: int) -> int:
    """Liu et al. 2023: ``2 * ceil(d/2 * log_theta(trained / 2pi))``, the dims whose pairs complete a full
    rotation within the trained length (clamped to ``[0, d]``)."""
    return max(0, min(dim, 2 * math.ceil(dim / 2 * math.log(trained / (2 * math.pi)) / math.log(theta))))


def _scheme_inv_freq(scheme: str, dim: int, theta: float, trained: int, target: int,
                     beta_fast: float, beta_slow: float) -> tuple[torch.Tensor, float, float]:
    """``(inv_freq, attention_scaling, effective theta)`` of a scheme for ``factor = target / trained``."""
    s = target / trained
    if scheme == "critical":
        t = critical_theta(theta, trained, target)
        return (*rope_scaling.rope_parameters("default", dim, t), t)
    params: dict[str, Any] = {
        "default": {},
        "linear": {"factor": s},
        "ntk": {"factor": s},
        "dynamic": {"factor": s, "max_position_embeddings": trained, "seq_len": target},
        "yarn": {"factor": s, "original_max_position_embeddings": trained, "beta_fast": beta_fast,
                 "beta_slow": beta_slow},
        "llama3": {"factor": s, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": trained},
    }[scheme]
    inv, scale = rope_scaling.rope_parameters(scheme, dim, theta, **params)
    if scheme == "ntk":
        eff = ntk_theta(theta, s, dim)
    elif scheme == "dynamic" and target > trained:  # transformers' dynamic NTK base at seq_len = target
        eff = theta * (s * target / trained - (s - 1)) ** (dim / (dim - 2))
    else:
        eff = theta
    return inv, scale, eff


def _positions(target: int) -> torch.Tensor:
    """Positions at which table errors are measured: all of ``[0, target)``, or, when longer, an even sample plus
    the last positions (where the float32 product is worst)."""
    if target <= _MAX_EVAL_POSITIONS:
        return torch.arange(target, dtype=torch.int64)
    half = _MAX_EVAL_POSITIONS // 2
    spread = torch.linspace(0, target - 1, half, dtype=torch.float64).round().to(torch.int64)
    return torch.unique(torch.cat([spread, torch.arange(target - half, target)]))


def _wrap(x: torch.Tensor) -> torch.Tensor:
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


def table_angle_errors(inv_freq: torch.Tensor, target: int) -> dict:
    """Max / mean angle error (rad) of cos/sin tables over positions in ``[0, target)``.

    * ``fp32_table``: HF's recipe: ``position.float() * inv_freq`` in float32, cos/sin in float32;
    * ``bf16_table``: the same tables rounded to bfloat16 (what a bf16 model reads);
    * ``ring_attn_kernel``: the arithmetic of ``apply_rope`` (float64 product, reduction mod 2pi, float32 cos/sin),
      evaluated here with torch on the CPU.

    The error of a table entry is ``wrap(atan2(sin, cos) - angle)`` with the angle exact in float64.
    """
    pos = _positions(target)
    exact = pos.to(torch.float64)[:, None] * inv_freq.to(torch.float64)
    out = {"positions_evaluated": int(pos.numel()), "sampled": bool(pos.numel() < target)}
    ang32 = pos.to(torch.float32)[:, None] * inv_freq.to(torch.float32)
    c32, s32 = torch.cos(ang32), torch.sin(ang32)
    tables = {
        "fp32_table": (c32, s32),
        "bf16_table": (c32.to(torch.bfloat16), s32.to(torch.bfloat16)),
    }
    two_pi = 2 * math.pi
    reduced = (exact - torch.round(exact / two_pi) * two_pi).to(torch.float32)
    tables["ring_attn_kernel"] = (torch.cos(reduced), torch.sin(reduced))
    for name, (c, s) in tables.items():
        err = _wrap(torch.atan2(s.double(), c.double()) - exact).abs()
        flat = int(err.argmax())
        out[name] = {"max_rad": float(err.max()), "mean_rad": float(err.mean()),
                     "worst_position": int(pos[flat // err.shape[1]]), "worst_pair": int(flat % err.shape[1])}
    return out


def plan(head_dim: int, theta: float, trained: int, target: int, rope_type: str = "default",
         partial_rotary_factor: float = 1.0, beta_fast: float = 32.0, beta_slow: float = 1.0) -> dict:
    """Everything ``rope-plan`` prints, as a dict (also what ``--json`` emits).

    Raises:
        ValueError: see :func:`check_plan_args`.
    """
    dim = check_plan_args(head_dim, theta, trained, target, rope_type, partial_rotary_factor, beta_fast, beta_slow)
    s = target / trained
    inv, scale, eff_theta = _scheme_inv_freq(rope_type, dim, theta, trained, target, beta_fast, beta_slow)
    low, high = rope_scaling.yarn_correction_range(dim, theta, trained, beta_fast, beta_slow, truncate=True)
    yarn_inv, yarn_scale = rope_scaling.rope_parameters(
        "yarn", dim, theta, factor=max(s, 1.0), original_max_position_embeddings=trained,
        beta_fast=beta_fast, beta_slow=beta_slow)
    base_inv, _ = rope_scaling.rope_parameters("default", dim, theta)

    pairs = []
    for i, f in enumerate(inv.double().tolist()):
        wavelength = 2 * math.pi / f if f > 0 else math.inf
        row = {"pair": i, "dims": [i, i + dim // 2], "inv_freq": f, "wavelength": wavelength,
               "rotations_trained": trained / wavelength, "rotations_target": target / wavelength,
               "original_wavelength": 2 * math.pi / float(base_inv[i]) if float(base_inv[i]) > 0 else math.inf}
        if rope_type == "yarn":
            row["yarn_extrapolation"] = 1.0 - min(max((i - low) / ((high - low) or 0.001), 0.0), 1.0)
        pairs.append(row)
    never_trained = [p["pair"] for p in pairs if p["rotations_trained"] < 1]
    never_target = [p["pair"] for p in pairs if p["rotations_target"] < 1]
    warnings = []
    if target < trained:
        warnings.append(f"--target {target:,} is shorter than --trained {trained:,}: no extension is needed; the "
                        f"theta rules and scaled rope types below are for a factor s = {s:.6g} < 1, which shrinks "
                        "the positions (transformers warns on scaling factors below 1; YaRN is shown at factor 1)")
    return {
        "head_dim": head_dim, "rotary_dim": dim, "theta": theta, "trained": trained, "target": target,
        "factor": s, "rope_type": rope_type, "effective_theta": eff_theta, "attention_scaling": scale,
        "ntk_theta": ntk_theta(theta, s, dim),
        "critical_theta": critical_theta(theta, trained, target),
        "critical_dimension": critical_dimension(theta, trained, dim),
        "critical_dimension_at_critical_theta": critical_dimension(critical_theta(theta, trained, target), target, dim),
        "yarn": {"factor": max(s, 1.0), "original_max_position_embeddings": trained, "beta_fast": beta_fast,
                 "beta_slow": beta_slow, "correction_range_pairs": [low, high],
                 "attention_factor": yarn_scale, "inv_freq": yarn_inv.tolist()},
        "pairs": pairs,
        "pairs_never_rotating_in_trained": never_trained,
        "pairs_never_rotating_in_target": never_target,
        "table_angle_error_at_target": table_angle_errors(inv, target),
        "warnings": warnings,
    }


# ---------------------------------------------------------------------------------------------------------
# Text, JSON, PNG


def _span(pairs: list[int]) -> str:
    if not pairs:
        return "none"
    return f"pairs {pairs[0]}..{pairs[-1]} ({len(pairs)} of them)" if len(pairs) > 1 else f"pair {pairs[0]}"


def format_plan(p: dict) -> str:
    d, s = p["rotary_dim"], p["factor"]
    lines = [f"warning: {w}" for w in p["warnings"]] + [
        f"RoPE plan: rotary dim {d} ({d // 2} pairs) of head dim {p['head_dim']}, theta {p['theta']:.6g}, "
        f"trained {p['trained']:,} -> target {p['target']:,} tokens (factor s = {s:.6g})",
        "",
        "theta rules",
        f"  static NTK-aware        theta * s^(d/(d-2))                       = {p['ntk_theta']:.6g}",
        f"  critical dimension      theta^(ln(target/2pi) / ln(trained/2pi))  = {p['critical_theta']:.6g}",
        f"  critical dimension of theta {p['theta']:.6g} at {p['trained']:,} tokens: "
        f"{p['critical_dimension']} of {d} dims (2*ceil(d/2 * log_theta(trained/2pi))): the pairs beyond it never "
        "completed a rotation in training",
        "",
    ]
    y = p["yarn"]
    lo, hi = y["correction_range_pairs"]
    lines += [
        f"YaRN for factor {y['factor']:.6g} (original_max_position_embeddings {y['original_max_position_embeddings']:,}, "
        f"beta_fast {y['beta_fast']:g}, beta_slow {y['beta_slow']:g})",
        f"  correction range: pair index {lo} .. {hi} (pairs below keep theta; pairs above are interpolated by 1/s; "
        "linear blend between)",
        f"  attention factor 0.1*ln(s) + 1 = {y['attention_factor']:.6g} (multiplies cos and sin)",
        "",
        f"per pair, rope type {p['rope_type']!r} (effective theta {p['effective_theta']:.6g}, "
        f"attention scaling {p['attention_scaling']:.6g})",
    ]
    header = f"  {'pair':>4}  {'dims':>9}  {'inv_freq':>11}  {'wavelength':>12}  {'rot@trained':>12}  {'rot@target':>12}"
    yarn = p["rope_type"] == "yarn"
    if yarn:
        header += f"  {'yarn keep':>9}"
    lines += [header + "  note"]
    for r in p["pairs"]:
        note = ""
        if r["rotations_target"] < 1:
            note = "never completes a rotation (trained or target)"
        elif r["rotations_trained"] < 1:
            note = "never completes a rotation in training"
        row = (f"  {r['pair']:>4}  {r['dims'][0]:>4},{r['dims'][1]:>4}  {r['inv_freq']:>11.4e}  "
               f"{r['wavelength']:>12.5g}  {r['rotations_trained']:>12.5g}  {r['rotations_target']:>12.5g}")
        if yarn:
            row += f"  {r['yarn_extrapolation']:>9.3f}"
        lines.append(row + ("  " + note if note else ""))
    lines += [
        f"  never complete a rotation within the trained length: {_span(p['pairs_never_rotating_in_trained'])}",
        f"  never complete a rotation within the target length:  {_span(p['pairs_never_rotating_in_target'])}",
        "",
    ]
    e = p["table_angle_error_at_target"]
    where = (f"{e['positions_evaluated']:,} positions sampled in [0, {p['target']:,})" if e["sampled"]
             else f"all {e['positions_evaluated']:,} positions")
    lines.append(f"angle error of cos/sin at the target length ({where}; rad, against float64)")
    labels = {"fp32_table": "fp32 table (fp32 position*inv_freq, fp32 cos/sin)",
              "bf16_table": "bf16 table (the fp32 table rounded to bf16)",
              "ring_attn_kernel": "apply_rope's math (fp64 angle, mod 2pi, fp32 cos/sin)"}
    for key, label in labels.items():
        r = e[key]
        lines.append(f"  {label:<58} max {r['max_rad']:.3e}  mean {r['mean_rad']:.3e}  "
                     f"(worst at position {r['worst_position']:,}, pair {r['worst_pair']})")
    return "\n".join(lines)


def plot_plan(p: dict, path: str) -> str:
    """Wavelength per pair (log scale) of the original theta and the chosen scheme, with both lengths marked.
    Returns the file written: ``path``, with ``.png`` added when it has no extension (as matplotlib does)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib, which is not installed: pip install 'ring-attn[bench]' "
                           "(or pip install matplotlib)") from exc
    pairs = [r["pair"] for r in p["pairs"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.semilogy(pairs, [r["original_wavelength"] for r in p["pairs"]], label=f"theta {p['theta']:.3g}")
    if p["rope_type"] != "default":
        ax.semilogy(pairs, [r["wavelength"] for r in p["pairs"]], label=f"{p['rope_type']}")
    ax.axhline(p["trained"], color="tab:green", ls="--", label=f"trained {p['trained']:,}")
    ax.axhline(p["target"], color="tab:red", ls="--", label=f"target {p['target']:,}")
    ax.set_xlabel("dimension pair i")
    ax.set_ylabel("wavelength 2*pi/inv_freq (tokens)")
    ax.set_title(f"RoPE wavelengths, rotary dim {p['rotary_dim']}")
    ax.legend()
    fig.tight_layout()
    if not os.path.splitext(path)[1]:
        path += ".png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    p = plan(args.head_dim, args.theta, args.trained, args.target, args.rope_type, args.partial_rotary_factor,
             args.beta_fast, args.beta_slow)
    written = plot_plan(p, args.plot) if args.plot else None
    if args.json:
        print(json.dumps(json_safe(p), indent=2))  # an infinite wavelength (inv_freq 0) becomes null
    else:
        print(format_plan(p))
        if args.plot:
            print(f"\nplot written to {written}")
    return 0
