"""vidssl: self-supervised learning from raw, unlabelled video.

Importing the package does nothing beyond defining ``__version__``; entry points live in
:mod:`vidssl.cli` and the submodules (``vidssl.footage``, ``vidssl.shard``, ``vidssl.data``,
``vidssl.models``).
"""

__version__ = "0.1.0"
