"""The ``ring-attn`` console script (also ``python -m ring_attn``).

Each subcommand lives next to the code it exercises and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up, importing a subcommand's module when it is used.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("ring_attn.ring.demo", "ring attention over N ranks (gloo on CPU, NCCL on GPUs), checked against one device"),
    "rope-plan": ("ring_attn.rope_plan", "plan a RoPE context extension: theta rules, YaRN parameters, wavelengths"),
    "kld": ("ring_attn.integrations.kld", "KL divergence and perplexity: stock transformers model vs patched"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (so one subcommand's imports cannot break another)."""
    parser = argparse.ArgumentParser(prog="ring-attn", description=__doc__.splitlines()[0])
    from ring_attn import __version__

    parser.add_argument("--version", action="version", version=f"ring-attn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    args = build_parser(command).parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
