"""Progress for long loops: a tqdm bar on a terminal, plain log lines elsewhere (CI, Slurm output
files, Ray workers' forwarded stdout), nothing when off.

Loops take a ``Progress`` factory (``progress=None`` means silent) and call::

    bar = progress(total=len(loader), desc="epoch 1/4", unit="img")
    bar.update(n_images, loss=0.41, acc=0.85)   # postfix shown beside throughput
    bar.close()

so the library never decides where output goes; the pipeline builds one per rank-0 process.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional, TextIO

from elastictrain.console import Console

Mode = Literal["auto", "bar", "lines", "off"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class LineBar:
    """One log line every ``every_s`` seconds, and a closing one when there were any (a loop
    shorter than ``every_s`` stays quiet): position, rate, postfix, ETA."""

    def __init__(self, total: Optional[int], desc: str, unit: str, log: Callable[[str], None], every_s: float):
        self.total, self.desc, self.unit, self.log, self.every_s = total, desc, unit, log, every_s
        self.n, self.postfix, self.lines = 0, {}, 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        self.postfix.update(postfix)
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        self.lines += 1
        dt = max(now - self.t0, 1e-9)
        rate = self.n / dt
        where = f"{self.n}/{self.total} ({self.n / self.total:.0%})" if self.total else f"{self.n}"
        eta = f" eta {(self.total - self.n) / rate:.0f}s" if self.total and rate > 0 and self.n < self.total else ""
        extra = "".join(f" {k} {_fmt(v)}" for k, v in self.postfix.items())
        self.log(f"{self.desc}: {where} {self.unit}{extra} {rate:.0f} {self.unit}/s {dt:.0f}s{eta}")

    def close(self) -> None:
        if self.lines:
            self._line(time.monotonic())


class TqdmBar:
    def __init__(self, total: Optional[int], desc: str, unit: str, stream: TextIO):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False,
                        file=stream, mininterval=0.5)

    def update(self, n: int = 1, **postfix) -> None:
        if postfix:
            self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class Silent:
    def update(self, n: int = 1, **postfix) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Progress:
    """A factory of bars: ``mode`` auto = a bar when the terminal is one, lines otherwise. The
    terminal is stderr, or the console's while a ``Console`` (as ``log``) is quiet."""

    mode: Mode = "auto"
    log: Callable[[str], None] = print
    every_s: float = 30.0
    prefix: str = ""

    def __call__(self, total: Optional[int] = None, desc: str = "", unit: str = "it"):
        mode = self.mode
        stream = (self.log.stream if isinstance(self.log, Console) else None) or sys.stderr
        if mode == "auto":
            mode = "bar" if stream.isatty() else "lines"
        desc = f"{self.prefix}{desc}"
        if mode == "bar":
            return TqdmBar(total, desc, unit, stream)
        if mode == "lines":
            return LineBar(total, desc, unit, self.log, self.every_s)
        return Silent()


def bar(progress: Optional[Progress], total: Optional[int] = None, desc: str = "", unit: str = "it"):
    """``progress(...)``, or a silent bar when ``progress`` is None."""
    return progress(total, desc, unit) if progress is not None else Silent()
