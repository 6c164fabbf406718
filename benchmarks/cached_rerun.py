"""Target: a cached re-run of a sweep costs at most 2% of its first run.

Runs a tiny-model sweep (configs/tiny-smoke.yaml by default: 2 defences × 2 attacks × 2 seeds, every stage real)
into a fresh cache twice in this process and prints both wall times and their ratio. Attacked weights are dropped
after their evaluations (the default), so the re-run also shows that dropped weights are not recreated when
nothing needs them.

    python benchmarks/cached_rerun.py [--sweep configs/tiny-smoke.yaml] [--set base.model.ref=...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console

from harness.run.sweep import load_sweep, run_sweep

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.02


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", type=Path, default=ROOT / "configs" / "tiny-smoke.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    quiet = Console(quiet=True)
    with tempfile.TemporaryDirectory(prefix="cached-rerun-") as scratch:
        sets = [f"base.cache_dir={scratch}/cache", f"base.output_dir={scratch}/runs", *args.sets]
        sweep = load_sweep(args.sweep, sets)
        times = []
        for _ in range(2):
            started = time.perf_counter()
            run_sweep(sweep, quiet)
            times.append(time.perf_counter() - started)
    ratio = times[1] / times[0]
    print(json.dumps({"sweep": sweep.name, "first_s": round(times[0], 2), "cached_s": round(times[1], 2),
                      "ratio": round(ratio, 4), "target": TARGET, "met": ratio <= TARGET}))


if __name__ == "__main__":
    main()
