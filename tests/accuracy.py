"""The accuracy rule, in one place (docs/design.md, after flash-attention's tests).

A kernel passes when its max error against the float64 oracle is at most ``factor`` times the max error of a
plain-torch computation in the same low precision (2 for outputs, 3 for gradients), plus a small floor that
scales with the oracle's magnitude.
"""
import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
FORWARD, BACKWARD = 2.0, 3.0


def max_err(x: torch.Tensor, oracle: torch.Tensor) -> float:
    return (x.detach().double().cpu() - oracle.detach().double().cpu()).abs().max().item() if x.numel() else 0.0


def assert_within_rule(name, got, oracle, baseline, dtype, factor, floor_scale=1.0):
    """``got``: kernel result; ``oracle``: float64 reference; ``baseline``: plain torch in ``dtype``."""
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != oracle {tuple(oracle.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    err, base = max_err(got, oracle), max_err(baseline, oracle)
    scale = max(1.0, oracle.abs().max().item()) if oracle.numel() else 1.0
    bound = factor * base + FLOOR[dtype] * floor_scale * scale
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (plain {dtype} torch: {base:.3e})"
