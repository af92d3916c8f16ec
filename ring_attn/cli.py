"""The ``ring-attn`` console script (also ``python -m ring_attn``).

Each subcommand lives next to the code it exercises and exposes ``add_arguments(parser)``, ``run(args) -> int``
and optionally ``check_args(args)``; this file only wires them up, importing a subcommand's module when it is
used. ``check_args`` runs before ``run`` and checks every flag (ranges, combinations, paths) in this process; a
``ValueError`` or ``TypeError`` from it becomes a one-line argparse error (exit status 2), never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("ring_attn.ring.demo", "ring attention over N ranks (gloo on CPU, NCCL on GPUs), checked against one device"),
    "rope-plan": ("ring_attn.rope_plan", "plan a RoPE context extension: theta rules, YaRN parameters, wavelengths"),
    "kld": ("ring_attn.integrations.kld", "KL divergence and perplexity: stock transformers model vs patched"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (``prog: error: message (see prog --help)``)
    and exit status 2, without argparse's multi-line usage block in front."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (so one subcommand's imports cannot break another)."""
    parser = OneLineErrorParser(prog="ring-attn", description="ring-attn: exact attention over long sequences "
                                                              "(ring attention, fused RoPE) from the command line "
                                                              "(also python -m ring_attn)")
    from ring_attn import __version__

    parser.add_argument("--version", action="version", version=f"ring-attn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.subcommand_parsers = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        parser.subcommand_parsers[name] = p
        if name == command:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), check the flags, run the subcommand; return its exit status.

    Raises:
        SystemExit: status 2 with a one-line ``ring-attn <command>: error: ...`` on stderr for a bad flag
            (argparse's own errors and those of the subcommand's ``check_args``); status 0 for ``--help``.
            (Ctrl-C while a subcommand runs: one line, status 130.)
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    check = getattr(module, "check_args", None)
    if check is not None:
        try:
            check(args)
        except (ValueError, TypeError) as exc:
            parser.subcommand_parsers[args.command].error(str(exc))  # exits with status 2
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for SIGINT, as the demo does
        print(f"ring-attn {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (``ring-attn rope-plan ... | head``): no traceback. Python's own recipe:
        # point stdout at /dev/null so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
