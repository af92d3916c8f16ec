"""Which implementation runs an op: the Triton kernels, or the plain-torch reference.

Capabilities are data: each backend says what it supports, and :func:`select` returns the first backend
whose ``not_supported_reasons`` is empty, raising with every reason otherwise.

* ``"triton"``: CUDA tensors; CPU tensors only when the Triton interpreter is on
  (``TRITON_INTERPRET=1`` set before ``ring_attn`` is imported). Triton must be importable.
* ``"reference"``: plain torch (``ring_attn.reference``) in fp32 math on any device; the CPU fallback.
* A native CPU extension (``csrc/``) will slot in between the two when it exists.

``RING_ATTN_BACKEND=triton|reference`` (or :func:`force`) pins the choice, e.g. to run the reference on a
GPU for debugging, or the interpreter-free reference on CPU for fast distributed tests.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch

BACKENDS = ("triton", "reference")
_forced: str | None = None


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported platform
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def not_supported_reasons(backend: str, device: torch.device) -> list[str]:
    """Why ``backend`` cannot run an op on ``device`` (empty list: it can)."""
    reasons: list[str] = []
    if backend == "triton":
        if not triton_available():
            reasons.append("triton: the triton package is not importable")
        if device.type == "cpu" and not interpreter_enabled():
            reasons.append("triton: CPU tensors need TRITON_INTERPRET=1 (set before importing ring_attn)")
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"triton: device type {device.type!r} is not supported (expected cuda or cpu)")
    elif backend == "reference":
        pass  # plain torch runs wherever torch does
    else:
        reasons.append(f"unknown backend {backend!r} (expected one of {BACKENDS})")
    return reasons


def forced() -> str | None:
    """The backend pinned by :func:`force` or ``RING_ATTN_BACKEND``, if any."""
    name = _forced or os.environ.get("RING_ATTN_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"RING_ATTN_BACKEND={name!r} is not a backend; expected one of {BACKENDS}")
    return name


def select(device: torch.device) -> str:
    """The backend that will run an op whose tensors live on ``device``."""
    pinned = forced()
    candidates = (pinned,) if pinned else BACKENDS
    all_reasons: list[str] = []
    for name in candidates:
        reasons = not_supported_reasons(name, device)
        if not reasons:
            return name
        all_reasons += reasons
    raise RuntimeError(f"no ring_attn backend can run on {device}: " + "; ".join(all_reasons))


@contextlib.contextmanager
def force(name: str | None) -> Iterator[None]:
    """Pin the backend inside a ``with`` block (``None`` restores automatic selection)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous
