"""`ring-attn rope-plan`: the theta rules, YaRN parameters, per-pair table, table errors, JSON and PNG output."""
import argparse
import json
import math
import sys

import pytest
from hypothesis import given, strategies as st

from ring_attn import rope_plan, rope_scaling

LLAMA3 = ["--head-dim", "128", "--theta", "500000", "--trained", "8192", "--target", "262144"]


def _run(argv, capsys):
    parser = argparse.ArgumentParser(prog="ring-attn rope-plan")
    rope_plan.add_arguments(parser)
    assert rope_plan.run(parser.parse_args(argv)) == 0
    return capsys.readouterr().out


def test_llama3_8b_to_262k_numbers():
    p = rope_plan.plan(128, 5e5, 8192, 262144, "yarn")
    assert p["factor"] == 32
    assert p["ntk_theta"] == pytest.approx(5e5 * 32 ** (128 / 126))
    # the critical-dimension rule lands where Llama-3-8B-Instruct-262k's theta (~2.8e8) did
    assert p["critical_theta"] == pytest.approx(2.83e8, rel=0.01)
    assert p["critical_dimension"] == 70  # 2 * ceil(64 * log_5e5(8192 / 2pi)) = 2 * ceil(34.98)
    y = p["yarn"]
    assert y["attention_factor"] == pytest.approx(0.1 * math.log(32) + 1)
    assert tuple(y["correction_range_pairs"]) == rope_scaling.yarn_correction_range(128, 5e5, 8192, 32, 1)
    assert p["attention_scaling"] == pytest.approx(y["attention_factor"])


def test_equal_yarn_betas_are_planned_as_the_rope_reader_computes_them():
    # transformers and rope_scaling accept beta_fast == beta_slow (a one-pair ramp); so does the plan
    p = rope_plan.plan(128, 5e5, 8192, 262144, "yarn", beta_fast=4.0, beta_slow=4.0)
    inv, _ = rope_scaling.rope_parameters("yarn", 128, 5e5, factor=32.0, original_max_position_embeddings=8192,
                                          beta_fast=4.0, beta_slow=4.0)
    assert [r["inv_freq"] for r in p["pairs"]] == pytest.approx(inv.tolist(), rel=1e-12)


@given(theta=st.floats(1e3, 1e9), trained=st.integers(64, 1 << 20), ratio=st.floats(1.0, 256.0),
       d=st.sampled_from([32, 64, 128]))
def test_critical_theta_keeps_the_critical_dimension(theta, trained, ratio, d):
    target = int(trained * ratio)
    t = rope_plan.critical_theta(theta, trained, target)
    # log_t'(target / 2pi) == log_t(trained / 2pi): the same pairs complete a rotation within the target length
    assert math.log(target / (2 * math.pi)) / math.log(t) == pytest.approx(
        math.log(trained / (2 * math.pi)) / math.log(theta), rel=1e-9)


@pytest.mark.parametrize("scheme", rope_plan.SCHEMES)
def test_pair_table_is_consistent(scheme):
    p = rope_plan.plan(64, 1e4, 2048, 16384, scheme)
    assert len(p["pairs"]) == 32
    for r in p["pairs"]:
        assert r["wavelength"] == pytest.approx(2 * math.pi / r["inv_freq"])
        assert r["rotations_trained"] == pytest.approx(2048 / r["wavelength"])
        assert r["rotations_target"] == pytest.approx(16384 / r["wavelength"])
        assert (r["pair"] in p["pairs_never_rotating_in_trained"]) == (r["wavelength"] > 2048)
        assert (r["pair"] in p["pairs_never_rotating_in_target"]) == (r["wavelength"] > 16384)
    # wavelengths grow with the pair index for every scheme
    w = [r["wavelength"] for r in p["pairs"]]
    assert all(a <= b for a, b in zip(w, w[1:]))


def test_table_errors_grow_with_length_and_kernel_math_stays_exact():
    short = rope_plan.plan(128, 5e5, 8192, 8192)["table_angle_error_at_target"]
    long = rope_plan.plan(128, 5e5, 8192, 262144)["table_angle_error_at_target"]
    assert long["sampled"] and not short["sampled"]
    assert long["fp32_table"]["max_rad"] > 4 * short["fp32_table"]["max_rad"]
    assert long["fp32_table"]["max_rad"] > 1e-3  # half an ulp of 2^18 in float32 is 2^-7 rad
    assert long["bf16_table"]["max_rad"] > long["fp32_table"]["max_rad"]
    assert long["ring_attn_kernel"]["max_rad"] < 1e-6


def test_text_output(capsys):
    out = _run(LLAMA3 + ["--rope-type", "yarn"], capsys)
    assert "static NTK-aware" in out and "1.69048e+07" in out
    assert "critical dimension" in out and "2.83461e+08" in out
    assert "attention factor 0.1*ln(s) + 1 = 1.34657" in out
    assert "never complete a rotation within the trained length: pairs 30..63" in out
    assert "bf16 table" in out and "fp32 table" in out
    assert out.count("\n") > 64  # one row per pair


def test_json_output(capsys):
    p = json.loads(_run(LLAMA3 + ["--json"], capsys))
    assert p["rotary_dim"] == 128 and len(p["pairs"]) == 64
    assert p["pairs_never_rotating_in_trained"] == list(range(35, 64))
    assert set(p["table_angle_error_at_target"]) >= {"fp32_table", "bf16_table", "ring_attn_kernel"}


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(RuntimeError, match=r"ring-attn\[bench\]"):
        rope_plan.plot_plan(rope_plan.plan(64, 1e4, 512, 2048), str(tmp_path / "x.png"))


def test_plot_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'ring-attn[bench]')")
    out = tmp_path / "plan.png"
    _run(LLAMA3 + ["--rope-type", "ntk", "--plot", str(out)], capsys)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_through_the_console_script(capsys):
    from ring_attn import cli

    assert cli.main(["rope-plan"] + LLAMA3 + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == 262144


@pytest.mark.parametrize("kwargs,needle", [
    (dict(head_dim=128, theta=1.0, trained=8192, target=2**18), "theta"),
    (dict(head_dim=128, theta=5e5, trained=4, target=2**18), "trained"),
    (dict(head_dim=7, theta=5e5, trained=8192, target=2**18), "even"),
    (dict(head_dim=128, theta=5e5, trained=8192, target=2**18, rope_type="nope"), "rope_type"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        rope_plan.plan(**kwargs)


def test_target_below_trained_warns(capsys):
    """A 'plan' that shrinks the context (factor < 1) is printed with a warning first, and the JSON carries it."""
    out = _run(["--head-dim", "128", "--theta", "5e5", "--trained", "8192", "--target", "4096"], capsys)
    assert out.splitlines()[0].startswith("warning: --target 4,096 is shorter than --trained 8,192")
    p = json.loads(_run(["--head-dim", "128", "--theta", "5e5", "--trained", "8192", "--target", "4096", "--json"],
                        capsys))
    assert len(p["warnings"]) == 1 and "factor s = 0.5 < 1" in p["warnings"][0]
    assert json.loads(_run(LLAMA3 + ["--json"], capsys))["warnings"] == []


def test_dynamic_reports_its_changed_base_and_huge_theta_runs():
    """dynamic NTK changes the base (theta * (s*L/L0 - (s - 1))^(d/(d-2)), transformers' formula): the plan used to
    print the unchanged theta as its effective theta. A theta so large that inv_freq underflows to 0 (1e100) used
    to raise ZeroDivisionError."""
    p = rope_plan.plan(128, 5e5, 8192, 262144, "dynamic")
    s = 262144 / 8192
    assert p["effective_theta"] == pytest.approx(5e5 * (s * s - (s - 1)) ** (128 / 126), rel=1e-6)
    huge = rope_plan.plan(128, 1e100, 8192, 262144)
    assert math.isinf(huge["pairs"][-1]["original_wavelength"])
    with pytest.raises(ValueError, match=r"--target 6: expected an int > 2pi"):
        rope_plan.plan(128, 5e5, 8192, 6, "critical")  # the rule's theta would fall under 1


def test_plot_without_an_extension_says_which_file_it_wrote(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'ring-attn[bench]')")
    out = _run(LLAMA3 + ["--plot", str(tmp_path / "plan")], capsys)
    assert f"plot written to {tmp_path / 'plan.png'}" in out and (tmp_path / "plan.png").is_file()
