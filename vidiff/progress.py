"""Progress of long commands (shards, cache-latents, train, sample, the VAE data tool): a tqdm bar on a terminal;
when the output is not one (CI, SLURM logs) plain lines with the same figures, one at the first update, then every
VIDIFF_PROGRESS_SECONDS (default 30) and at the end, instead of a log full of carriage returns."""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TextIO

from tqdm import tqdm


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """The part of tqdm's interface vidiff uses, printing a line now and then instead of redrawing a bar."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, file: TextIO | None = None, every: float | None = None):
        self.iterable, self.desc, self.unit, self.file = iterable, desc, unit, file or sys.stderr
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.start_n = initial, initial
        self.every = every if every is not None else float(os.environ.get("VIDIFF_PROGRESS_SECONDS", "30"))
        self.postfix: dict[str, str] = {}
        self.started = time.monotonic()
        self.printed: float | None = None
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        if self.total:
            done += f" ({100 * self.n / self.total:.0f}%)"
        eta = f", ETA {_clock((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        return f"{self.desc}: {done}, {rate:.3g} {self.unit}/s, {_clock(elapsed)} elapsed{eta}{extra}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.printed is None or now - self.printed >= self.every:
            self.refresh()

    def refresh(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self.printed = time.monotonic()

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.refresh()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, disable: bool = False, file: TextIO | None = None):
    """A tqdm bar on a terminal, PlainProgress lines otherwise; with disable (other ranks) a silent tqdm."""
    stream = file or sys.stderr
    if disable or stream.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=stream,
                    dynamic_ncols=True, mininterval=1.0)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream)
