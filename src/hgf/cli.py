"""``hgf`` command line: one module per subcommand under ``hgf.commands``.

Each command module defines ``register(subparsers)`` which adds its parser and sets
``func(args, overrides) -> int | None``. Config overrides (``--section.key=value``) are the
arguments argparse does not know; commands that take none reject them. User errors print one line
``hgf: error: ...`` and exit 2: HGFError, and OSErrors of the user's files and disks (full disk,
read-only folder, permission, a file where a folder is expected; see hgf.errors).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hgf.errors import exit_code

COMMANDS = ["info", "data", "train", "eval", "generate", "plot", "bench", "export", "reproduce",
            "convert", "plan"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hgf",
        description="Train, evaluate, export and run 1.58-bit language models with "
        "Hybrid Gated Flow. Config keys can be overridden with --section.key=value.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"hgf.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"hgf.commands.{name}":
                raise
            continue  # command not built yet
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return exit_code(lambda: args.func(args, extra))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
