"""Package-level wiring: the console script (every subcommand listed and importable, --version) and the
import without Triton."""
import importlib
import subprocess
import sys

import pytest

from ring_attn import __version__, cli


def test_every_subcommand_module_has_the_interface():
    for name, (module, _help) in cli.SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run), name


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.SUBCOMMANDS)


def test_python_m_version():
    out = subprocess.run([sys.executable, "-m", "ring_attn", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"ring-attn {__version__}"


def test_missing_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_package_works_without_triton():
    """Where Triton cannot be imported (it is only a dependency on Linux x86_64), the package imports and
    every op runs through the native backend (the reference where the extension is not built)."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, ring_attn\n"
        "from ring_attn import backends\n"
        "exp = 'native' if backends.native_available() else 'reference'\n"
        "assert not backends.triton_available() and backends.select('attention', 'cpu').NAME == exp\n"
        "assert backends.select('rope', 'cpu').NAME == exp\n"
        "q = torch.randn(1, 16, 2, 16, requires_grad=True); k = torch.randn(1, 16, 1, 16)\n"
        "ring_attn.flash_attn_func(q, k, k, causal=True).sum().backward()\n"
        "qr, kr = ring_attn.apply_rope(q, k, torch.arange(16), torch.rand(8))\n"
        "assert qr.shape == q.shape and torch.isfinite(q.grad).all()\n"
        "assert 'ring_attn.backends.triton' not in sys.modules  # imported only when chosen\n"
        "print('OK')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-2000:]
