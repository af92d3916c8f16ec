"""``ring-attn kld``: statistics against direct computation, the CLI end to end, argument errors."""
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from ring_attn.cli import main  # noqa: E402
from ring_attn.integrations.kld import kl_statistics, order_statistic_interval  # noqa: E402


def test_statistics_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    a = torch.log_softmax(torch.randn(200, 11, generator=g), -1)
    b = torch.log_softmax(a + 0.1 * torch.randn(200, 11, generator=g), -1)
    t = torch.randint(0, 11, (200,), generator=g)
    s = kl_statistics(a, b, t)
    kl = torch.nn.functional.kl_div(b.double(), a.double(), log_target=True, reduction="none").sum(-1)
    assert s["kl"]["mean"] == pytest.approx(kl.mean().item(), rel=1e-9)
    assert s["kl"]["se"] == pytest.approx(kl.std().item() / math.sqrt(200), rel=1e-9)
    assert s["kl"]["max"] == pytest.approx(kl.max().item(), rel=1e-9)
    lo, hi = s["kl"]["median_ci"]
    assert lo <= s["kl"]["median"] <= hi
    assert s["ppl_stock"]["value"] == pytest.approx(math.exp(-a.double().gather(1, t[:, None]).mean().item()), rel=1e-9)
    assert s["top1_agreement"]["value"] == pytest.approx((a.argmax(-1) == b.argmax(-1)).double().mean().item())
    same = kl_statistics(a, a, t)
    assert same["kl"]["max"] == 0 and same["top1_agreement"]["value"] == 1.0


def test_order_statistic_interval_covers_quantile():
    v = torch.arange(1000, dtype=torch.float64)
    lo, hi = order_statistic_interval(v, 0.99)
    assert lo < 990 < hi and hi <= 999


def test_cli_random_tiny_llama(capsys):
    assert main(["kld", "--tokens", "48", "--ctx", "16", "--json", "--no-progress"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n"] == 47
    assert s["kl"]["mean"] < 1e-5 and s["top1_agreement"]["value"] > 0.95
    assert s["ppl_patched"]["value"] == pytest.approx(s["ppl_stock"]["value"], rel=1e-4)


def test_cli_local_model_dir_and_text_output(tmp_path, capsys):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    assert main(["kld", "--model", str(tmp_path), "--tokens", "20", "--ctx", "8"]) == 0
    captured = capsys.readouterr()
    assert "KL mean" in captured.out and "top-1 agreement" in captured.out
    assert "patched" in captured.err  # the progress bar goes to stderr


@pytest.mark.parametrize("model_name", ["phi3-longrope", "gemma2-swa", "qwen3"])
def test_cli_other_families(model_name, tmp_path, capsys):
    """A saved model of another family (Phi-3 LongRoPE past its switch at 12 tokens, Gemma 2 soft-capping and
    windows, Qwen3): the patched model's next-token distributions equal the stock model's."""
    from hf_models import available, build

    if not available(model_name):
        pytest.skip(f"this transformers has no {model_name} model")
    build(model_name).save_pretrained(tmp_path)
    assert main(["kld", "--model", str(tmp_path), "--tokens", "32", "--ctx", "16", "--json", "--no-progress"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["kl"]["mean"] < 1e-5 and s["top1_agreement"]["value"] > 0.95


@pytest.mark.parametrize("argv,word", [
    (["--tokens", "0"], "--tokens"),
    (["--ctx", "1"], "--ctx"),
    (["--model", "/nonexistent/dir"], "--model"),
    (["--dtype", "int8"], "--dtype"),
    (["--device", "tpu"], "--device"),
    (["--text", "/nonexistent/file.txt"], "--text"),
])
def test_cli_argument_errors(argv, word, capsys):
    with pytest.raises(SystemExit) as e:
        main(["kld", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ring-attn kld: error:") and word in err
