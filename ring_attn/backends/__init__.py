"""Backends: one module per implementation behind one launcher protocol (``protocol.py``), chosen per call.

* ``"triton"`` (``ring_attn.backends.triton``): CUDA tensors; CPU tensors only under the Triton interpreter
  (``TRITON_INTERPRET=1`` set before ``ring_attn`` is imported). Needs an importable ``triton``.
* ``"native"`` (``ring_attn.backends.native``): the C++17/OpenMP CPU extension ``ring_attn._C`` (built from
  ``csrc/`` by ``pip install``); CPU tensors use it whenever it imports (and the Triton interpreter is off).
  When it does not import, CPU ops warn once, naming the reason, and run on the reference.
* ``"reference"`` (``ring_attn.backends.reference``): plain torch (``ring_attn.reference``) in fp32 math on
  any device; the fallback.

What each backend supports is data: :data:`CAPABILITIES` maps ``(backend, op)`` to a :class:`Capability`
(ops: ``"attention"`` — forward with merge, delta, backward — and ``"rope"``). :func:`not_supported_reasons`
lists why a backend cannot run given inputs; :func:`select` returns the module of the first backend in
:data:`BACKENDS` order with no reason, importing it only then, and raises with every reason otherwise.
``RING_ATTN_BACKEND=triton|native|reference`` or :func:`force` pins the choice (an error if the pinned
backend cannot run the inputs). A CUDA tensor that falls back to the reference warns once.
:func:`backend_info` (``ring_attn.backend_info``) reports the choice and the reasons for given inputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import warnings
from types import ModuleType
from typing import Iterator, Optional

import torch

__all__ = [
    "BACKENDS",
    "OPS",
    "Capability",
    "CAPABILITIES",
    "triton_available",
    "interpreter_enabled",
    "backward_mode",
    "forward_variant_mode",
    "autotune_mode",
    "check_tile_file",
    "check_kernel_settings",
    "check_deterministic",
    "native_available",
    "not_supported_reasons",
    "select",
    "forced",
    "force",
    "backend_info",
]

#: order of preference
BACKENDS = ("triton", "native", "reference")
OPS = ("attention", "rope")

_F16, _BF16, _F32, _F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


@dataclasses.dataclass(frozen=True)
class Capability:
    """What one backend supports for one op.

    ``devices``: device types (``None``: any device torch runs on). ``dtypes``: storage dtypes of the op's
    inputs. ``head_dim``: ``(min, max, multiple)``; ``max=None`` is unbounded (for RoPE this is the rotary
    dim). ``varlen``: packed sequences. ``merge``: the fp32 merge into a running (out, lse). ``deterministic``:
    bitwise-identical results for identical inputs. ``window``: sliding-window masks. ``softcap``: tanh
    logit soft-capping. ``alibi``: ALiBi slopes (flash-attn's ``alibi_slopes``). ``fp64``: float64 storage
    with float64 math (RoPE). ``dropout``: attention dropout (flash-attn's ``dropout_p``, the mask of
    ``ring_attn._contracts.Dropout``). ``paged``: the forward reads k/v through a page table
    (``ring_attn._contracts.KVPages``, flash-attn's ``block_table``) itself; for a backend without it the ops
    layer gathers each sequence's pages into contiguous rows first (same results, one extra copy).
    """

    devices: Optional[tuple[str, ...]]
    dtypes: tuple[torch.dtype, ...]
    head_dim: tuple[int, Optional[int], int]
    varlen: bool = True
    merge: bool = True
    deterministic: bool = True
    window: bool = False
    softcap: bool = False
    alibi: bool = False
    fp64: bool = False
    dropout: bool = False
    paged: bool = False


_ATTN_DTYPES = (_F16, _BF16, _F32)
_ROPE_DTYPES = (_F16, _BF16, _F32, _F64)

CAPABILITIES: dict[tuple[str, str], Capability] = {
    ("triton", "attention"): Capability(devices=("cuda", "cpu"), dtypes=_ATTN_DTYPES, head_dim=(1, 256, 1),
                                        window=True, softcap=True, alibi=True, dropout=True, paged=True),
    ("triton", "rope"): Capability(devices=("cuda", "cpu"), dtypes=_ROPE_DTYPES, head_dim=(2, None, 2),
                                   fp64=True),
    ("native", "attention"): Capability(devices=("cpu",), dtypes=_ATTN_DTYPES, head_dim=(1, None, 1),
                                        window=True, softcap=True, alibi=True, dropout=True),
    ("native", "rope"): Capability(devices=("cpu",), dtypes=_ROPE_DTYPES, head_dim=(2, None, 2), fp64=True),
    ("reference", "attention"): Capability(devices=None, dtypes=_ATTN_DTYPES, head_dim=(1, 256, 1),
                                           window=True, softcap=True, alibi=True, dropout=True),
    ("reference", "rope"): Capability(devices=None, dtypes=_ROPE_DTYPES, head_dim=(2, None, 2), fp64=True),
}

_forced: Optional[str] = None
_warned_fallback = False
_warned_native = False


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported platform
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# csrc/bindings.cpp's ABI_VERSION this package calls (2: attention entry points take the ALiBi slopes; 3: and
# the dropout; 4: attention_forward takes lse_f64, an fp64 running LSE to merge into)
_NATIVE_ABI = 4


@functools.lru_cache(maxsize=None)
def _native_import_error() -> Optional[str]:
    """None when ``ring_attn._C`` imports, else why not (``"ImportError: ..."``)."""
    try:
        mod = importlib.import_module("ring_attn._C")
    except Exception as exc:  # not built (no compiler at install time), or built for another Python/ABI
        return f"{type(exc).__name__}: {exc}"
    abi = getattr(mod, "ABI_VERSION", None)
    if abi != _NATIVE_ABI:  # a stale build from an older checkout: its entry points take other arguments
        return (f"ring_attn._C was built from older sources (ABI_VERSION {abi}, expected {_NATIVE_ABI}); "
                "rebuild it (pip install -e . or pip install .)")
    return None


def native_available() -> bool:
    """True when the native extension ``ring_attn._C`` imports."""
    return _native_import_error() is None


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _availability_reasons(backend: str, device: torch.device) -> list[str]:
    """Why ``backend`` cannot run at all on ``device`` here (installation, device), whatever the op."""
    reasons: list[str] = []
    if backend == "triton":
        if not triton_available():
            reasons.append("triton: the triton package is not importable")
        if device.type == "cpu" and not interpreter_enabled():
            reasons.append("triton: CPU tensors need TRITON_INTERPRET=1 (set before importing ring_attn)")
    elif backend == "native":
        if not native_available():
            reasons.append("native: the C++ extension ring_attn._C is not built")
    return reasons


def not_supported_reasons(backend: str, op: str, device, dtype: Optional[torch.dtype] = None,
                          head_dim: Optional[int] = None, *, varlen: bool = False, merge: bool = False,
                          window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                          alibi: bool = False, dropout: bool = False) -> list[str]:
    """Why ``backend`` cannot run ``op`` on these inputs; an empty list means it can.

    Args:
        backend: one of :data:`BACKENDS`.
        op: one of :data:`OPS`.
        device: ``torch.device`` (or a string) of the op's tensors.
        dtype: storage dtype of the inputs (None: not checked).
        head_dim: head dim for attention, rotary dim for RoPE (None: not checked).
        varlen, merge: whether the call is packed / merges into a running result.
        window, softcap: the attention mask window (``(-1, -1)`` = none) and logit soft-cap (0 = none).
        alibi: whether the call adds an ALiBi bias.
        dropout: whether the call has attention dropout.

    Returns:
        One ``"<backend>: <reason>"`` string per unmet requirement.
    """
    if backend not in BACKENDS:
        return [f"unknown backend {backend!r} (expected one of {BACKENDS})"]
    if op not in OPS:
        raise ValueError(f"op {op!r} is not one of {OPS}")
    device = torch.device(device)
    cap = CAPABILITIES[(backend, op)]
    reasons = _availability_reasons(backend, device)
    if cap.devices is not None and device.type not in cap.devices:
        reasons.append(f"{backend}: device type {device.type!r} is not supported for {op} "
                       f"(expected one of {', '.join(cap.devices)})")
    if dtype is not None and dtype not in cap.dtypes:
        reasons.append(f"{backend}: dtype {_dtype_name(dtype)} is not supported for {op} "
                       f"(expected one of {', '.join(_dtype_name(d) for d in cap.dtypes)})")
    if head_dim is not None:
        lo, hi, mult = cap.head_dim
        if head_dim < lo or (hi is not None and head_dim > hi) or head_dim % mult:
            reasons.append(f"{backend}: head dim {head_dim} is not supported for {op} (expected a multiple of "
                           f"{mult} in [{lo}, {'any' if hi is None else hi}])")
    if varlen and not cap.varlen:
        reasons.append(f"{backend}: packed (varlen) sequences are not supported for {op}")
    if merge and not cap.merge:
        reasons.append(f"{backend}: merging into a running (out, lse) is not supported for {op}")
    if tuple(window) != (-1, -1) and not cap.window:
        reasons.append(f"{backend}: window={tuple(window)} is not supported for {op}")
    if softcap and not cap.softcap:
        reasons.append(f"{backend}: softcap={softcap!r} is not supported for {op}")
    if alibi and not cap.alibi:
        reasons.append(f"{backend}: alibi_slopes (ALiBi) is not supported for {op}")
    if dropout and not cap.dropout:
        reasons.append(f"{backend}: dropout_p > 0 (attention dropout) is not supported for {op}")
    return reasons


_BACKWARD_MODES = {"": "", "two-kernel": "", "fused": "atomic", "fused-ordered": "ordered"}


def backward_mode() -> str:
    """The Triton backward asked for by ``RING_ATTN_BWD``: ``"atomic"`` (``fused``: the 5-matmul backward with
    dQ by unordered fp32 atomics, not bitwise reproducible), ``"ordered"`` (``fused-ordered``: dQ added in a
    fixed order, deterministic), or ``""`` (unset or ``two-kernel``, the default: the two deterministic
    kernels, until a GPU has measured the fused ones; see ``benchmarks/NOTES.md``). Raises ValueError for an
    unknown value."""
    mode = os.environ.get("RING_ATTN_BWD", "")
    if mode not in _BACKWARD_MODES:
        raise ValueError(f"RING_ATTN_BWD={mode!r}: expected 'fused-ordered', 'fused', 'two-kernel' or unset")
    return _BACKWARD_MODES[mode]


def forward_variant_mode() -> str:
    """The forward asked for by ``RING_ATTN_FWD``: ``"tma"`` (the tensor-descriptor, warp-specialised
    forward wherever it applies; anything else falls back to the pointer kernel), ``"pointer"`` (never
    the TMA variant), or ``""`` (default: the pointer kernel until a GPU has measured the TMA variant;
    see ``benchmarks/NOTES.md``). Unknown values raise ValueError."""
    mode = os.environ.get("RING_ATTN_FWD", "")
    if mode not in ("", "tma", "pointer"):
        raise ValueError(f"RING_ATTN_FWD={mode!r}: expected 'tma', 'pointer' or unset")
    return mode


def autotune_mode() -> bool:
    """``RING_ATTN_AUTOTUNE``: ``1`` picks the Triton forward's tile by timing; ``0`` or unset: the fixed tile
    table. Raises ValueError for any other value."""
    value = os.environ.get("RING_ATTN_AUTOTUNE", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"RING_ATTN_AUTOTUNE={value!r}: expected '1' (pick the forward's tile by timing), '0' or "
                         "unset (the fixed tile table)")
    return value == "1"


def check_tile_file() -> None:
    """``RING_ATTN_TILES``, when set and Triton is installed: the tile table is read and checked now
    (``ring_attn.backends.triton.tiles``; ValueError naming the variable and the record), not first inside a
    kernel launch. Without Triton no kernel reads it."""
    if not os.environ.get("RING_ATTN_TILES"):
        return
    try:
        tiles = importlib.import_module("ring_attn.backends.triton.tiles")
    except ImportError:
        return
    tiles.check_tile_file()


def check_kernel_settings() -> None:
    """The kernel settings ``RING_ATTN_BWD`` / ``RING_ATTN_FWD`` / ``RING_ATTN_AUTOTUNE`` / ``RING_ATTN_TILES``:
    ValueError for a malformed one, whichever backend runs the call (a misspelt switch is an error on the CPU
    too, not only where the Triton kernels read it). The block API (every attention call's way into a backend)
    and :func:`check_deterministic` call it."""
    backward_mode()
    forward_variant_mode()
    autotune_mode()
    check_tile_file()


def check_deterministic(deterministic: bool, name: str = "") -> None:
    """flash-attn's ``deterministic``: every backward here is bitwise deterministic except the opt-in
    ``RING_ATTN_BWD=fused``; asking for ``deterministic=True`` under it is a contradiction, refused (ValueError
    naming both) before anything runs, instead of silently giving run-to-run different gradients. Also checks
    the kernel settings at every call (:func:`check_kernel_settings`; in the ring, before any collective)."""
    check_kernel_settings()
    if backward_mode() == "atomic" and deterministic:
        raise ValueError(f"{name + ': ' if name else ''}deterministic=True, but RING_ATTN_BWD=fused selects the Triton backward with "
                         f"unordered fp32 atomics (not bitwise reproducible); unset RING_ATTN_BWD or use "
                         f"RING_ATTN_BWD=fused-ordered (the same 5-matmul backward, deterministic)")


def forced() -> Optional[str]:
    """The backend pinned by :func:`force` or ``RING_ATTN_BACKEND``, if any (ValueError for an unknown name)."""
    name = _forced or os.environ.get("RING_ATTN_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"RING_ATTN_BACKEND={name!r} is not a backend; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def force(name: Optional[str]) -> Iterator[None]:
    """Pin the backend inside a ``with`` block (``None`` lifts an enclosing ``force``'s pin; a
    ``RING_ATTN_BACKEND`` pin still applies). It is read when an op
    runs: around a ``torch.compile``'d call, not inside the compiled function (the graph runs after such a
    block has exited)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _choose(op: str, device, dtype, head_dim, **flags) -> tuple[Optional[str], dict[str, list[str]]]:
    """``(chosen name or None, {rejected backend: reasons})`` in order of preference, honouring a pin."""
    pinned = forced()
    rejected: dict[str, list[str]] = {}
    for name in ((pinned,) if pinned else BACKENDS):
        reasons = not_supported_reasons(name, op, device, dtype, head_dim, **flags)
        if not reasons:
            return name, rejected
        rejected[name] = reasons
    return None, rejected


def select(op: str, device, dtype: Optional[torch.dtype] = None, head_dim: Optional[int] = None, *,
           varlen: bool = False, merge: bool = False, window: tuple[int, int] = (-1, -1),
           softcap: float = 0.0, alibi: bool = False, dropout: bool = False) -> ModuleType:
    """The backend module that runs ``op`` on these inputs (imported now, on first use).

    Arguments as in :func:`not_supported_reasons`. The module has a ``NAME`` attribute and the functions of
    ``ring_attn/backends/protocol.py``.

    Raises:
        ValueError: ``RING_ATTN_BACKEND`` names no backend, or ``op`` is unknown.
        RuntimeError: no backend (or not the pinned one) supports the inputs; the message lists every reason.
    """
    global _warned_fallback
    device = torch.device(device)
    name, rejected = _choose(op, device, dtype, head_dim, varlen=varlen, merge=merge, window=window,
                             softcap=softcap, alibi=alibi, dropout=dropout)
    if name is None:
        pinned = forced()
        what = f"the pinned backend {pinned!r}" if pinned else "no ring_attn backend"
        raise RuntimeError(f"{what} cannot run {op} on {device} (dtype {dtype}, head dim {head_dim}): " +
                           "; ".join(r for rs in rejected.values() for r in rs))
    global _warned_native
    if (name == "reference" and device.type == "cpu" and forced() is None and not _warned_native
            and not native_available()):
        _warned_native = True
        warnings.warn("ring_attn: the native CPU extension ring_attn._C is not available "
                      f"({_native_import_error() or 'not built'}); CPU ops run on the slow plain-torch reference. "
                      "Reinstall ring-attn with a C++17 compiler with OpenMP (e.g. g++) present to build it "
                      "(pip install prints why the build was skipped).", RuntimeWarning, stacklevel=3)
    if name == "reference" and device.type != "cpu" and forced() is None and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"ring_attn: {op} on {device} falls back to the slow plain-torch reference backend: " +
                      "; ".join(r for rs in rejected.values() for r in rs), RuntimeWarning, stacklevel=3)
    return importlib.import_module(f"ring_attn.backends.{name}")


def backend_info(q: Optional[torch.Tensor] = None, *, device=None, dtype: Optional[torch.dtype] = None,
                 head_dim: Optional[int] = None, varlen: bool = False) -> dict:
    """Which backend each op would use for these inputs, and why the others were rejected.

    Args:
        q: a query tensor (``[b, s, h, d]`` or packed ``[t, h, d]``): its device, dtype and head dim are used
            (a 3-D q implies ``varlen=True``). Or give ``device`` (default cpu), ``dtype`` and ``head_dim``.
        varlen: ask about packed sequences.

    Returns:
        ``{"inputs": {...}, "pinned": name or None, "ops": {op: {"backend": name or None, "rejected":
        {backend: [reasons]}}}}`` for op in :data:`OPS`. For RoPE the head dim is taken as the rotary dim.
        ``backend`` is None when no backend can run the op (``select`` would raise).
    """
    if q is not None:
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor or None, got {type(q).__name__}")
        device, dtype, head_dim = q.device, q.dtype, q.shape[-1]
        varlen = varlen or q.dim() == 3
    device = torch.device("cpu" if device is None else device)
    pinned = forced()
    ops = {}
    for op in OPS:
        flags = dict(varlen=varlen and op == "attention")
        name, _ = _choose(op, device, dtype, head_dim, **flags)
        rejected = {}
        for other in BACKENDS:
            if other == name:
                continue
            reasons = not_supported_reasons(other, op, device, dtype, head_dim, **flags)
            if pinned is not None and other != pinned:
                reasons = [f"{other}: not the pinned backend ({pinned!r})"] + reasons
            elif not reasons:
                reasons = [f"{other}: supported, but {name!r} comes first in {BACKENDS}"]
            rejected[other] = reasons
        ops[op] = {"backend": name, "rejected": rejected}
    return {"inputs": {"device": str(device), "dtype": dtype, "head_dim": head_dim, "varlen": varlen},
            "pinned": pinned, "ops": ops}
