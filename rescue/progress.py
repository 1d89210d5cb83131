"""One tqdm bar per stage; the execute and verify totals grow as dedupe reveals the work."""

from __future__ import annotations

from tqdm.auto import tqdm


class StageBars:
    def __init__(self, *, enabled: bool, plan_total: int) -> None:
        self._bars: dict[str, tqdm] = {}
        if enabled:
            for pos, (stage, total) in enumerate(
                    (("plan", plan_total), ("execute", 0), ("verify", 0))):
                self._bars[stage] = tqdm(total=total, desc=f"{stage:<7}", position=pos,
                                         unit="hyp" if stage == "plan" else
                                         ("prompt" if stage == "execute" else "mask"),
                                         leave=True, dynamic_ncols=True)

    def grow(self, stage: str, n: int) -> None:
        bar = self._bars.get(stage)
        if bar is not None and n:
            bar.total += n
            bar.refresh()

    def update(self, stage: str, n: int = 1) -> None:
        bar = self._bars.get(stage)
        if bar is not None and n:
            bar.update(n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
