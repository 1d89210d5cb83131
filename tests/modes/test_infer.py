"""Single-image mode (`rescue.modes.infer`) with in-test models: it uses the cache it is given,
empty or not, offline or not (issue 14: an empty shared cache was replaced by a private one,
so `offline=true` called the models), and refuses an image over the limit from its header."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rescue.cache import Cache, CacheMiss
from rescue.images import ImageError, ImageLimits
from rescue.modes.infer import infer
from tests.test_pipeline import AreaVerifier, BoxExecutor, ListPlanner

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fixtures" / "bad_images"


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.full((64, 64, 3), 60, np.uint8)).save(path)
    return path


def _infer(image: Path, out: Path, cache: Cache | None, **kw):
    planner, executor, verifier = ListPlanner(), BoxExecutor(), AreaVerifier()
    run = infer(image, "the square", planner, executor, verifier, 4, out, cache=cache,
                check=False, **kw)
    return asyncio.run(run), (planner, executor, verifier)


def test_an_empty_offline_cache_is_used_not_replaced(tmp_path: Path) -> None:
    shared = Cache(tmp_path / "shared", offline=True)
    assert len(shared) == 0
    planner = ListPlanner()
    with pytest.raises(CacheMiss, match="offline=true"):
        asyncio.run(infer(_image(tmp_path), "the square", planner, BoxExecutor(),
                          AreaVerifier(), 4, tmp_path / "out", cache=shared, check=False))
    assert planner.requests == []  # no model was called
    assert not (tmp_path / "out" / "cache").exists()  # and no private cache was written


def test_an_empty_shared_cache_receives_the_answers(tmp_path: Path) -> None:
    image = _image(tmp_path)
    shared = Cache(tmp_path / "shared")
    first, (planner, _, _) = _infer(image, tmp_path / "a", shared)
    assert planner.requests and len(shared) > 0
    assert not (tmp_path / "a" / "cache").exists()
    # a second run, offline, is served entirely from that cache
    again, (planner, executor, verifier) = _infer(image, tmp_path / "b",
                                                  Cache(tmp_path / "shared", offline=True))
    assert planner.requests == [] and executor.prompts == [] and verifier.calls == 0
    assert again.selected == first.selected
    np.testing.assert_array_equal(again.mask, first.mask)


def test_without_a_cache_a_private_one_is_made(tmp_path: Path) -> None:
    _infer(_image(tmp_path), tmp_path / "out", None)
    assert len(Cache(tmp_path / "out" / "cache")) > 0


def test_an_image_over_the_limit_is_refused_before_any_model_call(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"^image:too_large .*12000x12000") as info:
        _infer(CORPUS / "huge_12000.png", tmp_path / "out", None)
    assert (info.value.width, info.value.height) == (12_000, 12_000)
    with pytest.raises(ImageError, match="image:too_large"):  # the limit is the caller's
        _infer(_image(tmp_path), tmp_path / "out", None, limits=ImageLimits(max_pixels=4095))


def test_the_cli_refuses_a_huge_image_in_one_line(tmp_path: Path) -> None:
    """`python run.py experiment=infer image=<12000x12000 PNG>`: one line naming the size
    and the limit, from the header (it took 67 s and 6.6 GB before); `image_max_pixels`
    sets the limit."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="disabled")
    image = tmp_path / "huge.png"
    shutil.copy(CORPUS / "huge_12000.png", image)
    small = _image(tmp_path)

    def run(name: str, *over: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "run.py", "experiment=infer", f"hydra.run.dir={tmp_path / name}",
             f"paths.cache_dir={tmp_path / 'cache'}", "logger=none", "query=the thing", *over],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    lines = {}
    for name, over in (("huge", [f"image={image}"]),
                       ("small", [f"image={small}", "image_max_pixels=100"])):
        proc = run(name, *over)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        lines[name] = proc.stderr.strip().splitlines()[-1]
        assert lines[name].startswith("rescue: image:too_large "), proc.stderr[-2000:]
    assert "12000x12000 = 144000000 px; limits: 33554432 px" in lines["huge"]
    assert "64x64 = 4096 px; limits: 100 px" in lines["small"]
