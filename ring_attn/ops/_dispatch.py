"""Which route a call of a public op takes: its registered ``torch.library`` custom op, or (eagerly) a plain
autograd Function over the same implementation.

The custom ops are what torch.compile, export, FakeTensor and dispatch modes understand. Eagerly their machinery
(dispatcher, the autograd wrapper of ``register_autograd``, the dynamo guard around the implementation) costs
more host time than the rest of a call (``benchmarks/bench_overhead.py``), and a decoding step or a short
sequence is host-bound, so the ops take the Function there: the same implementation functions, the same bits.
"""
from __future__ import annotations

import torch

try:  # an active TorchDispatchMode (FakeTensorMode, proxy tracing, selective checkpointing): the custom op
    from torch.utils._python_dispatch import _get_current_dispatch_mode as _dispatch_mode
except ImportError:  # pragma: no cover - a torch without it: always the custom op
    def _dispatch_mode():
        return True

__all__ = ["traced"]


def traced(*tensors) -> bool:
    """True when the call is being traced (torch.compile, export, torch.jit.trace), runs under a dispatch mode
    (FakeTensor, proxy tracing, selective activation checkpointing) or on tensor subclasses (FakeTensor, DTensor,
    ...): then the registered custom op must run. ``tensors``: the call's tensor arguments (None entries are
    skipped)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _dispatch_mode() is not None:
        return True
    return any(t is not None and type(t) is not torch.Tensor for t in tensors)
