"""Worker process entry point: ``python -m vidssl.shard.worker FD`` (started by the shard pipeline)."""

from __future__ import annotations

import os
import signal
import sys


def _worker_main(fd: int) -> None:
    """Worker loop (``python -m vidssl.shard.worker FD``): receive a ShardTask (vidssl.shard.tasks), send back the result.

    ``None`` ends it. Workers are plain subprocesses, not multiprocessing children, so they never
    re-import the caller's ``__main__`` (scripts without a main guard, stdin, notebooks all work).
    """
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        import av.logging

        av.logging.set_level(None)  # PyAV's logging bridge can deadlock: keep it off
    except Exception:  # noqa: BLE001 - only a log setting
        pass
    from vidssl.shard.transcode import process_input

    conn = Connection(fd)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            # Exit at once: interpreter teardown (module and PyAV cleanup) took ~0.1 s per run,
            # all of it on the caller's clock, and there is nothing left to flush.
            conn.close()
            os._exit(0)
        conn.send(process_input(task))


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]))
