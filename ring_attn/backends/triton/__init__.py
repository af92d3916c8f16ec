"""The Triton backend: flash-attention kernels (forward with fp32 merge, delta, backward) and fused RoPE.

Runs on CUDA tensors, and on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1`` set before
``ring_attn`` is imported). Imports Triton unconditionally: ``ring_attn.backends.select`` imports this module
only when it picks it. Implements the protocol of ``ring_attn/backends/protocol.py``.
"""
import functools

import torch

from ring_attn.backends.triton import attention as _attention, rope as _rope
from ring_attn.backends.triton.attention import bwd_blocks

NAME = "triton"


def on_tensor_device(fn):
    """Run ``fn`` with its first tensor argument's CUDA device as the current device. Triton launches on the
    *current* device and stream, so without this a call on ``cuda:1`` tensors from a process whose current
    device is ``cuda:0`` (e.g. a model spread over GPUs with ``device_map="auto"``) would launch on the wrong
    GPU. CPU tensors (the interpreter) and calls already on the right device pass straight through."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is not None and t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return run


attention_forward = on_tensor_device(_attention.attention_forward)
attention_delta = on_tensor_device(_attention.attention_delta)
attention_backward = on_tensor_device(_attention.attention_backward)
rope = on_tensor_device(_rope.rope)

__all__ = ["NAME", "attention_forward", "attention_delta", "attention_backward", "rope", "bwd_blocks",
           "on_tensor_device"]
