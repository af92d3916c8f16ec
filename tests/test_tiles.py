"""The fixed tile tables (ring_attn/backends/triton/tiles.py): every shipped tile passes the static checks,
the choice is a pure function of its key (so every process picks the same tiles), autotuning is opt-in and
its winners round-trip through a JSON table, and the shipped sm_90 tiles — 128-row blocks, reversed causal
block order, non-square backward tiles — compute the right thing under the interpreter."""
import json

import pytest
import torch

import ring_attn
from ring_attn import reference
from ring_attn.backends.triton import tiles
from ring_attn.backends.triton.attention_kernels import fwd_kernel

from accuracy import BACKWARD, FORWARD, assert_within_rule

KEYS = [tiles.FwdKey(arch, d, dt, causal, merge) for arch in (75, 80, 86, 89, 90, 100, 120)
        for d in (16, 32, 64, 80, 96, 128, 192, 256) for dt in ("bf16", "fp16", "fp32") for causal in (False, True)
        for merge in (False, True)]


@pytest.fixture
def gpu_tables(monkeypatch):
    """Make the tables answer as on an sm_90 GPU although the kernels run in the interpreter."""
    monkeypatch.setattr(tiles, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(tiles, "current_arch", lambda: 90)
    monkeypatch.delenv("RING_ATTN_TILES", raising=False)
    monkeypatch.delenv("RING_ATTN_AUTOTUNE", raising=False)


def test_interpreter_uses_the_small_tile():
    assert tiles.fwd_tile(tiles.FwdKey(90, 128, "bf16", True, False)) == tiles.INTERPRETER_TILE
    assert tiles.bwd_tiles(128)["dkdv"] == (16, 16)
    assert not tiles.autotune_enabled()


def test_every_shipped_forward_tile_passes_the_static_checks(gpu_tables):
    for key in KEYS:
        t = tiles.fwd_tile(key)
        assert t == tiles.fwd_tile(key), key  # a pure function of the key: same tile in every process
        assert tiles.fits(t, key.head_dim, key.dtype, key.arch), (key, t)
        assert tiles.smem_estimate(t, key.head_dim, key.dtype) <= tiles.smem_limit(key.arch)
    # Hopper, bf16: 8-warp 128-row tiles (two warpgroups, no spill in the compile report) at d <= 128
    for d in (64, 128):
        t = tiles.fwd_tile(tiles.FwdKey(90, d, "bf16", True, False))
        assert (t["BLOCK_M"], t["num_warps"]) == (128, 8)


def test_every_backward_tile_fits_its_gpu_and_dtype(gpu_tables):
    """Both backward kernels' tiles fit the shared memory of every capability, in every dtype: the sm_90
    16-bit table is used as it is, and elsewhere a tile over the limit is shrunk (the d=256 dQ tile needs
    168 KB on sm_80/89 and 336 KB in fp32 on sm_90: it would fail at launch)."""
    for arch in (75, 80, 86, 89, 90, 100, 120):
        for d in (16, 32, 64, 80, 96, 128, 192, 256):
            for dt in ("bf16", "fp16", "fp32"):
                if arch == 75 and dt == "fp32" and d > 128:
                    continue  # T4's 64 KB: even 16x16 tiles of d=256 fp32 are over it (RuntimeError, below)
                t = tiles.bwd_tiles(d, arch, dt)
                assert t == tiles.bwd_tiles(d, arch, dt)  # a pure function of the key
                for which, kernel in (("dkdv", "bwd_dkdv_kernel"), ("dq", "bwd_dq_kernel")):
                    tile = tiles.bwd_kernel_tile(t, which)
                    assert tiles.smem_estimate(tile, d, dt, kernel) <= tiles.smem_limit(arch), (arch, d, dt, t)
                    assert min(t[which]) >= 16
    for d in (64, 128, 256):  # Hopper 16-bit: the compile report's tiles, unchanged
        for dt in ("bf16", "fp16"):
            assert tiles.bwd_tiles(d, 90, dt) == tiles.bwd_tiles(d, 100, dt)
        assert tiles.bwd_tiles(d, 90, "bf16") == dict(
            dkdv={64: (64, 128), 128: (32, 128), 256: (16, 64)}[d], dq={64: (128, 64), 128: (128, 64),
                                                                      256: (128, 32)}[d], num_warps=8, num_stages=2)
    assert tiles.bwd_tiles(256, 80, "bf16")["dq"] == (128, 16)  # the streamed keys halve first
    assert tiles.bwd_tiles(256, 90, "fp32") == dict(dkdv=(16, 32), dq=(32, 16), num_warps=8, num_stages=2)


def test_shared_memory_limits_per_capability():
    assert tiles.smem_limit(90) == 232448 and tiles.smem_limit(80) == 166912
    assert tiles.smem_limit(86) == tiles.smem_limit(89) == 101376  # not A100's 163 KB: same major, less memory
    assert tiles.smem_limit(999) == 101376


def test_prune_drops_configs_over_shared_memory_or_the_spill_edge():
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    assert tiles.smem_estimate(big, 256, "bf16") == 64 * 1024 + 3 * 2 * 128 * 256 * 2  # 448 KB
    assert not tiles.fits(big, 256, "bf16", 90)
    assert not tiles.fits({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}, 128, "bf16", 90)
    for d in (64, 128, 256):
        for t in tiles.fwd_candidates(d, "bf16", 90):
            assert tiles.fits(t, d, "bf16", 90)
    assert {tuple(t.values()) for t in tiles.fwd_candidates(256, "bf16", 90)} < \
        {tuple(t.values()) for t in tiles.fwd_candidates(64, "bf16", 90)}


def test_backward_tiles_have_one_row_block_per_warpgroup(gpu_tables):
    for d in (32, 64, 128, 256):
        t = tiles.bwd_tiles(d)
        warpgroups = t["num_warps"] // 4
        assert t["dq"][0] == 64 * warpgroups, (d, t)  # dQ: 128 stationary query rows, no duplicated tile
        if d <= 128:
            assert t["dkdv"][1] == 64 * warpgroups, (d, t)  # dK/dV: 128 stationary keys


def test_tuned_table_round_trips(gpu_tables, tmp_path, monkeypatch):
    import triton

    def cache_key(**vals):  # what triton.autotune keys its cache by: the key values, then the arg dtypes
        return tuple(vals[n] for n in fwd_kernel.keys) + tuple(vals["dtypes"])

    base = dict(HEAD_DIM=128, CAUSAL=True, VARLEN=False, DOT_PRECISION="tf32", MERGE=False, ALIBI=False)

    class FakeTuner:
        keys = fwd_kernel.keys
        cache = {cache_key(**base, seqlen_q=4096, dtypes=["torch.bfloat16"] * 2):
                 triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
                 cache_key(**base, seqlen_q=16384, dtypes=["torch.bfloat16"] * 2):  # the longer one wins
                 triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
                 cache_key(**dict(base, HEAD_DIM=64, CAUSAL=False, MERGE=True), seqlen_q=4096,
                           dtypes=["torch.float16", "torch.float32"]):
                 triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3)}

    assert {"ALIBI", "seqlen_q"} <= set(FakeTuner.keys)  # the real layout: Q's dtype comes after all of them
    path = tmp_path / "tuned.json"
    recs = tiles.dump_tuned(FakeTuner(), str(path), arch=90)
    assert recs == json.loads(path.read_text()) and len(recs) == 2
    assert {r["dtype"] for r in recs} == {"bf16", "fp16"}
    key = tiles.FwdKey(90, 128, "bf16", True, False)
    shipped = tiles.fwd_tile(key)
    monkeypatch.setenv("RING_ATTN_TILES", str(path))
    assert tiles.fwd_tile(key) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    assert tiles.fwd_tile(key._replace(merge=True)) == shipped  # keys the file does not list: the table
    assert tiles.fwd_tile(tiles.FwdKey(90, 64, "fp16", False, True))["BLOCK_N"] == 32
    assert tiles.fwd_tile(tiles.FwdKey(90, 64, "bf16", False, True)) != recs[0]  # fp16's record is fp16's only
    monkeypatch.setenv("RING_ATTN_TILES", "")
    assert tiles.fwd_tile(key) == shipped


def test_tune_tiles_script_dumps_the_autotuner(monkeypatch):
    """scripts/tune_tiles.py (GPU only) hands dump_tuned the triton.autotune object, not the launcher's table
    wrapper (which has no cache: the script would fail after tuning)."""
    import importlib.util
    from pathlib import Path

    import triton

    monkeypatch.setenv("RING_ATTN_AUTOTUNE", "1")  # the script sets it on import; monkeypatch restores it
    path = Path(__file__).resolve().parents[1] / "scripts" / "tune_tiles.py"
    spec = importlib.util.spec_from_file_location("tune_tiles_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tuner = mod.autotuner()
    assert isinstance(tuner, triton.runtime.Autotuner) and isinstance(tuner.cache, dict)
    assert list(tuner.keys) == list(fwd_kernel.keys)


def test_autotune_key_separates_merge_and_length():
    assert {"MERGE", "seqlen_q", "HEAD_DIM", "CAUSAL"} <= set(fwd_kernel.keys)


@pytest.mark.parametrize("arch,d,s_q,s_k,causal", [(90, 64, 200, 200, True), (90, 128, 150, 190, True),
                                                    (90, 64, 90, 140, False), (90, 256, 70, 90, True),
                                                    (80, 256, 70, 90, True), (89, 256, 40, 70, False)])
def test_shipped_gpu_tiles_are_correct_in_the_interpreter(gpu_tables, monkeypatch, arch, d, s_q, s_k, causal):
    """The GPU tiles of fp32 storage (sm_90's fp32 table: fwd 64×32 w8 / 32×16 / 32×32 w8, bwd dK/dV 16×64 or
    16×32, dQ 64×16 or 32×16; sm_80 and sm_89 at d=256: the 16-bit tiles shrunk to fit shared memory) with
    heaviest-first order, ragged ends and GQA, against the float64 oracle."""
    monkeypatch.setattr(tiles, "current_arch", lambda: arch)
    g = torch.Generator().manual_seed(d + s_q)
    q = torch.randn(1, s_q, 4, d, generator=g)
    k = torch.randn(1, s_k, 2, d, generator=g)
    v = torch.randn(1, s_k, 2, d, generator=g)
    dout = torch.randn(1, s_q, 4, d, generator=g)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (conftest)
    qs, ks, vs = (x.to(dev).clone().requires_grad_() for x in (q, k, v))
    out = ring_attn.flash_attn_func(qs, ks, vs, causal=causal)
    out.backward(dout.to(dev))
    res = {}
    for name, cdt in (("oracle", torch.float64), ("baseline", torch.float32)):
        qr, kr, vr = (x.to(cdt).clone().requires_grad_() for x in (q, k, v))
        o, _ = reference.attention(qr, kr, vr, None, causal, compute_dtype=cdt)
        o.backward(dout.to(cdt))
        res[name] = (o, qr.grad, kr.grad, vr.grad)
    assert_within_rule("out", out, res["oracle"][0], res["baseline"][0], torch.float32, FORWARD)
    for i, (name, got) in enumerate((("dq", qs.grad), ("dk", ks.grad), ("dv", vs.grad))):
        assert_within_rule(name, got, res["oracle"][i + 1], res["baseline"][i + 1], torch.float32, BACKWARD)


def test_tile_file_overrides_backward_tiles(gpu_tables, tmp_path, monkeypatch):
    path = tmp_path / "bwd.json"
    path.write_text(json.dumps([{"op": "bwd", "arch": 90, "head_dim": 128, "dkdv": [32, 64], "dq": [64, 32],
                                 "num_warps": 8, "num_stages": 2}]))
    shipped = tiles.bwd_tiles(128)
    monkeypatch.setenv("RING_ATTN_TILES", str(path))
    assert tiles.bwd_tiles(100) == dict(dkdv=(32, 64), dq=(64, 32), num_warps=8, num_stages=2)
    assert tiles.bwd_tiles(64) != tiles.bwd_tiles(128)  # other buckets keep the table
    monkeypatch.delenv("RING_ATTN_TILES")
    assert tiles.bwd_tiles(128) == shipped


def test_before_table_in_benchmarks_parses(gpu_tables, monkeypatch):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tiles" / "before_issue9.json"
    monkeypatch.setenv("RING_ATTN_TILES", str(path))
    assert tiles.bwd_tiles(128)["dkdv"] == (32, 64)
    assert tiles.fwd_tile(tiles.FwdKey(90, 128, "bf16", True, False))["BLOCK_N"] == 64


_GOOD_FWD = {"arch": 90, "head_dim": 128, "dtype": "bf16", "causal": True, "merge": False, "BLOCK_M": 64,
             "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


@pytest.mark.parametrize("content,needle", [
    (None, "cannot read it as a JSON tile table (FileNotFoundError"),
    ("{not json", "cannot read it as a JSON tile table (JSONDecodeError"),
    (json.dumps({"arch": 90}), "expected a JSON list of tile records"),
    (json.dumps([[90, 128]]), "record 0: expected a JSON object"),
    (json.dumps([_GOOD_FWD, dict(_GOOD_FWD, BLOCK_M=100)]), "record 1: BLOCK_M=100; expected a power of two"),
    (json.dumps([{k: v for k, v in _GOOD_FWD.items() if k != "dtype"}]), "the field 'dtype' is missing"),
    (json.dumps([dict(_GOOD_FWD, dtype="float16")]), "dtype='float16'; expected one of"),
    (json.dumps([dict(_GOOD_FWD, num_warps=3)]), "num_warps=3; expected 1, 2, 4, 8 or 16"),
    (json.dumps([dict(_GOOD_FWD, causal="yes")]), "causal='yes'; expected true or false"),
    (json.dumps([dict(_GOOD_FWD, op="both")]), "op='both'; expected 'fwd' or 'bwd'"),
    (json.dumps([dict(_GOOD_FWD, head_dim=256, BLOCK_M=128, BLOCK_N=128, num_stages=3)]),
     "needs 458752 B of shared memory at head dim 256 bf16, over the 232448 B of sm_90"),
    (json.dumps([{"op": "bwd", "arch": 90, "head_dim": 128, "dkdv": [32, 128], "dq": [128], "num_warps": 8,
                  "num_stages": 2}]), "dq=[128]; expected [BLOCK_M, BLOCK_N]"),
    ("nested", "cannot read it as a JSON tile table (RecursionError"),
    (json.dumps([_GOOD_FWD, _GOOD_FWD]), "record 1: a second forward record for FwdKey(arch=90"),
    (json.dumps([dict(_GOOD_FWD, BLOCK_K=64)]), "record 0: unknown field(s) ['BLOCK_K']"),
    (json.dumps([{"op": "bwd", "arch": 90, "head_dim": 128, "causal": True, "dkdv": [32, 128], "dq": [128, 64],
                  "num_warps": 8, "num_stages": 2}]), "record 0: unknown field(s) ['causal']; a backward record"),
    (json.dumps([dict(_GOOD_FWD, arch=9)]), "arch=9; expected a compute capability as an int, e.g. 90"),
    (json.dumps([{"op": "bwd", "arch": 80, "head_dim": 128, "dkdv": [32, 128], "dq": [128, 64], "num_warps": 8,
                  "num_stages": 2}, {"op": "bwd", "arch": 80, "head_dim": 100, "dkdv": [16, 16], "dq": [16, 16],
                                     "num_warps": 4, "num_stages": 2}]),
     "record 1: a second backward record for sm_80, head dims of bucket 128, fp16/bf16"),
])
def test_a_bad_tile_file_is_refused_naming_the_variable_and_record(gpu_tables, tmp_path, monkeypatch, content,
                                                                     needle):
    path = tmp_path / "tiles.json"
    if content is not None:
        path.write_text("[" * 100000 + "]" * 100000 if content == "nested" else content)
    monkeypatch.setenv("RING_ATTN_TILES", str(path))
    for _ in range(2):  # refused on every call, not only the first
        with pytest.raises(ValueError, match="RING_ATTN_TILES=") as e:
            tiles.fwd_tile(tiles.FwdKey(90, 128, "bf16", True, False))
        assert needle in str(e.value)


def test_backward_tile_records_serve_their_dtype_class(gpu_tables, tmp_path, monkeypatch):
    """A backward record without a dtype serves fp16/bf16 (fp32 keeps its own table); one with "dtype": "fp32"
    serves fp32 and is checked against shared memory in fp32 when the file is read."""
    path = tmp_path / "bwd.json"
    rec = {"op": "bwd", "arch": 90, "head_dim": 256, "dkdv": [16, 64], "dq": [128, 32], "num_warps": 8,
           "num_stages": 2}
    path.write_text(json.dumps([rec]))
    monkeypatch.setenv("RING_ATTN_TILES", str(path))
    assert tiles.bwd_tiles(256, 90, "bf16")["dq"] == (128, 32)  # 192 KB: fits sm_90 in 16 bits
    assert tiles.bwd_tiles(256, 90, "fp32")["dq"] == (32, 16)  # the fp32 table, not the 16-bit record
    path2 = tmp_path / "bwd32.json"
    path2.write_text(json.dumps([rec, dict(rec, dtype="fp32")]))
    monkeypatch.setenv("RING_ATTN_TILES", str(path2))
    with pytest.raises(ValueError, match=r"record 1: the dq tile \(128, 32\) needs 393216 B of shared memory at head "
                                         r"dims up to 256 fp32, over the 232448 B of sm_90$"):
        tiles.bwd_tiles(256, 90, "bf16")
    path2.write_text(json.dumps([rec, dict(rec, dtype="fp32", dkdv=[16, 32], dq=[32, 16])]))
    monkeypatch.setenv("RING_ATTN_TILES", str(path2) + "")  # a failed read is retried
    assert tiles.bwd_tiles(256, 90, "fp32") == dict(dkdv=(16, 32), dq=(32, 16), num_warps=8, num_stages=2)


@pytest.mark.parametrize("value", ["yes", "true", "2", " 1"])
def test_autotune_takes_only_0_or_1(monkeypatch, value):
    monkeypatch.setenv("RING_ATTN_AUTOTUNE", value)
    with pytest.raises(ValueError, match=f"RING_ATTN_AUTOTUNE={value!r}: expected '1'"):
        tiles.autotune_enabled()
    for ok in ("0", ""):
        monkeypatch.setenv("RING_ATTN_AUTOTUNE", ok)
        assert tiles.autotune_enabled() is False


def test_backward_tile_records_are_per_capability(gpu_tables, tmp_path, monkeypatch):
    """A record for sm_86 is not used on sm_80 (they have different shared memory); a file is read once per
    value of RING_ATTN_TILES."""
    path = tmp_path / "bwd.json"
    rec = {"op": "bwd", "arch": 86, "head_dim": 128, "dkdv": [16, 16], "dq": [16, 16], "num_warps": 4,
           "num_stages": 2}
    path.write_text(json.dumps([rec]))
    monkeypatch.setenv("RING_ATTN_TILES", str(path))
    assert tiles.bwd_tiles(128, 86, "bf16")["dkdv"] == (16, 16)
    assert tiles.bwd_tiles(128, 80, "bf16")["dkdv"] == (32, 128)  # the table's
    path.write_text(json.dumps([dict(rec, dkdv=[32, 16])]))  # edited during the run: read once per path
    assert tiles.bwd_tiles(128, 86, "bf16")["dkdv"] == (16, 16)
    other = tmp_path / "bwd2.json"
    other.write_text(path.read_text())
    monkeypatch.setenv("RING_ATTN_TILES", str(other))
    assert tiles.bwd_tiles(128, 86, "bf16")["dkdv"] == (32, 16)


def test_backward_tiles_refuse_what_cannot_fit(gpu_tables):
    with pytest.raises(ValueError, match="bwd_tiles: dtype 'float32'; expected one of"):
        tiles.bwd_tiles(128, 90, "float32")
    with pytest.raises(RuntimeError, match="the Triton backward's dkdv kernel needs 98560 B of shared memory at "
                                           "head dim 256 fp32, over the 65536 B of sm_75 even with 16x16 tiles"):
        tiles.bwd_tiles(256, 75, "fp32")


@pytest.mark.parametrize("s_q", [40, 1])  # a prefill-shaped and a decode-shaped launch (the decode tile)
def test_bad_tile_settings_are_refused_on_every_launch_path(tmp_path, monkeypatch, s_q):
    """Under the interpreter too (where the tables are not read): every attention call, forward and backward,
    checks RING_ATTN_TILES and RING_ATTN_AUTOTUNE before a backend launches anything (the block API's checks)."""
    from ring_attn import backends
    q = torch.randn(1, s_q, 2, 16, requires_grad=True)
    k = torch.randn(1, 40, 2, 16, requires_grad=True)
    path = tmp_path / "t.json"
    path.write_text("{not json")
    with backends.force("triton"):
        monkeypatch.setenv("RING_ATTN_TILES", str(path))
        with pytest.raises(ValueError, match="RING_ATTN_TILES="):
            ring_attn.flash_attn_func(q, k, k, causal=True)
        monkeypatch.delenv("RING_ATTN_TILES")
        monkeypatch.setenv("RING_ATTN_AUTOTUNE", "yes")
        with pytest.raises(ValueError, match="RING_ATTN_AUTOTUNE='yes'"):
            ring_attn.flash_attn_func(q, k, k, causal=True)
        monkeypatch.delenv("RING_ATTN_AUTOTUNE")
        out = ring_attn.flash_attn_func(q, k, k, causal=True)
        path.write_text(json.dumps([_GOOD_FWD, _GOOD_FWD]))
        monkeypatch.setenv("RING_ATTN_TILES", str(path))
        with pytest.raises(ValueError, match="a second forward record"):
            out.sum().backward()
