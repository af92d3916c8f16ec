"""rope_scaling: every type equals transformers' own result for the same config; errors list what is needed."""
import math
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

from ring_attn import rope_scaling
from ring_attn.rope_scaling import from_hf_config, from_hf_config_per_layer_type, rope_parameters

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
    # an explicit truncate None does not truncate (transformers: get("truncate", True)); beta_fast == beta_slow is
    # a one-pair ramp (both refused or mis-read before; found by a randomized run against ROPE_INIT_FUNCTIONS)
    "yarn-truncate-none": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0,
                           "original_max_position_embeddings": 512, "truncate": None},
    "yarn-equal-betas": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 512,
                         "beta_fast": 4, "beta_slow": 4},
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
    with pytest.raises(ValueError, match="per layer type"):
        from_hf_config({"head_dim": 64, "rope_parameters": {"full_attention": {"rope_type": "default"},
                                                            "sliding_attention": {"rope_type": "default"}}})
    inv, _ = from_hf_config({"head_dim": 64, "rope_parameters": {"full_attention": {"rope_type": "default",
                                                                                    "rope_theta": 1e6}}},
                            layer_type="full_attention")
    assert torch.equal(inv, rope_parameters("default", 64, 1e6)[0])


# ---------------------------------------------------------------------------------------------------------
# Real model configs, read as transformers reads them. Each entry is the rope-related part of a published
# config.json (4.x layout: rope_theta + rope_scaling), built into the transformers config class the model uses;
# transformers' own ROPE_INIT_FUNCTIONS on that object is the oracle.

def _phi3_factors(n, step):
    return [1.0 + step * i for i in range(n)]


REAL_CONFIGS = {
    # NousResearch/Yarn-Llama-2-7b-128k: "type", and "finetuned" which transformers ignores (with a warning)
    "yarn-llama-2-7b-128k": ("llama", {
        "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 32, "original_max_position_embeddings": 4096,
                         "finetuned": True}}),
    # Qwen2.5 long-context recipe: yarn with "type" over a 32k model
    "qwen2.5-yarn": ("llama", {
        "hidden_size": 3584, "num_attention_heads": 28, "max_position_embeddings": 32768, "rope_theta": 1e6,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}),
    # DeepSeek-V3's rope (qk_rope_head_dim 64): yarn with mscale / mscale_all_dim
    "deepseek-v3-yarn": ("llama", {
        "hidden_size": 64 * 128, "num_attention_heads": 128, "head_dim": 64, "max_position_embeddings": 163840,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}}),
    # Llama 3.1 8B: "rope_type"
    "llama-3.1-8b": ("llama", {
        "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}}),
    # linear / dynamic configs that carry original_max_position_embeddings (transformers ignores it)
    "linear-with-orig": ("llama", {
        "hidden_size": 5120, "num_attention_heads": 40, "max_position_embeddings": 16384, "rope_theta": 10000.0,
        "rope_scaling": {"type": "linear", "factor": 4.0, "original_max_position_embeddings": 4096}}),
    "dynamic-with-orig": ("llama", {
        "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rope_scaling": {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 4096}}),
    # microsoft/Phi-3-mini-128k-instruct: longrope, original_max_position_embeddings on the config
    "phi-3-mini-128k": ("phi3", {
        "hidden_size": 3072, "num_attention_heads": 32, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "short_factor": _phi3_factors(48, 0.01),
                         "long_factor": _phi3_factors(48, 0.5)}}),
    # a plain Llama 2 config: no rope_scaling at all
    "llama-2-plain": ("llama", {
        "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rope_scaling": None}),
    # 5.x layout: rope_parameters with rope_theta inside, and an extra key
    "v5-yarn-extra-key": ("llama", {
        "hidden_size": 2048, "num_attention_heads": 16, "max_position_embeddings": 65536,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0,
                            "original_max_position_embeddings": 8192, "some_future_key": 1}}),
}


def _transformers_config(kind, d):
    import copy
    from transformers import Phi3Config
    cls = {"llama": LlamaConfig, "phi3": Phi3Config}[kind]
    return cls(**copy.deepcopy(d))


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
@pytest.mark.parametrize("seq_len", [None, 2048, 200000])
def test_real_configs_equal_transformers(name, seq_len):
    kind, d = REAL_CONFIGS[name]
    hf = _transformers_config(kind, d)
    want_inv, want_scale = _hf(hf, seq_len)
    import copy
    original = copy.deepcopy(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the extra keys warn; checked below
        got_inv, got_scale = from_hf_config(d, seq_len=seq_len)           # the config.json dict
        got_obj_inv, got_obj_scale = from_hf_config(hf, seq_len=seq_len)  # transformers' object
    assert d == original  # the reader never modifies the config
    for inv, scale in ((got_inv, got_scale), (got_obj_inv, got_obj_scale)):
        assert torch.equal(inv, want_inv.float()), (name, (inv - want_inv).abs().max())
        assert scale == pytest.approx(want_scale, rel=1e-12, abs=0)


@pytest.mark.parametrize("name,ignored", [("yarn-llama-2-7b-128k", "finetuned"),
                                          ("linear-with-orig", "original_max_position_embeddings"),
                                          ("dynamic-with-orig", "original_max_position_embeddings"),
                                          ("v5-yarn-extra-key", "some_future_key")])
def test_keys_transformers_ignores_warn(name, ignored):
    with pytest.warns(UserWarning, match=ignored):
        from_hf_config(REAL_CONFIGS[name][1])


def test_type_and_rope_type_read_alike():
    base = {"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 4096, "rope_theta": 1e4}
    a = from_hf_config({**base, "rope_scaling": {"type": "linear", "factor": 3.0}})
    b = from_hf_config({**base, "rope_scaling": {"rope_type": "linear", "factor": 3.0}})
    c = from_hf_config({**base, "rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 1e4}})
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])
    assert torch.equal(a[0], rope_parameters("linear", 64, 1e4, factor=3.0)[0])


def test_phi3_legacy_su_type_reads_as_longrope():
    kind, d = REAL_CONFIGS["phi-3-mini-128k"]
    su = {**d, "rope_scaling": {**d["rope_scaling"], "type": "su"}}
    for seq_len in (None, 100000):
        assert torch.equal(from_hf_config(su, seq_len=seq_len)[0], from_hf_config(d, seq_len=seq_len)[0])


GEMMA3_V4 = {  # google/gemma-3-4b-it text config, 4.x layout
    "hidden_size": 2560, "num_attention_heads": 8, "head_dim": 256, "num_hidden_layers": 6,
    "max_position_embeddings": 131072, "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window_pattern": 6}


def _gemma3_oracle(layer_type):
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    import copy
    hf = Gemma3TextConfig(**copy.deepcopy(GEMMA3_V4))
    rope_type = hf.rope_parameters[layer_type]["rope_type"]
    if rope_type == "default":
        return hf, Gemma3RotaryEmbedding.compute_default_rope_parameters(hf, None, layer_type=layer_type)
    return hf, ROPE_INIT_FUNCTIONS[rope_type](hf, None, layer_type=layer_type)


@pytest.mark.parametrize("layer_type", ["full_attention", "sliding_attention"])
def test_gemma3_per_layer_type(layer_type):
    hf, (want_inv, want_scale) = _gemma3_oracle(layer_type)
    v5_dict = {k: v for k, v in GEMMA3_V4.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
    v5_dict.update(rope_parameters=hf.rope_parameters, layer_types=hf.layer_types)
    for config in (GEMMA3_V4, hf, v5_dict):  # 4.x dict, 5.x object, 5.x config.json
        inv, scale = from_hf_config(config, layer_type=layer_type)
        assert torch.equal(inv, want_inv.float()), layer_type
        assert scale == want_scale
        every = from_hf_config_per_layer_type(config)
        assert sorted(every) == ["full_attention", "sliding_attention"]
        assert torch.equal(every[layer_type][0], inv) and every[layer_type][1] == scale
        with pytest.raises(ValueError, match=r"differs per layer type \['full_attention', 'sliding_attention'\]"):
            from_hf_config(config)
        with pytest.raises(ValueError, match=r"layer_type='global'.*expected one of"):
            from_hf_config(config, layer_type="global")
    # the two layer types really differ (theta 1e6 / 8 vs theta 1e4)
    assert not torch.equal(from_hf_config(GEMMA3_V4, layer_type="full_attention")[0],
                           from_hf_config(GEMMA3_V4, layer_type="sliding_attention")[0])


def test_flat_config_per_layer_type_and_nope_layers():
    flat = {"head_dim": 64, "rope_theta": 1e4, "layer_types": ["sliding_attention", "full_attention"]}
    every = from_hf_config_per_layer_type(flat)
    assert sorted(every) == ["full_attention", "sliding_attention"]
    assert torch.equal(every["full_attention"][0], rope_parameters("default", 64, 1e4)[0])
    assert torch.equal(from_hf_config(flat, layer_type="sliding_attention")[0], every["sliding_attention"][0])
    with pytest.raises(ValueError, match=r"layer_type='chunked'.*layer_types"):
        from_hf_config(flat, layer_type="chunked")
    assert sorted(from_hf_config_per_layer_type({"head_dim": 64})) == ["full_attention"]
    nope = {"head_dim": 64, "layer_types": ["full_attention", "no_rope"],
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}, "no_rope": None}}
    assert from_hf_config_per_layer_type(nope)["no_rope"] is None
    with pytest.raises(ValueError, match="has no RoPE"):
        from_hf_config(nope, layer_type="no_rope")


# Keys transformers refuses to run without: the same configs fail in transformers (KeyError) and here.
MISSING_KEY_CONFIGS = [
    ({"type": "linear"}, ["factor"]),
    ({"type": "dynamic"}, ["factor"]),
    ({"type": "yarn", "original_max_position_embeddings": 4096}, ["factor"]),
    ({"rope_type": "llama3", "factor": 8.0}, ["high_freq_factor", "low_freq_factor"]),
    ({"type": "longrope", "short_factor": [1.0] * 32}, ["long_factor"]),
]


@pytest.mark.parametrize("rope,missing", MISSING_KEY_CONFIGS)
def test_missing_keys_refused_like_transformers(rope, missing):
    base = {"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 8192, "rope_theta": 1e4}
    with pytest.raises(KeyError):
        LlamaConfig(**base, rope_scaling=dict(rope))
    with pytest.raises(ValueError) as info:
        from_hf_config({**base, "rope_scaling": rope})
    assert f"is missing {missing}" in str(info.value)


def test_hf_reader_refusals():
    base = {"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 8192}
    with pytest.raises(ValueError, match="unknown rope_type 'mrope9'"):
        from_hf_config({**base, "rope_scaling": {"type": "mrope9", "factor": 2.0}})
    with pytest.raises(ValueError, match="neither head_dim nor hidden_size"):
        from_hf_config({"rope_theta": 1e4})
    with pytest.raises(TypeError, match="expected a dict"):
        from_hf_config({**base, "rope_parameters": [("rope_type", "default")]})
    with pytest.raises(ValueError, match=r"factor=0; expected a finite number > 0"):
        from_hf_config({**base, "rope_scaling": {"type": "linear", "factor": 0}})
    with pytest.raises(ValueError, match=r"seq_len=0; expected an int >= 1"):
        from_hf_config({**base, "rope_scaling": {"type": "linear", "factor": 2.0}}, seq_len=0)
    with pytest.raises(ValueError, match="needs max_position_embeddings"):
        from_hf_config({"head_dim": 64, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        from_hf_config({"head_dim": 64, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    # yarn factor=None (key present): derived as max_position_embeddings / original, as transformers computes it
    inv, scale = from_hf_config({**base, "rope_scaling": {"type": "yarn", "factor": None,
                                                          "original_max_position_embeddings": 2048}})
    assert torch.equal(inv, rope_parameters("yarn", 64, 1e4, factor=4.0, original_max_position_embeddings=2048)[0])


# Every numeric parameter is range-checked: (rope_type, params, theta, exception, pieces of the message that
# must appear: the argument, the value, the expected range).
Y = {"factor": 4.0, "original_max_position_embeddings": 2048}
L3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LR = {"short_factor": [1.0] * 32, "long_factor": [2.0] * 32, "original_max_position_embeddings": 4096,
      "factor": 4.0}
DYN = {"factor": 2.0, "max_position_embeddings": 4096, "seq_len": 8192}
REFUSALS = [
    ("linear", {"factor": 0}, 1e4, ValueError, ["factor=0", "> 0"]),
    ("linear", {"factor": -2.0}, 1e4, ValueError, ["factor=-2.0", "> 0"]),
    ("linear", {"factor": float("nan")}, 1e4, ValueError, ["factor=nan", "finite"]),
    ("linear", {"factor": "2"}, 1e4, TypeError, ["factor='2'", "number"]),
    ("linear", {"factor": True}, 1e4, TypeError, ["factor=True", "number"]),
    ("ntk", {"factor": 0.0}, 1e4, ValueError, ["factor=0.0", "> 0"]),
    ("proportional", {"factor": -1.0}, 1e4, ValueError, ["factor=-1.0", "> 0"]),
    ("default", {}, 0.0, ValueError, ["theta=0.0", "> 0"]),
    ("default", {}, float("inf"), ValueError, ["theta=inf", "finite"]),
    ("default", {}, "1e4", TypeError, ["theta='1e4'", "number"]),
    ("yarn", Y, 1.0, ValueError, ["theta=1.0", "!= 1"]),
    ("default", {"partial_rotary_factor": 0.0}, 1e4, ValueError, ["partial_rotary_factor=0.0", "(0, 1]"]),
    ("default", {"partial_rotary_factor": 1.5}, 1e4, ValueError, ["partial_rotary_factor=1.5", "(0, 1]"]),
    ("dynamic", {**DYN, "seq_len": 0}, 1e4, ValueError, ["seq_len=0", ">= 1"]),
    ("dynamic", {**DYN, "seq_len": 100.5}, 1e4, TypeError, ["seq_len=100.5", "int"]),
    ("dynamic", {**DYN, "max_position_embeddings": -4096}, 1e4, ValueError,
     ["max_position_embeddings=-4096", ">= 1"]),
    ("dynamic", {**DYN, "factor": 0}, 1e4, ValueError, ["factor=0", "> 0"]),
    ("yarn", {**Y, "factor": 0}, 1e4, ValueError, ["factor=0", "> 0"]),
    ("yarn", {**Y, "original_max_position_embeddings": 0}, 1e4, ValueError,
     ["original_max_position_embeddings=0", ">= 1"]),
    ("yarn", {**Y, "original_max_position_embeddings": 2048.5}, 1e4, TypeError,
     ["original_max_position_embeddings=2048.5", "int"]),
    ("yarn", {**Y, "beta_fast": 1, "beta_slow": 32}, 1e4, ValueError,
     ["beta_fast=1", "beta_slow=32", "beta_fast >= beta_slow"]),
    ("yarn", {**Y, "beta_fast": -32}, 1e4, ValueError, ["beta_fast=-32", "> 0"]),
    ("yarn", {**Y, "beta_slow": -1}, 1e4, ValueError, ["beta_slow=-1", "> 0"]),
    ("yarn", {**Y, "attention_factor": 0.0}, 1e4, ValueError, ["attention_factor=0.0", "> 0"]),
    ("yarn", {**Y, "attention_factor": -1.0}, 1e4, ValueError, ["attention_factor=-1.0", "> 0"]),
    ("yarn", {**Y, "mscale": 1.0, "mscale_all_dim": -10.0 / math.log(4.0)}, 1e4, ValueError,
     ["mscale=1.0", "mscale_all_dim=", "> 0"]),
    ("yarn", {**Y, "mscale": "big"}, 1e4, TypeError, ["mscale='big'", "number"]),
    ("yarn", {**Y, "truncate": "yes"}, 1e4, TypeError, ["truncate='yes'", "bool"]),
    ("llama3", {**L3, "factor": 0}, 5e5, ValueError, ["factor=0", "> 0"]),
    ("llama3", {**L3, "low_freq_factor": 0.0}, 5e5, ValueError, ["low_freq_factor=0.0", "> 0"]),
    ("llama3", {**L3, "high_freq_factor": 1.0}, 5e5, ValueError,
     ["high_freq_factor=1.0", "low_freq_factor=1.0", "high_freq_factor > low_freq_factor"]),
    ("llama3", {**L3, "high_freq_factor": 0.5}, 5e5, ValueError, ["high_freq_factor=0.5", "> low_freq_factor"]),
    ("llama3", {**L3, "original_max_position_embeddings": -1}, 5e5, ValueError,
     ["original_max_position_embeddings=-1", ">= 1"]),
    ("longrope", {**LR, "long_factor": [2.0] * 31}, 1e4, ValueError, ["long_factor has 31 entries", "32"]),
    ("longrope", {**LR, "short_factor": [1.0] * 33}, 1e4, ValueError, ["short_factor has 33 entries", "32"]),
    ("longrope", {**LR, "short_factor": [1.0] * 31 + [0.0]}, 1e4, ValueError, ["short_factor[31]=0.0", "> 0"]),
    ("longrope", {**LR, "long_factor": [2.0] * 31 + [float("nan")]}, 1e4, ValueError,
     ["long_factor[31]=nan", "finite"]),
    ("longrope", {**LR, "long_factor": "2.0"}, 1e4, TypeError, ["long_factor='2.0'", "list"]),
    ("longrope", {**LR, "factor": -4.0}, 1e4, ValueError, ["factor=-4.0", "> 0"]),
    ("longrope", {**LR, "attention_factor": 0}, 1e4, ValueError, ["attention_factor=0", "> 0"]),
    ("longrope", {**LR, "original_max_position_embeddings": 1}, 1e4, ValueError,
     ["original_max_position_embeddings=1", ">= 2"]),
    ("longrope", {**LR, "seq_len": -5}, 1e4, ValueError, ["seq_len=-5", ">= 1"]),
    ("longrope", {**LR, "factor": None, "max_position_embeddings": 0}, 1e4, ValueError,
     ["max_position_embeddings=0", ">= 1"]),
]


@pytest.mark.parametrize("rope_type,params,theta,exc,pieces", REFUSALS,
                         ids=[f"{r[0]}-{'-'.join(r[4][:1])}" for r in REFUSALS])
def test_every_numeric_parameter_is_range_checked(rope_type, params, theta, exc, pieces):
    with pytest.raises(exc) as info:
        rope_parameters(rope_type, 64, theta, **params)
    message = str(info.value)
    assert f"rope_type={rope_type!r}" in message
    for piece in pieces:
        assert piece in message, (piece, message)


def test_linear_factor_zero_no_longer_gives_nan():
    """Issue 7: ``rope_parameters("linear", factor=0)`` used to return inf frequencies and NaN from apply_rope."""
    with pytest.raises(ValueError, match=r"factor=0; expected a finite number > 0"):
        rope_parameters("linear", 64, 1e4, factor=0)
    # factors below 1 (compression) are legal and finite
    inv, _ = rope_parameters("linear", 64, 1e4, factor=0.5)
    assert torch.isfinite(inv).all() and torch.equal(inv, rope_parameters("default", 64, 1e4)[0] / 0.5)


def test_integral_float_and_numpy_ints_accepted():
    np = pytest.importorskip("numpy")
    a = rope_parameters("yarn", 64, 1e4, factor=4.0, original_max_position_embeddings=2048)
    b = rope_parameters("yarn", 64, 1e4, factor=np.float32(4.0), original_max_position_embeddings=np.int64(2048))
    c = rope_parameters("yarn", 64, 1e4, factor=4, original_max_position_embeddings=2048.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and a[1] == pytest.approx(b[1]) == c[1]


def test_hf_rope_types():
    """The rope type a config names, as transformers reads it: 4.x rope_scaling first, Phi-3's legacy "su" as
    longrope, one entry per layer type where the dict is nested (layers without RoPE left out)."""
    assert rope_scaling.hf_rope_types({"rope_theta": 1e4}) == {"all": "default"}
    assert rope_scaling.hf_rope_types({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}) == {"all": "dynamic"}
    assert rope_scaling.hf_rope_types({"rope_scaling": {"type": "su", "short_factor": [1.0],
                                                        "long_factor": [2.0]}}) == {"all": "longrope"}
    nested = {"layer_types": ["sliding_attention", "full_attention", "none"],
              "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                  "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                  "none": None}}
    assert rope_scaling.hf_rope_types(nested) == {"sliding_attention": "default", "full_attention": "linear"}
    assert rope_scaling.hf_rope_types(LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                "original_max_position_embeddings": 8192})) == {
        "all": "llama3"}
    assert set(rope_scaling.LENGTH_DEPENDENT_ROPE_TYPES) <= set(rope_scaling.ROPE_TYPES)
    with pytest.raises(TypeError, match="expected a dict"):
        rope_scaling.hf_rope_types({"rope_scaling": "yarn"})


@pytest.mark.parametrize("rope_type, kw, match", [
    ("proportional", dict(factor=None), r"factor=None; expected a finite number > 0"),
    ("ntk", dict(factor=1e300), r"overflow a float64"),
    ("linear", dict(factor=1e-300), r"give inverse frequencies from inf to inf"),
    ("longrope", dict(short_factor=[1e-300] * 4, long_factor=[1.0] * 4, original_max_position_embeddings=4096,
                      factor=4.0), r"short_factor=\[1e-300, .*give inverse frequencies"),
])
def test_parameters_that_overflow_are_named_errors(rope_type, kw, match):
    # they raised bare TypeError / OverflowError, or returned inf frequencies (the docs promise no NaN or inf)
    with pytest.raises(ValueError, match=match):
        rope_scaling.rope_parameters(rope_type, 8 if rope_type == "longrope" else 64, 1e4, **kw)


def test_numpy_ints_are_head_dims():
    import numpy as np

    want = rope_scaling.rope_parameters("yarn", 64, 1e4, factor=4.0, original_max_position_embeddings=2048)
    got = rope_scaling.rope_parameters("yarn", np.int64(64), 1e4, factor=4.0,
                                       original_max_position_embeddings=np.int64(2048))
    assert torch.equal(got[0], want[0]) and got[1] == want[1]
