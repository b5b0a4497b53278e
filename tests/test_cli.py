"""The CLI boundary: exit codes, one-line errors, --help on every verb, logging flags."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from vidssl import __version__, cli
from vidssl.errors import UserError


def _verbs(parser) -> dict:
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


@pytest.fixture
def fake_verbs(monkeypatch):
    """Register a verb whose behaviour the test controls, through the real registration path."""
    mod = types.ModuleType("vidssl_test_fake_verbs")
    calls = {}

    def run(args):
        calls["args"] = args
        if args.what == "user":
            raise UserError("input 'x.mp4': does not exist")
        if args.what == "crash":
            raise RuntimeError("decoder exploded\nsecond line")
        if args.what == "code":
            return 3
        return 0

    def register(sub):
        p = cli.add_command(sub, "fake", help="a verb for tests")
        p.add_argument("what", choices=["ok", "user", "crash", "code"])
        p.set_defaults(func=run)

    mod.register = register
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, mod.__name__])
    return calls


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vidssl {__version__}"


def test_help_on_every_verb(capsys):
    assert cli.main(["--help"]) == 0
    verbs = _verbs(cli.build_parser())
    assert "bench" in verbs
    for name in verbs:
        assert cli.main([name, "--help"]) == 0, name
        assert "usage: vidssl " + name in capsys.readouterr().out


def test_usage_errors_exit_2_with_one_line(capsys):
    assert cli.main([]) == 2
    assert cli.main(["no-such-verb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2  # one line per failed call, no usage dump, no traceback
    assert "invalid choice: 'no-such-verb'" in err[1]


def test_exit_codes_and_one_line_errors(fake_verbs, capsys):
    assert cli.main(["fake", "ok"]) == 0
    assert cli.main(["fake", "code"]) == 3
    capsys.readouterr()

    assert cli.main(["fake", "user"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "vidssl fake: error: input 'x.mp4': does not exist"

    assert cli.main(["fake", "crash"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "RuntimeError: decoder exploded" in err

    assert cli.main(["-v", "fake", "crash"]) == 1
    assert "Traceback" in capsys.readouterr().err

    assert cli.main(["fake", "bogus"]) == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_verbosity_flags_before_or_after_the_verb(fake_verbs):
    import logging

    assert cli.main(["-q", "fake", "ok"]) == 0
    assert logging.getLogger("vidssl").level == logging.WARNING
    assert cli.main(["fake", "ok", "-v"]) == 0
    assert logging.getLogger("vidssl").level == logging.DEBUG
    assert cli.main(["fake", "ok"]) == 0
    assert logging.getLogger("vidssl").level == logging.INFO


def test_console_script_and_import_is_cheap():
    # Importing the package must not import torch: entry points import heavy libraries lazily.
    out = subprocess.run([sys.executable, "-c", "import sys, vidssl, vidssl.cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    res = subprocess.run([sys.executable, "-m", "vidssl.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and __version__ in res.stdout


def test_bench_decode_refuses_cuda_without_a_gpu_and_runs_its_cpu_smoke_path(tmp_path, capsys):
    # The GPU decode benchmark is prepared for a session with a GPU; here its --device cpu path runs
    # the same plumbing (shards, both loader sides, the JSON) and --device cuda says what is missing.
    import json

    import torch

    if not torch.cuda.is_available():
        assert cli.main(["bench", "decode", "--dir", str(tmp_path / "w")]) == 2
        assert "no GPU is visible" in capsys.readouterr().err
    out = tmp_path / "decode.json"
    assert cli.main(["bench", "decode", "--device", "cpu", "--sizes", "32", "--videos", "2", "--seconds", "2",
                     "--no-samples", "--batches", "2", "--warmup", "1", "--repeats", "1", "--batch-size", "2",
                     "--frames", "4", "--workers", "1", "--dir", str(tmp_path / "w"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())["sizes"]["32"]
    assert res["device"]["clips_s"] > 0 and res["cpu_workers"]["clips_s"] > 0
    assert res["device"]["decode_device"] == "cpu" and res["ratio_device_vs_cpu_workers"] > 0
    assert cli.main(["bench", "decode", "--device", "cpu", "--sizes", "4"]) == 2
    assert "--sizes" in capsys.readouterr().err
