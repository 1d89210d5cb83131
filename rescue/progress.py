"""One progress display for a run, its total known up front: the samples. Each stage's work
(hypotheses planned, prompts executed, masks verified, ...) is counted beside it, since dedupe
only reveals how much there is as samples are planned.

On a terminal it is one tqdm bar with rate and ETA; in a log file or under SLURM (no TTY) it
is a plain line at most every `every_s` seconds and one at the end, never redraw escapes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from typing import TextIO

log = logging.getLogger("rescue")

UNITS = {"plan": "hyp", "execute": "prompt", "verify": "mask", "compare": "pair",
         "choose": "set"}
"""What each stage's count counts."""


def _clock(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class StageBars:
    """`update(stage, n)` counts work done, `grow(stage, n)` work found, `sample_done()` a
    finished sample; `close()` prints the last line."""

    def __init__(self, *, enabled: bool, samples: int, stream: TextIO | None = None,
                 tty: bool | None = None, every_s: float = 30.0) -> None:
        self.enabled, self.samples, self.every_s = enabled, samples, every_s
        self.done: Counter[str] = Counter()
        self.found: Counter[str] = Counter()
        self.finished = 0
        self._t0 = self._last = time.monotonic()
        stream = stream if stream is not None else sys.stderr
        self._bar = None
        if enabled and (stream.isatty() if tty is None else tty):
            from tqdm import tqdm

            self._bar = tqdm(total=samples, desc="samples", unit="sample", file=stream,
                             dynamic_ncols=True, leave=True)

    def grow(self, stage: str, n: int) -> None:
        self.found[stage] += n

    def update(self, stage: str, n: int = 1) -> None:
        self.done[stage] += n
        self._show()

    def sample_done(self) -> None:
        self.finished += 1
        if self._bar is not None:
            self._bar.update(1)
        self._show()

    def work(self) -> str:
        """Each stage's count so far: `plan 96 hyp | execute 80/84 prompt | verify 40/41 mask`
        (done / found where the work is found as samples go)."""
        parts = []
        for stage, unit in UNITS.items():
            if self.done[stage] or self.found[stage]:
                of = f"/{self.found[stage]}" if self.found[stage] else ""
                parts.append(f"{stage} {self.done[stage]}{of} {unit}")
        return " | ".join(parts)

    def line(self) -> str:
        elapsed = time.monotonic() - self._t0
        rate = self.finished / elapsed if elapsed > 0 else 0.0
        eta = (self.samples - self.finished) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.finished / self.samples if self.samples else 100.0
        return (f"progress: {self.finished}/{self.samples} samples ({pct:.0f}%), "
                f"{rate:.2f} samples/s, elapsed {_clock(elapsed)}, ETA "
                f"{_clock(eta) if eta == eta else '?'}; {self.work()}")

    def _show(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self.work(), refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self.work(), refresh=True)
            self._bar.close()
            self._bar = None
        elif self.enabled:
            log.info("%s", self.line())
