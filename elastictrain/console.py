"""Where a command's output goes: the console gets our lines, a log file everything else.

Other libraries write to the process's file descriptors directly (DeepSpeed's logger, Ray's C++
core, torch's warnings, a compiler), so the only place to separate them from ours is the
descriptors themselves: ``redirected`` points fd 1 and 2 at a log file and hands back a stream on
the *original* stdout for the lines meant for the user. ``Console`` is the log function commands
print through; ``Console.quiet`` does the redirection for a block (unless ``verbose``).
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, TextIO


@contextlib.contextmanager
def redirected(log_file: Path) -> Iterator[TextIO]:
    """fd 1 and 2 (and ``sys.stdout`` / ``sys.stderr``) → ``log_file`` (appended) for the block;
    yields a line-buffered stream on the original stdout. Restored on exit, whatever happens."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    for s in (sys.stdout, sys.stderr):
        s.flush()
    saved = os.dup(1), os.dup(2)
    try:
        real = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        real = False  # a stand-in stream (pytest's capsys, a notebook): it stays the console
    console = open(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace") if real else sys.stdout
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    streams = sys.stdout, sys.stderr
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        # Python's own streams may not be fd 1/2 (pytest's capture, an IDE): point them at the log too
        sys.stdout = sys.stderr = open(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
        yield console
    finally:
        sys.stdout.flush()
        sys.stdout.close()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)
        if real:
            console.close()


class Console:
    """A log function (``console("line")``) for a command's own lines. Inside ``quiet(log_file)``
    everything else the process writes goes to ``log_file``, and so does a copy of each line."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.stream: Optional[TextIO] = None
        """the terminal while quiet (the bar of ``elastictrain.progress`` draws there), else None."""

    def __call__(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)
        if self.stream is not None:
            print(line, flush=True)  # sys.stdout is the log file: it keeps the whole story in order

    @contextlib.contextmanager
    def quiet(self, log_file: Path) -> Iterator[None]:
        if self.verbose or self.stream is not None:
            yield
            return
        with redirected(log_file) as stream:
            self.stream = stream
            try:
                yield
            finally:
                self.stream = None
