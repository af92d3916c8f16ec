"""Layouts of the ring (ring_attn/ring/layout.py): permutations, positions, padding errors, varlen sharding.

Pure functions only (no process group); the distributed shard/unshard round trip runs in test_ring.py.
"""
import gc
import weakref

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ring_attn.ring import layout as L

LAYOUTS = ["contiguous", "zigzag", "striped"]


def _seqlen(draw, world, layout, max_chunks=6):
    m = 2 * world if layout == "zigzag" else world
    return m * draw(st.integers(0, max_chunks))


@st.composite
def dense_case(draw):
    world = draw(st.integers(1, 7))
    layout = draw(st.sampled_from(LAYOUTS))
    s = _seqlen(draw, world, layout)
    shape = [draw(st.integers(1, 3)), s, draw(st.integers(1, 2))]
    dim = 1
    if draw(st.booleans()):  # token dim first
        shape = [s, shape[0], shape[2]]
        dim = 0
    return world, layout, shape, dim


@given(dense_case())
def test_shard_unshard_round_trip(case):
    world, layout, shape, dim = case
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    shards = [L.shard_for_rank(x, r, world, dim, layout) for r in range(world)]
    for sh in shards:
        assert sh.shape[dim] == shape[dim] // world
    assert torch.equal(L.unshard_from_shards(shards, dim, layout), x)


@given(st.integers(1, 9), st.sampled_from(LAYOUTS), st.integers(0, 5))
def test_index_is_a_partition_with_increasing_local_order(world, layout, chunks):
    s = (2 * world if layout == "zigzag" else world) * chunks
    idx = [L.shard_index(s, r, world, layout) for r in range(world)]
    allidx = torch.cat(idx).sort().values
    assert torch.equal(allidx, torch.arange(s))
    for r, i in enumerate(idx):
        assert i.numel() == s // world
        assert bool((i[1:] > i[:-1]).all()), "global positions must increase with the local index"
        assert torch.equal(L.shard_positions(s, r, world, layout, offset=7), i + 7)


def test_layouts_match_design_definitions():
    s, w = 24, 3
    assert L.shard_index(s, 1, w, "contiguous").tolist() == list(range(8, 16))
    # zigzag: 6 chunks of 4; rank 1 holds chunks 1 and 4
    assert L.shard_index(s, 1, w, "zigzag").tolist() == [4, 5, 6, 7, 16, 17, 18, 19]
    assert L.shard_index(s, 1, w, "striped").tolist() == [1, 4, 7, 10, 13, 16, 19, 22]
    assert L.shard_index(s, 0, 1, "zigzag").tolist() == list(range(24))


@pytest.mark.parametrize("layout,s,w,needle", [
    ("zigzag", 10, 3, "multiple of 2 * world_size = 6; pad it with 2 token(s) to 12"),
    ("zigzag", 6, 2, "pad it with 2 token(s) to 8"),
    ("striped", 10, 4, "multiple of world_size = 4; pad it with 2 token(s) to 12"),
    ("contiguous", 7, 3, "pad it with 2 token(s) to 9"),
])
def test_unsplittable_length_says_which_padding(layout, s, w, needle):
    # the exact permutation of a length refuses; shard_for_rank pads instead (below)
    with pytest.raises(ValueError, match="cannot be split") as e:
        L.shard_index(s, 0, w, layout)
    assert needle in str(e.value)


@given(st.integers(1, 7), st.sampled_from(LAYOUTS), st.integers(0, 30), st.booleans())
def test_any_length_pads_at_the_end_and_unshard_drops_it(world, layout, s, token_first):
    """shard_for_rank pads to padded_length with pad_value; the real tokens of every shard are the prefixes
    valid_counts says; unshard_from_shards(seqlen=s) gives x back exactly."""
    shape, dim = ([s, 2, 3], 0) if token_first else ([2, s, 3], 1)
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) + 1  # no zeros
    padded = L.padded_length(s, world, layout)
    m = 2 * world if layout == "zigzag" else world
    assert padded % m == 0 and s <= padded < s + m
    shards = [L.shard_for_rank(x, r, world, dim, layout, pad_value=-7.0) for r in range(world)]
    for r, sh in enumerate(shards):
        n = padded // world
        assert sh.shape[dim] == n
        real = (sh != -7.0).all(dim=tuple(i for i in range(3) if i != dim))
        total, first, second = L.valid_counts(s, r, world, layout)
        assert real.tolist() == [True] * total + [False] * (n - total)
        half = n // 2
        assert real[:half].tolist() == [True] * first + [False] * (half - first)
        assert real[half:].tolist() == [True] * second + [False] * (n - half - second)
        # the positions of the padded shard: real ones < s, padding >= s, increasing
        pos = L.shard_positions(s, r, world, layout)
        assert bool((pos[:total] < s).all()) and bool((pos[total:] >= s).all())
    assert torch.equal(L.unshard_from_shards(shards, dim, layout, seqlen=s), x)
    assert L.unshard_from_shards(shards, dim, layout).shape[dim] == padded
    assert L.recorded_padding(layout, world, padded) == (s if padded != s else None)


def test_shard_info_knows_each_shard_exactly_and_holds_none_alive():
    """shard_info: the real length of the very tensor shard_for_rank made (and of its views), whatever was
    sharded since; nothing for tensors computed from it; the registry keeps nothing alive."""
    a = L.shard_for_rank(torch.randn(2, 13, 3), 1, 2, 1, "zigzag")  # 13 -> 16 tokens
    b = L.shard_for_rank(torch.randn(2, 16, 3), 1, 2, 1, "zigzag")  # really 16
    assert L.shard_info(a) == L.ShardInfo("zigzag", 2, 13, 16)
    assert L.shard_info(b) == L.ShardInfo("zigzag", 2, 16, 16)
    # the process-wide fallback only knows the most recent sequence sharded to 16 tokens (b: not padded)
    assert L.recorded_padding("zigzag", 2, 16) is None
    a.requires_grad_()  # the same tensor
    for view in (a, a.view(2, 24), a.transpose(0, 1), a[:, :4], a.unbind(0)[1], a[None].view(16, 3)):
        assert L.shard_info(view) == L.ShardInfo("zigzag", 2, 13, 16)
    for other in (a * 1, a.clone(), a.detach(), a.to(torch.float64), torch.randn(2, 8, 3), None, 3):
        assert L.shard_info(other) is None
    ref_a = weakref.ref(a)
    del a, view  # (the last view holds its base)
    gc.collect()
    assert ref_a() is None


def test_unshard_refuses_a_seqlen_the_shards_cannot_hold():
    shards = [L.shard_for_rank(torch.zeros(1, 13), r, 2, 1, "zigzag") for r in range(2)]  # padded to 16
    assert L.unshard_from_shards(shards, 1, "zigzag", seqlen=13).shape == (1, 13)
    for bad in (12, 17, 0, -1, 13.0, True):
        with pytest.raises(ValueError, match=r"seqlen must be the real global length.*\(12, 16\]"):
            L.unshard_from_shards(shards, 1, "zigzag", seqlen=bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="layout must be one of"):
        L.shard_index(8, 0, 2, "diagonal")
    with pytest.raises(ValueError, match="rank must be"):
        L.shard_index(8, 2, 2, "zigzag")
    with pytest.raises(ValueError, match="world_size"):
        L.shard_index(8, 0, 0, "zigzag")
    with pytest.raises(ValueError, match="dim 3 is out of range"):
        L.shard_for_rank(torch.zeros(2, 8), 0, 2, 3, "zigzag")
    with pytest.raises(ValueError, match="one shape"):
        L.unshard_from_shards([torch.zeros(1, 2), torch.zeros(1, 3)], 1, "zigzag")


@st.composite
def varlen_case(draw):
    world = draw(st.integers(1, 5))
    layout = draw(st.sampled_from(LAYOUTS))
    m = 2 * world if layout == "zigzag" else world
    lens = draw(st.lists(st.integers(0, 4), min_size=1, max_size=5))
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + m * n)
    return world, layout, torch.tensor(cu, dtype=torch.int32)


@given(varlen_case())
def test_varlen_round_trip_and_positions(case):
    world, layout, cu = case
    total = int(cu[-1])
    x = torch.randn(total, 2, 3)
    shards = [L.varlen_shard_for_rank(x, cu, r, world, 0, layout) for r in range(world)]
    assert torch.equal(L.varlen_unshard_from_shards(shards, cu, 0, layout), x)
    local_cu = L.varlen_local_cu_seqlens(cu, world, layout)
    assert local_cu.dtype == torch.int32 and torch.equal(local_cu * world, cu)
    for r in range(world):
        pos = L.varlen_positions(cu, r, world, layout)
        idx = L.varlen_shard_index(cu, r, world, layout)
        # each sequence's part is that sequence sharded by the dense layout
        for i in range(len(cu) - 1):
            a, b = int(local_cu[i]), int(local_cu[i + 1])
            n = int(cu[i + 1] - cu[i])
            assert torch.equal(pos[a:b], L.shard_index(n, r, world, layout))
            assert torch.equal(idx[a:b], int(cu[i]) + pos[a:b])


@given(st.integers(1, 5), st.sampled_from(LAYOUTS), st.lists(st.integers(0, 13), min_size=1, max_size=5))
def test_varlen_any_lengths_pad_each_sequence(world, layout, lens):
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    x = torch.randn(int(cu[-1]), 2) + 100  # never equal to the pad value
    shards = [L.varlen_shard_for_rank(x, cu, r, world, 0, layout, pad_value=0.0) for r in range(world)]
    assert torch.equal(L.varlen_unshard_from_shards(shards, cu, 0, layout), x)
    padded = L.varlen_padded_cu_seqlens(cu, world, layout)
    local_cu = L.varlen_local_cu_seqlens(cu, world, layout).tolist()
    assert local_cu == [p // world for p in padded]
    for r, sh in enumerate(shards):
        assert sh.shape[0] == local_cu[-1]
        pos = L.varlen_positions(cu, r, world, layout)
        for i, n in enumerate(lens):
            a, b = local_cu[i], local_cu[i + 1]
            real = (sh[a:b, 0] != 0).tolist()
            total = L.valid_counts(n, r, world, layout)[0]
            assert real == [True] * total + [False] * (b - a - total)
            assert bool((pos[a:a + total] < n).all()) and bool((pos[a + total:b] >= n).all())


def test_varlen_error_names_the_sequence():
    cu = torch.tensor([0, 8, 18], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"sequence 1 .* has length 10 cannot be split.*pad it with 2"):
        L.check_varlen_divisible(cu, 2, "zigzag")
    with pytest.raises(ValueError, match="non-decreasing"):
        L.varlen_shard_index([0, 4, 2], 0, 2, "contiguous")
