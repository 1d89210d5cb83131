"""The Dataset seam."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from rescue.errors import UserError
from rescue.sample import Sample
from rescue.text import unencodable


class DatasetError(UserError):
    """The dataset as a whole cannot be used (folder missing, split unknown, bad layout)."""


def check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    """A DatasetError naming the option when `value` is not one of `valid`."""
    if value not in valid:
        raise DatasetError(f"{name} must be one of {valid}, got {value!r}")


class SampleError(Exception):
    """One sample cannot be loaded (image missing or corrupt, annotation malformed).

    The pipeline records the sample as failed and goes on. `tags` are the tags the sample
    would carry where its annotation still says (ReasonSeg's long/short from a readable JSON
    whose image is corrupt), so the failure counts in every per-tag row it belongs to.
    """

    def __init__(self, *args: object, tags: Sequence[str] = ()) -> None:
        super().__init__(*args)
        self.tags = tuple(tags)


@runtime_checkable
class Dataset(Protocol):
    name: str

    def sample_ids(self) -> list[str]:
        """Every sample id, in a stable order. Cheap: must not decode images."""
        ...

    def load(self, sample_id: str) -> Sample:
        """Decode one sample; raises SampleError when that sample is unusable."""
        ...


def guarded_load(name: str, sample_id: str, load: Callable[[str], Sample]) -> Sample:
    """`load(sample_id)`, with any unforeseen defect of one sample turned into `SampleError`,
    so that sample is recorded as failed and the run goes on. A query UTF-8 cannot carry (a
    JSON "\\ud800" escape in an annotation, `rescue.text`) is one: no model could be asked."""
    try:
        sample = load(sample_id)
    except SampleError:
        raise
    except Exception as e:
        raise SampleError(f"{name}/{sample_id}: {type(e).__name__}: {e}") from e
    why = unencodable(sample.query)
    if why is not None:
        raise SampleError(f"query:bad_text {name}/{sample_id}: the query has a {why}",
                          tags=sample.tags)
    return sample
