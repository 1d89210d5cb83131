"""The README's test command, timed: wall and CPU seconds of `python -m pytest` on this machine.

    python benchmarks/bench_suite.py [pytest args...]

Runs the suite as the README says (`python -m pytest`, from the repository root) and prints
its closing line, the wall time, the CPU seconds of pytest and everything it started (user +
system), and the load average before and after: the README's suite figure comes from here.
Prints; asserts nothing (its exit status is pytest's).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-rfE", *sys.argv[1:]], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = proc.stdout.strip().splitlines()
    for line in lines:  # what failed, as pytest's short summary names it
        if line.startswith(("FAILED ", "ERROR ")):
            print(line)
    print(lines[-1] if lines else proc.stderr[-2000:])
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores: wall {wall / 60:.1f} min, "
          f"CPU {(ru.ru_utime + ru.ru_stime) / 60:.1f} min; load average {load0:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
