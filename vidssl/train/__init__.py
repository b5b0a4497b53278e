"""Training: typed config sections, tasks, schedules, the DeepSpeed engine, checkpoints, metrics, one loop.

Modules (one concern each): :mod:`~vidssl.train.config` (no torch import), :mod:`~vidssl.train.task`,
:mod:`~vidssl.train.schedule`, :mod:`~vidssl.train.engine` (the only module importing deepspeed),
:mod:`~vidssl.train.checkpoint`, :mod:`~vidssl.train.metrics`, :mod:`~vidssl.train.loop`,
:mod:`~vidssl.train.runner` (config → finished run) and :mod:`~vidssl.train.cli` (``vidssl pretrain``,
``vidssl export``). Importing this package imports nothing heavy. See docs/training.md.
"""
