"""The layering of docs/design.md, checked on the source: imports flow one way (cli → integrations → ring → ops
→ backends → the leaf modules) and no module imports another module's private (``_x``) names."""
import ast
import os
import sys

import pytest

from ring_attn import cli

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ring_attn")

# Higher imports lower. The command-line subcommands (cli.SUBCOMMANDS) are the top layer wherever they live.
LEAVES = {"ring_attn._version", "ring_attn._contracts", "ring_attn._cli_support", "ring_attn.reference",
          "ring_attn.rope_scaling", "ring_attn._C"}
LEVELS = [("ring_attn.backends", 1), ("ring_attn.ops", 2), ("ring_attn.ring", 3), ("ring_attn.integrations", 5),
          ("ring_attn.compat", 6), ("ring_attn.bert_padding", 6), ("ring_attn.layers", 6), ("ring_attn.cli", 7),
          ("ring_attn.__main__", 8)]
ROOT_LEVEL = 4  # the package's __init__: the public API re-exported from ops, ring and backends
CLI_LEVEL = 7


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _level(module: str) -> int:
    if module in LEAVES:
        return 0
    if module == "ring_attn":
        return ROOT_LEVEL
    if module in {m for m, _ in cli.SUBCOMMANDS.values()}:
        return CLI_LEVEL
    for prefix, level in LEVELS:
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise AssertionError(f"{module} has no layer in tests/test_architecture.py (add it, and to docs/design.md)")


def _top_package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _imports(module: str, path: str):
    """(imported module, imported name or None, line) for every ring_attn import of ``module``."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ring_attn"):
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                target = ".".join(parts + ([target] if target else []))
            if target.startswith("ring_attn"):
                for alias in node.names:
                    yield target, alias.name, node.lineno


def _edges():
    modules = _modules()
    for module, path in sorted(modules.items()):
        for target, name, line in _imports(module, path):
            # `from ring_attn.ring import layout` imports the module ring_attn.ring.layout
            full = f"{target}.{name}" if name and f"{target}.{name}" in modules else target
            yield module, full, name, f"{os.path.relpath(path, os.path.dirname(PKG))}:{line}"


def test_every_module_has_a_layer():
    for module in _modules():
        _level(module)


def test_imports_flow_one_way():
    bad = []
    for module, target, _name, where in _edges():
        same_package = _top_package(module) == _top_package(target) and module != "ring_attn"
        if not same_package and _level(target) >= _level(module):
            bad.append(f"{where}: {module} (layer {_level(module)}) imports {target} (layer {_level(target)})")
    assert not bad, "\n".join(bad)


def test_no_private_names_cross_modules():
    bad = [f"{where}: {module} imports {target}.{name}" for module, target, name, where in _edges()
           if name and name.startswith("_") and not name.startswith("__") and f"{target}.{name}" not in _modules()]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from ring_attn.integrations import hf\n", "imports ring_attn.integrations.hf"),
    ("from ring_attn.ops.attention import _attention\n", "imports ring_attn.ops.attention._attention"),
])
def test_the_checks_catch_a_violation(tmp_path, monkeypatch, source, expected):
    """A planted upward import in a backend module, and a planted private import, are both reported."""
    planted = tmp_path / "ring_attn" / "backends"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text(source)
    (tmp_path / "ring_attn" / "__init__.py").write_text("")
    (tmp_path / "ring_attn" / "integrations").mkdir()
    (tmp_path / "ring_attn" / "integrations" / "__init__.py").write_text("")
    (tmp_path / "ring_attn" / "integrations" / "hf.py").write_text("")
    (tmp_path / "ring_attn" / "ops").mkdir()
    (tmp_path / "ring_attn" / "ops" / "__init__.py").write_text("")
    (tmp_path / "ring_attn" / "ops" / "attention.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PKG", str(tmp_path / "ring_attn"))
    check = test_imports_flow_one_way if "integrations" in source else test_no_private_names_cross_modules
    with pytest.raises(AssertionError, match=expected.replace(".", r"\.")):
        check()
