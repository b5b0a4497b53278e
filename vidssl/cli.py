"""The ``vidssl`` command line: verb subcommands, one logging setup, exit codes.

Exit codes: 0 success, 2 usage or config error (one line on stderr), 1 runtime failure (one line
on stderr; the traceback too with ``-v``). ``main(argv)`` returns the code instead of exiting so
tests can call it directly.

Each verb lives in its own module listed in :data:`COMMANDS`; the module provides
``register(subparsers)`` which adds its parser and sets ``func`` (a callable taking the parsed
namespace and returning an exit code or None). Those modules import heavy libraries (torch, av)
inside their functions, not at module level, so ``vidssl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from typing import Sequence

from vidssl import __version__
from vidssl.errors import UserError

log = logging.getLogger("vidssl")

# (verb module, in the order shown by --help). A module registers one or more verbs.
COMMANDS: list[str] = [
    "vidssl.demo",
    "vidssl.footage.cli",
    "vidssl.shard.cli",
    "vidssl.data.cli",
    "vidssl.train.cli",
    "vidssl.bench",
]


class _UsageError(Exception):
    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and lets ``main`` pick the exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(self.prog, message)


def common_options() -> argparse.ArgumentParser:
    """-v/-q, accepted both before and after the verb."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="more log output (-vv for debug); tracebacks on errors")
    p.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS,
                   help="less log output (warnings and errors only)")
    # Appended by the deepspeed launcher (before the verb with --module) and torch.distributed.launch.
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    return p


def build_parser() -> Parser:
    parser = Parser(prog="vidssl", description="Self-supervised learning from raw, unlabelled video: "
                    "footage → shards → streaming loader → pretraining → action recognition.",
                    parents=[common_options()])
    parser.add_argument("--version", action="version", version=f"vidssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for module in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (module == exc.name or module.startswith(exc.name + ".")):  # a verb not built yet in this checkout
                continue
            raise
        mod.register(sub)
    return parser


def add_command(sub: argparse._SubParsersAction, name: str, help: str, description: str | None = None,
                **kwargs) -> argparse.ArgumentParser:
    """Add a verb parser with the common options; used by every ``register``."""
    return sub.add_parser(name, help=help, description=description or help,
                          parents=[common_options()], formatter_class=argparse.RawDescriptionHelpFormatter,
                          **kwargs)


def setup_logging(level: int) -> None:
    """``level``: 0 default (INFO), >0 verbose (DEBUG), <0 quiet (WARNING)."""
    lvl = logging.INFO if level == 0 else (logging.DEBUG if level > 0 else logging.WARNING)
    root = logging.getLogger("vidssl")
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(lvl)
    root.propagate = False
    # PyAV's bridge from FFmpeg's logger to Python logging can deadlock with threads: keep it off.
    try:  # av is a core dependency, but --help must work even in a broken environment
        import av.logging  # noqa: PLC0415
        av.logging.set_level(None)
    except Exception:  # pragma: no cover
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"{exc.prog}: error: {exc} (see '{exc.prog} --help')", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0)
    verbosity = getattr(args, "verbose", 0) - getattr(args, "quiet", 0)
    setup_logging(verbosity)
    try:
        code = args.func(args)
    except UserError as exc:
        if verbosity > 0:
            traceback.print_exc()
        print(f"vidssl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vidssl {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: one line, traceback with -v
        if verbosity > 0:
            traceback.print_exc()
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"vidssl {args.command}: failed: {type(exc).__name__}: {msg} (rerun with -v for the traceback)",
              file=sys.stderr)
        return 1
    return int(code or 0)


def console() -> None:  # pragma: no cover - the installed entry point
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    console()
