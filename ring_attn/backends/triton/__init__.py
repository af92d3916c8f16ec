"""The Triton backend: flash-attention kernels (forward with fp32 merge, delta, backward) and fused RoPE.

Runs on CUDA tensors, and on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1`` set before
``ring_attn`` is imported). Imports Triton unconditionally: ``ring_attn.backends.select`` imports this module
only when it picks it. Implements the protocol of ``ring_attn/backends/protocol.py``.
"""
from ring_attn.backends.triton.attention import attention_backward, attention_delta, attention_forward, bwd_blocks
from ring_attn.backends.triton.rope import rope

NAME = "triton"

__all__ = ["NAME", "attention_forward", "attention_delta", "attention_backward", "rope", "bwd_blocks"]
