"""rope_scaling: every type equals transformers' own result for the same config; errors list what is needed."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from ring_attn import rope_scaling
from ring_attn.rope_scaling import from_hf_config, rope_parameters

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

HEAD_DIM = 64


def _hf_config(rope_params: dict, head_dim=HEAD_DIM, max_pos=4096, **extra) -> LlamaConfig:
    return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters=dict(rope_params), **extra)


def _hf(config: LlamaConfig, seq_len=None):
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)


LONG = [1.0 + 0.25 * i for i in range(HEAD_DIM // 2)]
SHORT = [1.0 + 0.01 * i for i in range(HEAD_DIM // 2)]

CASES = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "original_max_position_embeddings": 512},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0, "original_max_position_embeddings": 512,
                    "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "yarn-attn": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 1024,
                  "attention_factor": 1.25},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": LONG,
                 "original_max_position_embeddings": 1024},
    "proportional": {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    "linear-partial": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5},
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seq_len", [None, 3000, 9000])
def test_equals_transformers(name, seq_len):
    config = _hf_config(CASES[name])
    want_inv, want_scale = _hf(config, seq_len)
    got_inv, got_scale = from_hf_config(config, seq_len=seq_len)
    assert got_inv.dtype == torch.float32
    assert torch.equal(got_inv, want_inv.float()), (name, (got_inv - want_inv).abs().max())
    assert got_scale == pytest.approx(want_scale, rel=1e-12, abs=0)


@pytest.mark.parametrize("name", ["default", "yarn", "llama3", "longrope"])
def test_transformers_4x_dict_config(name):
    """A 4.x ``config.json`` dict (rope_theta + rope_scaling with "type") reads the same as the 5.x object."""
    params = dict(CASES[name])
    theta = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    old = {"hidden_size": HEAD_DIM * 4, "num_attention_heads": 4, "max_position_embeddings": 4096,
           "rope_theta": theta, "rope_scaling": ({"type": rope_type, **params} if rope_type != "default" else None)}
    got_inv, got_scale = from_hf_config(old, seq_len=5000)
    want_inv, want_scale = _hf(_hf_config(CASES[name]), 5000)
    assert torch.equal(got_inv, want_inv.float())
    assert got_scale == pytest.approx(want_scale)


def test_partial_rotary_factor_on_config():
    config = {"head_dim": 128, "num_attention_heads": 8, "hidden_size": 1024, "rope_theta": 1e4,
              "partial_rotary_factor": 0.25, "max_position_embeddings": 2048}
    inv, _ = from_hf_config(config)
    assert inv.shape == (16,)
    assert torch.equal(inv, rope_parameters("default", 32, 1e4)[0])


def test_ntk_is_default_with_scaled_theta():
    d, theta, s = 128, 5e5, 32.0
    inv, scale = rope_parameters("ntk", d, theta, factor=s)
    theta_ntk = theta * s ** (d / (d - 2))
    oracle = theta_ntk ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    assert scale == 1.0
    assert torch.allclose(inv.double(), oracle, rtol=2e-6, atol=0)
    # with factor 1 static NTK is the identity
    assert torch.equal(rope_parameters("ntk", d, theta, factor=1.0)[0], rope_parameters("default", d, theta)[0])


@given(theta=st.floats(100.0, 1e9), d=st.sampled_from([8, 32, 64, 128, 256]))
def test_default_matches_float64_formula(theta, d):
    inv, _ = rope_parameters("default", d, theta)
    oracle = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    assert inv.shape == (d // 2,)
    assert torch.allclose(inv.double(), oracle, rtol=1e-5, atol=0)


def test_dynamic_below_max_is_default_and_grows():
    kw = dict(factor=4.0, max_position_embeddings=2048)
    base = rope_parameters("default", 64, 1e4)[0]
    assert torch.equal(rope_parameters("dynamic", 64, 1e4, seq_len=100, **kw)[0], base)
    long = rope_parameters("dynamic", 64, 1e4, seq_len=16384, **kw)[0]
    assert (long[1:] < base[1:]).all() and long[0] == base[0]


def test_yarn_helpers():
    low, high = rope_scaling.yarn_correction_range(128, 5e5, 8192, 32, 1)
    assert 0 <= low < high <= 127
    assert rope_scaling.yarn_attention_factor(32.0) == pytest.approx(0.1 * math.log(32.0) + 1)
    assert rope_scaling.yarn_attention_factor(1.0) == 1.0


@pytest.mark.parametrize("rope_type,params,needle", [
    ("linear", {}, "missing ['factor']"),
    ("yarn", {"factor": 4.0}, "original_max_position_embeddings"),
    ("llama3", {"factor": 8.0}, "low_freq_factor"),
    ("dynamic", {"factor": 2.0, "max_position_embeddings": 10}, "seq_len"),
    ("longrope", {"short_factor": [1.0] * 32}, "long_factor"),
    ("linear", {"factor": 2.0, "fator": 3}, "unknown ['fator']"),
    ("default", {"beta_fast": 3}, "unknown ['beta_fast']"),
    ("rotary9000", {}, "unknown rope_type"),
])
def test_missing_or_unknown_parameters(rope_type, params, needle):
    with pytest.raises(ValueError) as info:
        rope_parameters(rope_type, 64, 1e4, **params)
    assert needle in str(info.value)
    if rope_type in rope_scaling.ROPE_TYPES:
        assert "needs" in str(info.value)  # the message lists what the type needs


def test_bad_dims_and_theta():
    with pytest.raises(ValueError, match="even"):
        rope_parameters("default", 64, 1e4, partial_rotary_factor=0.3)  # int(19.2) = 19
    with pytest.raises(ValueError, match="theta"):
        rope_parameters("default", 64, -1.0)
    with pytest.raises(ValueError, match="short_factor"):
        rope_parameters("longrope", 64, 1e4, short_factor=[1.0] * 3, long_factor=[1.0] * 32,
                        original_max_position_embeddings=10, factor=2.0)
    with pytest.raises(ValueError, match="nested"):
        from_hf_config({"head_dim": 64, "rope_parameters": {"full_attention": {"rope_type": "default"},
                                                            "sliding_attention": {"rope_type": "default"}}})
    inv, _ = from_hf_config({"head_dim": 64, "rope_parameters": {"full_attention": {"rope_type": "default",
                                                                                    "rope_theta": 1e6}}},
                            layer_type="full_attention")
    assert torch.equal(inv, rope_parameters("default", 64, 1e6)[0])
