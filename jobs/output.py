"""A Ray Train run's console: each rank's output in ``logs/rank<R>.log``, rank 0's lines on the driver.

Each worker points its file descriptors at its rank's log (``elastictrain.console.redirected``), so
DeepSpeed's and torch's chatter stay there; rank 0 also appends its console lines to
``console.log``, which the driver ``Follower`` prints, so a run on Ray Train shows the same lines
as one process, once each, without Ray's per-process prefixes (Ray's own forwarding of worker
output is off unless ``-v``).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, TextIO


class Follower:
    """Print the lines another process appends to ``path`` (from its end when started), until
    ``stop``; ``stop`` prints what is left. Polls: the writer may be on another node of shared storage."""

    def __init__(self, path: Path, log: Callable[[str], None], every_s: float = 0.2):
        self.path, self.log, self.every_s = path, log, every_s
        self.pos = path.stat().st_size if path.is_file() else 0
        self.partial = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follow-console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._drain()

    def _drain(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        self.pos += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            self.log(line.decode("utf-8", "replace"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
        if self.partial:
            self.log(self.partial.decode("utf-8", "replace"))
            self.partial = b""


def console_writer(path: Path, echo: TextIO) -> Callable[[str], None]:
    """A rank-0 log function: each line to ``echo`` (the rank's log) and appended to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, file=echo, flush=True)
        with open(path, "a", encoding="utf-8") as f:  # one write per line: a follower never sees half of one
            f.write(line + "\n")

    return log


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
