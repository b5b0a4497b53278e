"""``vidssl bench NAME``: benchmarks run by hand; results go to docs/benchmarks.md.

Each benchmark is a module in :data:`BENCHES` providing ``register(subparsers)`` (via
:func:`vidssl.cli.add_command`). Benchmarks measure medians of several runs against a baseline
timed in the same run, because these machines are noisy; they are never unit tests.
"""

from __future__ import annotations

import importlib

BENCHES: list[str] = [
    "vidssl.bench.footage",
    "vidssl.bench.shard",
    "vidssl.bench.loader",
    "vidssl.bench.decode",
    "vidssl.bench.models",
    "vidssl.bench.train",
]


def register(sub) -> None:
    from vidssl.cli import Parser, add_command

    p = add_command(sub, "bench", help="run a benchmark (footage, shard, loader, decode, models, train)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", parser_class=Parser)
    bsub.required = True
    for module in BENCHES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
                continue
            raise
        mod.register(bsub)
