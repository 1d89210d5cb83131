"""The client package imports no torch, no vLLM, no transformers (the seed insists)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import importlib, pkgutil, sys
import rescue
names = [m.name for m in pkgutil.walk_packages(rescue.__path__, "rescue.")]
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in ("torch", "vllm", "transformers", "sam3") if m in sys.modules)
print(len(names), heavy)
"""


def test_every_client_module_imports_without_heavy_deps():
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    count, heavy = out.stdout.split(" ", 1)
    assert int(count) > 20
    assert heavy.strip() == "[]", f"rescue/ pulled in {heavy.strip()}"
