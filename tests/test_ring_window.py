"""Sliding windows, softcap and ALiBi through the ring: the plans against global masks (brute force, no
kernels), and ring_attn_func / ring_attn_varlen_func with window_size / softcap / alibi_slopes on gloo (W = 2, 3)
against single-device flash_attn_func on the whole sequence, for every layout (ALiBi included: striped runs
its pieces with slopes times W and a shifted LSE; forward, LSE and gradients)."""
import itertools

import pytest
import torch

from ring_attn.ring import attention as ring_mod
from ring_attn.ring.layout import shard_index


def _protocol_mask(n_q, n_k, causal, offset, window):
    i = torch.arange(n_q)[:, None]
    j = torch.arange(n_k)[None, :]
    off = n_k - n_q if offset is None else offset
    m = torch.ones(n_q, n_k, dtype=torch.bool)
    if causal:
        m &= j <= i + off
    if window[0] >= 0:
        m &= j >= i + off - window[0]
    if window[1] >= 0:
        m &= j <= i + off + window[1]
    return m


def _check_plan(plan, layout, windows, check_distance=False, n_locals=(2, 4, 6)):
    """For W 1..4, local lengths 2..6, causal or not and each window: at every (rank, src) pair the union of
    ``plan``'s pieces (each masked as the kernels mask it) is the global windowed mask restricted to (rank's
    queries, src's keys), no query/key pair is computed twice, and with ``check_distance`` every computed pair's
    kernel distance ``|i + offset - j|`` (local rows of the piece) is its global distance ``|q - k|``."""
    for world, n_local, causal, window in itertools.product((1, 2, 3, 4), n_locals, (False, True), windows):
        if causal and window[1] >= 0:
            window = (window[0], -1)  # what ring_attn_func normalises to
        S = n_local * world
        glob = _protocol_mask(S, S, causal, 0, window)
        half = n_local // 2
        rows = {"all": slice(None), "first": slice(None, half), "second": slice(half, None)}
        for rank, src in itertools.product(range(world), range(world)):
            where = (layout, world, n_local, causal, window, rank, src)
            pos_q, pos_k = shard_index(S, rank, world, layout), shard_index(S, src, world, layout)
            got = torch.zeros(n_local, n_local, dtype=torch.int32)
            for p in plan(layout, causal, rank, src, window, world, n_local):
                qi, ki = torch.arange(n_local)[rows[p.q_part]], torch.arange(n_local)[rows[p.k_part]]
                m = _protocol_mask(len(qi), len(ki), p.causal, p.offset, p.window)
                got[qi[:, None], ki[None, :]] += m.int()
                if check_distance:  # striped: the kernel runs slopes times W, the LSE shifted by alibi_shift
                    i, j = torch.arange(len(qi))[:, None], torch.arange(len(ki))[None, :]
                    true = (pos_q[qi][:, None] - pos_k[ki][None, :]).abs()
                    step = world if layout == "striped" else 1
                    assert p.alibi_shift >= 0 and (layout == "striped" or p.alibi_shift == 0), where + (p,)
                    kernel = step * (i + p.offset - j).abs() + p.alibi_shift
                    assert torch.equal(kernel[m], true[m]), where + (p,)
            assert got.max() <= 1, where + ("pair computed twice",)
            assert torch.equal(got.bool(), glob[pos_q][:, pos_k]), where


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_window_plan_covers_exactly_the_global_mask(layout):
    _check_plan(ring_mod._plan, layout, [(0, 0), (1, -1), (3, 0), (-1, 2), (5, 5), (2, 7), (9, -1), (0, -1), (-1, 0),
                                         (13, 1)])


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_alibi_plan_covers_the_global_mask_with_exact_distances(layout):
    _check_plan(ring_mod._alibi_plan, layout, [(-1, -1), (0, 0), (1, -1), (3, 0), (-1, 2), (5, 5), (9, -1), (0, -1),
                                               (-1, 0), (2, 7), (13, 1)], check_distance=True,
                n_locals=(1, 2, 3, 5, 6) if layout == "striped" else (2, 4, 6))


# ---------------------------------------------------------------------------------- gloo, W = 2 and 3

from ring_window_workers import cases_for  # noqa: E402

WORLDS = (2, 3)
FP32_TOL = 2e-5  # relative to max(1, |reference|): fp32 ring vs fp32 single device (a different sum order)


@pytest.fixture(scope="module")
def window_worlds(tmp_path_factory):
    from ring_window_workers import run_world

    return {w: run_world(w, str(tmp_path_factory.mktemp(f"ring_window_w{w}"))) for w in WORLDS}


@pytest.mark.parametrize("world,name", [(w, c["name"]) for w in WORLDS for c in cases_for(w)])
def test_ring_window_and_softcap_match_single_device(window_worlds, world, name):
    for rank, res in enumerate(window_worlds[world]):
        r = res[name]
        assert "error" not in r, f"rank {rank}:\n{r.get('error')}"
        for key, (err, same_inf) in r["errors"].items():
            assert same_inf, f"rank {rank} {key}: rows that see no key differ from single device"
            assert err <= FP32_TOL, f"rank {rank} {key}: relative error {err:.2e} vs single-device flash_attn_func"
