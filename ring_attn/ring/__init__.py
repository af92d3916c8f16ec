"""Ring attention over torch.distributed: layouts (``layout``), P2P ring (``comm``), the op (``attention``)."""
from ring_attn.ring.attention import ring_attn_func, ring_attn_varlen_func
from ring_attn.ring.comm import RingComm
from ring_attn.ring.layout import (
    shard,
    shard_positions,
    shard_varlen,
    unshard,
    unshard_varlen,
    varlen_local_cu_seqlens,
    varlen_positions,
)

__all__ = [
    "ring_attn_func",
    "ring_attn_varlen_func",
    "RingComm",
    "shard",
    "unshard",
    "shard_positions",
    "shard_varlen",
    "unshard_varlen",
    "varlen_local_cu_seqlens",
    "varlen_positions",
]
