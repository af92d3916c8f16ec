"""The console script's wiring: every subcommand is listed and importable, --version works."""
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
