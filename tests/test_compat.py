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
    assert set(compat.__all__) == set(RING_FLASH_ATTN_SIGNATURES) | {
        "llama3_flash_attn_prepare_cu_seqlens", "llama3_flash_attn_varlen_func",
        "llama3_flash_attn_varlen_kvpacked_func", "llama3_flash_attn_varlen_qkvpacked_func",
        "substitute_hf_flash_attn", "update_ring_flash_attn_params", "use_ring_attn"}


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
            if kind == "dense":
                assert st["results"][("after_unrelated_shard", family)] is True
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


_LLAMA3 = ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "heads_k_stride",
           "local_k_slice"] + _DENSE


def test_llama3_names_and_signatures_are_ring_flash_attn_s():
    """ring-flash-attn's all-gather (llama3) functions, same parameters in the same order, with defaults."""
    want = {"llama3_flash_attn_varlen_func": _LLAMA3,
            "llama3_flash_attn_varlen_kvpacked_func": ["q", "kv"] + _LLAMA3[3:],
            "llama3_flash_attn_varlen_qkvpacked_func": ["qkv"] + _LLAMA3[3:],
            "llama3_flash_attn_prepare_cu_seqlens": ["cu_seqlens", "causal", "rank", "world_size"]}
    for name, params in want.items():
        assert [str(p) for p in inspect.signature(getattr(compat, name)).parameters.values()] == params, name
        assert name in compat.__all__ and getattr(compat, name).__doc__


def test_hf_adapter_names_and_signatures_are_ring_flash_attn_s():
    """ring-flash-attn's HF adapter (ring_flash_attn.adapters): same names, parameters and order; its
    flash_attention_2 entry takes transformers' AttentionInterface arguments."""
    from ring_attn.integrations import hf_adapter

    want = {"substitute_hf_flash_attn": ["process_group", "heads_k_stride"],
            "update_ring_flash_attn_params": ["cu_seqlens", "process_group"], "use_ring_attn": ["flag"]}
    for name, params in want.items():
        fn = getattr(compat, name)
        assert [p.name for p in inspect.signature(fn).parameters.values()] == params, name
        assert fn is getattr(hf_adapter, name) and fn.__doc__ and name in compat.__all__
    assert [p.name for p in inspect.signature(hf_adapter.flash_attention_forward).parameters.values()] == [
        "module", "query", "key", "value", "attention_mask", "dropout", "scaling", "sliding_window", "softcap",
        "kwargs"]


def test_hf_adapter_argument_errors():
    """Bad arguments raise naming them, before anything is registered; without torch.distributed the adapter
    says to initialize it."""
    with pytest.raises(TypeError, match="heads_k_stride"):
        compat.substitute_hf_flash_attn(None, 1.5)
    with pytest.raises(ValueError, match="heads_k_stride=0"):
        compat.substitute_hf_flash_attn(None, 0)
    with pytest.raises(TypeError, match="process_group"):
        compat.substitute_hf_flash_attn("world", 1)
    with pytest.raises(RuntimeError, match="init_process_group"):
        compat.substitute_hf_flash_attn(None, 1)
    with pytest.raises(RuntimeError, match="init_process_group"):
        compat.update_ring_flash_attn_params(torch.tensor([0, 4], dtype=torch.int32), None)
    with pytest.raises(TypeError, match="flag"):
        compat.use_ring_attn("yes")


def test_llama3_prepare_cu_seqlens():
    """Local boundaries of contiguous pieces: sequences cut by the pieces start at their true start on the key
    side (causal: keys end at the piece's end; non-causal: at the end of the last sequence)."""
    cu = torch.tensor([0, 5, 5, 17, 30, 36], dtype=torch.int32)
    cq, ck, mq, mk, ks = compat.llama3_flash_attn_prepare_cu_seqlens(cu, True, 1, 3)  # tokens 12..24
    assert cq.tolist() == [0, 5, 12] and ck.tolist() == [0, 12, 19] and (mq, mk) == (7, 12) and ks == slice(5, 24)
    cq, ck, mq, mk, ks = compat.llama3_flash_attn_prepare_cu_seqlens(cu, False, 1, 3)
    assert cq.tolist() == [0, 5, 12] and ck.tolist() == [0, 12, 25] and (mq, mk) == (7, 13) and ks == slice(5, 30)
    cq, ck, mq, mk, ks = compat.llama3_flash_attn_prepare_cu_seqlens(cu, True, 0, 3)  # the empty sequence stays
    assert cq.tolist() == [0, 5, 5, 12] and ck.tolist() == [0, 5, 5, 12] and ks == slice(0, 12)
    # empty sequences at a piece's first boundary stay, as in ring-flash-attn (its searchsorted finds the first
    # copy of the boundary); those at its last boundary go, as there (they were dropped at both ends)
    cu = torch.tensor([0, 6, 6, 6, 12, 12], dtype=torch.int32)
    cq, ck, mq, mk, ks = compat.llama3_flash_attn_prepare_cu_seqlens(cu, False, 1, 2)  # tokens 6..12
    assert cq.tolist() == [0, 0, 0, 6] and ck.tolist() == [0, 0, 0, 6] and (mq, mk) == (6, 6) and ks == slice(6, 12)
    cq, ck, mq, mk, ks = compat.llama3_flash_attn_prepare_cu_seqlens(cu, True, 0, 2)  # tokens 0..6
    assert cq.tolist() == [0, 6] and ck.tolist() == [0, 6] and ks == slice(0, 6)
    with pytest.raises(ValueError, match="equal pieces"):
        compat.llama3_flash_attn_prepare_cu_seqlens(cu, True, 0, 5)
    with pytest.raises(ValueError, match="non-decreasing"):
        compat.llama3_flash_attn_prepare_cu_seqlens(torch.tensor([0, 4, 2, 6]), True, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        compat.llama3_flash_attn_prepare_cu_seqlens(cu, True, 3, 3)


@pytest.mark.parametrize("world", WORLDS)
def test_llama3_matches_the_oracle(ring_worlds, world):
    """Every rank's contiguous piece, put back together, against the float64 oracle on the whole packed batch
    (causal and not, heads_k_stride 1 and 2, a causal window, causal ALiBi, softcap with a window; out, lse and
    every gradient); the packed call forms and a second run agree bitwise; a bad argument on one rank raises on
    every rank."""
    from ring_workers import LLAMA3_CONFIGS

    name = next(c["name"] for c in cases_for(world) if c["kind"] == "llama3")
    results = [ring_worlds[world][r][name] for r in range(world)]
    for r, st in enumerate(results):
        assert "error" not in st, f"rank {r} failed:\n{st['error']}"
        assert st["forms_agree"] == dict(kvpacked=True, qkvpacked=True, rerun=True), r
        assert st["raised"] is not None and st["raise_seconds"] < 60, (r, st["raised"])
        if r == 0:
            assert st["raised"][0] == "ValueError" and "heads_k_stride=3" in st["raised"][1]
        elif world > 1:
            assert st["raised"][0] == "ValueError" and "inconsistent" in st["raised"][1], st["raised"]
    inp = results[0]["inputs"]
    cu = inp["cu"]
    starts, lens = cu[:-1], cu[1:] - cu[:-1]
    for i, cfg in enumerate(LLAMA3_CONFIGS):
        got = {g: torch.cat([st["results"][i][g] for st in results], dim=1 if g == "lse" else 0)
               for g in ("out", "lse", "dq", "dk", "dv")}
        assert all(st["results"][i]["none"] for st in results)
        ref = {}
        for dtype in (torch.float64, torch.float32):
            x = [inp[n].detach().to(dtype, copy=True).requires_grad_() for n in ("q", "k", "v")]
            alibi = inp["slopes"].to(dtype) if cfg.get("alibi") else None
            out, lse = reference.attention_varlen(*x, starts, lens, starts, lens, None, cfg["causal"],
                                                  compute_dtype=dtype, window=cfg.get("window", (-1, -1)),
                                                  alibi_slopes=alibi, softcap=cfg.get("softcap", 0.0))
            (out.double() * inp["dout"].double()).sum().backward()
            ref[dtype] = dict(out=out.detach(), lse=lse.detach(), dq=x[0].grad, dk=x[1].grad, dv=x[2].grad)
        for g, rule in (("out", FORWARD), ("lse", FORWARD), ("dq", BACKWARD), ("dk", BACKWARD), ("dv", BACKWARD)):
            assert_within_rule(f"llama3 {cfg} {g}", got[g], ref[torch.float64][g], ref[torch.float32][g],
                               torch.float32, rule, floor_scale=world)


_LLAMA3_NCCL_SCRIPT = r"""
import sys, torch, torch.distributed as dist
dist.init_process_group("nccl", init_method="file://" + sys.argv[1], rank=0, world_size=1)
torch.cuda.set_device(0)
import ring_attn
from ring_attn import compat
worst = 0.0
cu = torch.tensor([0, 300, 300, 1100, 2048], dtype=torch.int32, device="cuda")
for causal in (True, False):
    for stride in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(2048, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(2048, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        do = torch.randn_like(q)
        a = [x.clone().requires_grad_() for x in (q, k, v)]
        b = [x.clone().requires_grad_() for x in (q, k, v)]
        cq, ck, mq, mk, ks = compat.llama3_flash_attn_prepare_cu_seqlens(cu, causal, 0, 1)
        o1 = compat.llama3_flash_attn_varlen_func(*a, cq, ck, mq, mk, stride, ks, causal=causal); o1.backward(do)
        o2 = ring_attn.flash_attn_varlen_func(*b, cu, cu, 1100 - 300, 1100 - 300, causal=causal); o2.backward(do)
        for x, y in [(o1, o2)] + [(p.grad, r.grad) for p, r in zip(a, b)]:
            worst = max(worst, ((x.float() - y.float()).abs().max() / y.float().abs().max()).item())
torch.cuda.synchronize()
print("WORST", worst)
dist.destroy_process_group()
"""


@pytest.mark.gpu
def test_llama3_nccl_single_rank_on_gpu(tmp_path):
    """The all-gather path's NCCL collectives (all-gather, reduce-scatter, the next head group's gather
    overlapping this one's attention) on a one-rank group: equal to the plain varlen op, bf16, GQA 8/2."""
    import os
    import subprocess
    import sys

    script = tmp_path / "llama3_nccl_w1.py"
    script.write_text(_LLAMA3_NCCL_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RING_ATTN_BACKEND")}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    worst = float([ln for ln in proc.stdout.splitlines() if ln.startswith("WORST")][-1].split()[1])
    assert worst < 2e-2, worst  # same kernels; dK/dV summed in fp32 here, in the kernel's order there
