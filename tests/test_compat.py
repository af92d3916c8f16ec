"""ring_attn.compat: ring-flash-attn's names, signatures and return conventions, on real gloo groups.

The distributed cases run inside the shared worker groups (tests/ring_workers.py::_compat_case, spawned once
per session by tests/conftest.py): ring-flash-attn's own test pattern (qkv-packed, keywords,
``return_attn_probs=True``, inputs sharded with its tests' ``extract_local``), the q/k/v form positionally and
the kv-packed form, dense and varlen, causal and not. Here they are checked against the float64 oracle.
"""
import inspect

import pytest
import torch

from accuracy import BACKWARD, FORWARD, assert_within_rule
from ring_attn import compat, reference
from ring_workers import COMPAT_FAMILIES, cases_for

WORLDS = (1, 2, 3, 4)

# ring-flash-attn's public functions (ring_flash_attn/__init__.py) and their parameters, in order, with
# defaults (from its source): switching must be an import change
_DENSE = ["dropout_p=0.0", "softmax_scale=None", "causal=False", "window_size=(-1, -1)", "alibi_slopes=None",
          "deterministic=False", "return_attn_probs=False", "group=None"]
_VARLEN = ["cu_seqlens", "max_seqlen"] + _DENSE
RING_FLASH_ATTN_SIGNATURES = {}
for _base in ("ring_flash_attn", "zigzag_ring_flash_attn", "stripe_flash_attn"):
    RING_FLASH_ATTN_SIGNATURES[f"{_base}_func"] = ["q", "k", "v"] + _DENSE
    RING_FLASH_ATTN_SIGNATURES[f"{_base}_kvpacked_func"] = ["q", "kv"] + _DENSE
    RING_FLASH_ATTN_SIGNATURES[f"{_base}_qkvpacked_func"] = ["qkv"] + _DENSE
    if _base != "stripe_flash_attn":  # ring-flash-attn has no stripe varlen form
        RING_FLASH_ATTN_SIGNATURES[f"{_base}_varlen_func"] = ["q", "k", "v"] + _VARLEN
        RING_FLASH_ATTN_SIGNATURES[f"{_base}_varlen_kvpacked_func"] = ["q", "kv"] + _VARLEN
        RING_FLASH_ATTN_SIGNATURES[f"{_base}_varlen_qkvpacked_func"] = ["qkv"] + _VARLEN


@pytest.mark.parametrize("name", sorted(RING_FLASH_ATTN_SIGNATURES))
def test_same_name_and_signature_as_ring_flash_attn(name):
    fn = getattr(compat, name)
    params = [str(p) for p in inspect.signature(fn).parameters.values()]
    assert params == RING_FLASH_ATTN_SIGNATURES[name]
    assert fn.__doc__
    assert name in compat.__all__
    assert set(compat.__all__) == set(RING_FLASH_ATTN_SIGNATURES)


def _oracle_qkv(qkv, dout, causal, dtype, cu=None):
    """reference.attention on packed qkv in ``dtype``: out, lse, dqkv (float64 = the oracle; float32 = plain
    torch, the baseline of the accuracy rule)."""
    x = qkv.detach().to(dtype, copy=True).requires_grad_()
    if cu is None:
        out, lse = reference.attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], None, causal, compute_dtype=dtype)
    else:
        starts, lens = cu[:-1], cu[1:] - cu[:-1]
        out, lse = reference.attention_varlen(x[:, 0], x[:, 1], x[:, 2], starts, lens, starts, lens, None, causal,
                                              compute_dtype=dtype)
    (out.double() * dout.double()).sum().backward()
    return dict(out=out.detach(), lse=lse.detach(), dqkv=x.grad)


# ring-flash-attn has no varlen form of stripe attention (nor has ring_attn.compat)
_FORMS = [(f, kind) for f in sorted(COMPAT_FAMILIES) for kind in ("dense", "varlen")
          if kind == "dense" or COMPAT_FAMILIES[f][2] is not None]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("family,kind", _FORMS)
def test_ring_flash_attn_test_pattern_matches_the_oracle(ring_worlds, world, family, kind):
    name = next(c["name"] for c in cases_for(world) if c["kind"] == "compat")
    results = [ring_worlds[world][r][name] for r in range(world)]
    for r, st in enumerate(results):
        assert "error" not in st, f"rank {r} failed:\n{st['error']}"
        # their extract_local shards exactly like ring_attn.shard / shard_varlen with our layout names
        assert st["extract_local_matches_shard"][family + ("_varlen" if kind == "varlen" else "")] is True
    inp = results[0]["inputs"]
    for causal in (False, True):
        for r, st in enumerate(results):
            got = st["results"][(kind, family, causal)]
            assert got["none"] is True  # return_attn_probs=True -> (out, lse, None)
            assert got["same_across_forms"] is True, (r, causal)  # qkv-packed == q/k/v == kv-packed, bitwise
        got = results[0]["results"][(kind, family, causal)]["gathered"]
        qkv, dout, cu = (inp["qkv"], inp["dout"], None) if kind == "dense" else (inp["pqkv"], inp["pdout"], inp["cu"])
        oracle = _oracle_qkv(qkv, dout, causal, torch.float64, cu)
        base = _oracle_qkv(qkv, dout, causal, torch.float32, cu)
        what = f"{family} {kind} causal={causal}"
        assert_within_rule(f"{what} out", got["out"], oracle["out"], base["out"], torch.float32, FORWARD,
                           floor_scale=world)
        assert_within_rule(f"{what} lse", got["lse"], oracle["lse"], base["lse"], torch.float32, FORWARD,
                           floor_scale=world)
        assert_within_rule(f"{what} dqkv", got["dqkv"], oracle["dqkv"], base["dqkv"], torch.float32, BACKWARD,
                           floor_scale=world)


def test_compat_refuses_without_a_process_group():
    """Before init_process_group: the same RuntimeError as ring_attn_func, not an obscure failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        compat.zigzag_ring_flash_attn_func(q, q, q, causal=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        compat.ring_flash_attn_varlen_func(q[0], q[0], q[0], torch.tensor([0, 4], dtype=torch.int32), 4)
