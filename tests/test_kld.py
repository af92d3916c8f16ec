"""``ring-attn kld``: statistics against direct computation, the CLI end to end, argument errors."""
import io
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")

from ring_attn.cli import main  # noqa: E402
from ring_attn.integrations.kld import (kl_statistics, order_statistic_interval, summarize,  # noqa: E402
                                        token_statistics)


def test_statistics_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    a = torch.log_softmax(torch.randn(200, 11, generator=g), -1)
    b = torch.log_softmax(a + 0.1 * torch.randn(200, 11, generator=g), -1)
    t = torch.randint(0, 11, (200,), generator=g)
    s = kl_statistics(a, b, t)
    a64, b64 = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)  # kld works in float64
    kl = torch.nn.functional.kl_div(b64, a64, log_target=True, reduction="none").sum(-1)
    assert s["kl"]["mean"] == pytest.approx(kl.mean().item(), rel=1e-9)
    assert s["kl"]["se"] == pytest.approx(kl.std().item() / math.sqrt(200), rel=1e-9)
    assert s["kl"]["max"] == pytest.approx(kl.max().item(), rel=1e-9)
    lo, hi = s["kl"]["median_ci"]
    assert lo <= s["kl"]["median"] <= hi
    assert s["ppl_stock"]["value"] == pytest.approx(math.exp(-a64.gather(1, t[:, None]).mean().item()), rel=1e-9)
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


def test_kl_noise_floor_is_float64():
    """The same distribution as logits shifted by a constant: KL 0 up to float64 rounding. A float32 log-softmax
    (kld before 2026-12-07) reported ~1e-8 nats of noise here, the size of what it measures."""
    g = torch.Generator().manual_seed(1)
    logits = torch.round(4096 * torch.randn(300, 1000, generator=g)) / 1024  # + 3.0 is exact in float32
    s = kl_statistics(logits, logits + 3.0, torch.randint(0, 1000, (300,), generator=g))
    assert s["kl"]["max"] < 1e-14 and s["kl"]["mean"] < 1e-15
    assert s["top1_agreement"]["value"] == 1.0


def test_small_n_intervals_contain_their_estimates_and_ppl_overflows_to_inf():
    per = token_statistics(torch.randn(3, 7), torch.randn(3, 7), torch.tensor([0, 1, 2]))
    s = summarize(per)
    for q in ("median", "p99"):
        lo, hi = s["kl"][q + "_ci"]
        assert lo <= s["kl"][q] <= hi, (q, s["kl"])
    big = dict(per, nll_stock=torch.full((3,), 800.0, dtype=torch.float64))
    assert summarize(big)["ppl_stock"]["value"] == math.inf


def _save_tiny(path, family="llama", tokenizer=True, **cfg):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the a of and to in is it that was he for on are with as his they be at one have this from".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=cfg.pop("vocab_size", len(vocab)), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **cfg))
    elif family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=1,
                                                                     n_head=2, n_positions=64))
    elif family == "bloom":
        model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=len(vocab), hidden_size=16,
                                                                       n_layer=1, n_head=2))
    else:
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    model.save_pretrained(path)
    if tokenizer:
        tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(path)
    return str(path)


def _error(argv, capsys, code=2):
    with pytest.raises(SystemExit) as e:
        main(["kld", *argv])
    assert e.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_cli_checks_the_model_the_text_and_the_window_up_front(tmp_path, capsys):
    llama = _save_tiny(tmp_path / "llama")
    text = tmp_path / "t.txt"
    text.write_text("the a of and to in is it that was he for on are with as his they be at one " * 4)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    empty = tmp_path / "e.txt"
    empty.write_text("")
    no_type = tmp_path / "notype"
    no_type.mkdir()
    (no_type / "config.json").write_text(json.dumps({"hidden_size": 4}))
    cases = [
        (["--text", str(text)], ["--text", "needs --model"]),
        (["--tokens", "2"], ["--tokens 2", ">= 3"]),
        (["--seed", str(2 ** 70)], ["--seed", "2^63"]),
        (["--tokens", str(10 ** 15)], ["--tokens", "GiB"]),
        (["--model", str(no_type)], ["--model", "cannot read its config.json"]),
        (["--model", _save_tiny(tmp_path / "t5", "t5")], ["--model", "'t5' has no causal-LM head"]),
        (["--model", _save_tiny(tmp_path / "gpt2", "gpt2"), "--ctx", "128"], ["--ctx 128", "64 learned positions"]),
        (["--model", _save_tiny(tmp_path / "notok", tokenizer=False), "--text", str(text)], ["--text", "tokenizer"]),
        (["--model", llama, "--text", str(binary)], ["--text", "not UTF-8"]),
        (["--model", llama, "--text", str(empty)], ["--text", "0 tokens"]),
        (["--model", _save_tiny(tmp_path / "small", vocab_size=5), "--text", str(text)], ["--text", "vocab_size 5"]),
    ]
    for argv, pieces in cases:
        line = _error(argv, capsys)
        assert line.startswith("ring-attn kld: error:"), (argv, line)
        for piece in pieces:
            assert piece in line, (argv, piece, line)
    # a window past a RoPE model's max_position_embeddings is extrapolation: allowed, with a note
    assert main(["kld", "--model", llama, "--ctx", "100", "--tokens", "120", "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    assert "past the model's max_position_embeddings 64" in captured.err
    assert json.loads(captured.out)["kl"]["mean"] < 1e-5
    # a text shorter than --tokens is evaluated whole, with a note (the count showed only in the output's n)
    assert main(["kld", "--model", llama, "--text", str(text), "--tokens", "1000", "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    n = json.loads(captured.out)["n"]
    assert f"has {n + 1} tokens, fewer than --tokens 1000: evaluating {n} predictions" in captured.err


def test_cli_refuses_models_the_patch_cannot_change(tmp_path, capsys):
    """Bloom does not dispatch attention through transformers' AttentionInterface: kld used to report KL 0 and
    100% agreement for it (nothing had been patched). Now exit 1 and one line naming it."""
    line = _error_status(["--model", _save_tiny(tmp_path / "bloom", "bloom"), "--tokens", "20", "--ctx", "8"],
                         capsys)
    assert line.startswith("ring-attn kld: error: BloomForCausalLM does not dispatch its attention"), line


def _error_status(argv, capsys):
    assert main(["kld", *argv]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and "Traceback" not in captured.err
    return lines[-1]


def test_cli_missing_or_corrupt_weights_are_one_line(tmp_path, capsys):
    # the config passes the up-front check; loading the weights raised OSError / SafetensorError tracebacks
    import os

    model = _save_tiny(tmp_path / "llama")
    weights = [f for f in os.listdir(model) if f.endswith((".safetensors", ".bin"))]
    assert weights
    for f in weights:
        with open(os.path.join(model, f), "wb") as fh:
            fh.write(b"garbage")
    line = _error_status(["--model", model, "--tokens", "20", "--ctx", "8", "--no-progress"], capsys)
    assert line.startswith(f"ring-attn kld: error: --model {model}: transformers cannot load its weights ("), line
    for f in weights:
        os.remove(os.path.join(model, f))
    line = _error_status(["--model", model, "--tokens", "20", "--ctx", "8", "--no-progress"], capsys)
    assert "transformers cannot load its weights (OSError" in line, line


def test_cli_non_finite_logits_are_an_error(tmp_path, capsys, monkeypatch):
    """fp16 overflow (or anything else that makes the stock logits NaN) used to print 'nan' statistics with 100%
    top-1 agreement and exit 0; --json printed bare NaN."""
    llama = _save_tiny(tmp_path / "llama")
    import transformers

    real = transformers.LlamaForCausalLM.forward

    def overflowing(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out.logits[..., 0] = float("nan")
        return out
    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", overflowing)
    line = _error_status(["--model", llama, "--tokens", "20", "--ctx", "8", "--json", "--no-progress"], capsys)
    assert "the stock model's logits are not finite at 19 of 19 predicted tokens" in line


def test_progress_off_a_terminal_is_plain_lines(monkeypatch):
    from ring_attn.integrations.kld import Progress

    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    bar = Progress(10, "stock+patched", True, every_s=3600)
    for _ in range(10):
        bar.update(1)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue() and len(lines) == 2  # the first update and the last
    assert lines[-1].startswith("stock+patched [########################] 10/10 tok")


def test_no_progress_silences_stderr(tmp_path, capfd):
    llama = _save_tiny(tmp_path / "llama")
    capfd.readouterr()  # saving the model draws its own bar
    assert main(["kld", "--model", llama, "--tokens", "20", "--ctx", "8", "--no-progress"]) == 0
    captured = capfd.readouterr()
    assert captured.err.strip() == "", captured.err  # not even transformers' "Loading weights" bar
    assert "KL mean" in captured.out
    assert os.path.isdir(llama)
