"""Local parquet files in Hugging Face's layout, read through `datasets` (never the hub).

Hub repositories name shards `<split>-00000-of-00004.parquet` (usually under `data/`), or keep a
folder per split. Files are found on disk, grouped by split, and loaded with
`datasets.load_dataset("parquet", data_files=...)`; images stay encoded
(`Image(decode=False)`) so ids can be listed without decoding pixels and a corrupt image fails
its own sample only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rescue import images
from rescue.datasets.base import DatasetError, SampleError

SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "val": ("val", "validation", "valid"),
    "test": ("test",),
    "train": ("train",),
}
_TOKEN = re.compile(r"[-_.\s]+")


def parquet_files(root: Path, data_files: str | Iterable[str] | None = None) -> list[Path]:
    """Explicit `data_files` (globs relative to `root`, or absolute) or every parquet under root."""
    if data_files is None:
        return sorted(p for p in root.rglob("*.parquet") if p.is_file())
    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    found: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_absolute():
            found += sorted(Path(p.anchor).glob(str(p.relative_to(p.anchor))))
        else:
            found += sorted(root.glob(pat))
    return sorted(set(found))


def file_split(path: Path, root: Path, known: Iterable[str]) -> str | None:
    """The known split a file belongs to, by name (`val-00000-of-00001.parquet`,
    `ReasonSeg_test.parquet`) or by folder (`testA/0.parquet`); canonical name (val, not
    validation)."""
    names = {a: canonical_split(a) for s in known for a in split_aliases(s)}
    for tok in _TOKEN.split(path.stem):
        if tok in names:
            return names[tok]
    for part in reversed(path.relative_to(root).parts[:-1]):
        if part in names:
            return names[part]
    return None


def split_aliases(split: str) -> tuple[str, ...]:
    return SPLIT_ALIASES.get(split, (split,))


def canonical_split(name: str) -> str:
    for canon, names in SPLIT_ALIASES.items():
        if name in names:
            return canon
    return name


def files_by_split(files: list[Path], root: Path, known: Iterable[str]) -> dict[str, list[Path]]:
    known = list(known)
    out: dict[str, list[Path]] = {}
    for f in files:
        s = file_split(f, root, known)
        if s is not None:
            out.setdefault(s, []).append(f)
    return out


def load_parquet(files: list[Path], cache_dir: str | Path | None = None) -> Any:
    """One `datasets.Dataset` over the files, images left encoded."""
    import datasets  # deferred: importing `datasets` costs about a second

    try:
        ds = datasets.load_dataset(
            "parquet", data_files=[str(f) for f in files], split="train",
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except Exception as e:
        raise DatasetError(f"cannot read parquet files {[str(f) for f in files]}: {e}") from e
    for col, feat in ds.features.items():
        if isinstance(feat, datasets.Image) and feat.decode:
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds


def image_bytes(cell: Any, what: str, root: Path | None = None) -> bytes:
    """Encoded bytes of an image cell: raw bytes, or `{"bytes", "path"}` as `datasets` stores it."""
    if isinstance(cell, bytes | bytearray | memoryview):
        return bytes(cell)
    if isinstance(cell, Mapping):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        if cell.get("path"):
            p = Path(cell["path"])
            if not p.is_absolute() and root is not None:
                p = root / p
            try:
                return p.read_bytes()
            except OSError as e:
                raise SampleError(f"{what}: image missing: {p}") from e
    if cell is None:
        raise SampleError(f"{what}: image cell is empty")
    raise SampleError(f"{what}: image cell of type {type(cell).__name__} is not bytes or a path")


def image_cell(cell: Any, what: str, root: Path | None = None) -> np.ndarray:
    return images.decode(image_bytes(cell, what, root), what=what)


def mask_cell(cell: Any, what: str) -> np.ndarray:
    """(H, W) uint8 mask from a cell: nested bool/int lists, an array, or PNG bytes (`Image`).

    A mask holding 1s keeps 255 as ignore (LISA's convention); a mask without any 1 is binary
    (PNG masks are often saved as 0/255) and every non-zero pixel is target.
    """
    if isinstance(cell, Mapping | bytes | bytearray | memoryview):
        arr = images.decode_plane(image_bytes(cell, what), what=f"{what} mask")
    else:
        try:
            arr = np.asarray(cell)
            if arr.dtype == object:
                arr = np.asarray([np.asarray(r) for r in cell])
        except (TypeError, ValueError) as e:
            raise SampleError(f"{what}: mask is not a rectangular array: {e}") from e
    if arr.ndim != 2 or arr.dtype == object:
        raise SampleError(f"{what}: mask must be 2-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.number):
        raise SampleError(f"{what}: mask has non-numeric dtype {arr.dtype}")
    if not (arr == 1).any():
        return (arr > 0).astype(np.uint8)  # a 0/255 (or 0/k) binary mask: no ignore label
    return np.where(arr == 255, 255, np.where(arr > 0, 1, 0)).astype(np.uint8)
