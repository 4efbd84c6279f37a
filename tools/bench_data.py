"""Data throughput: lines/s for generating the paper's 808k-line 4x4 train set, and for checking it.

    python tools/bench_data.py [--digits 4] [--lines 808000] [--repeats 3]

Generation is timed end to end (sampling, rendering, writing the file) and in its parts; the figures
are the best of --repeats runs, which is the least disturbed by other work on the machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from icot.data.check import check_file
from icot.data.multiply import RENDER_CHUNK_ROWS, generate_splits, render_rows, sample_pairs


def best_seconds(action, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return min(timings)


def render_all(a_digits, b_digits) -> None:
    for start in range(0, len(a_digits), RENDER_CHUNK_ROWS):
        render_rows(a_digits[start:start + RENDER_CHUNK_ROWS], b_digits[start:start + RENDER_CHUNK_ROWS])


def report(label: str, lines: int, seconds: float) -> None:
    print(f"{label:<36} {seconds:7.3f} s  {lines / seconds:>12,.0f} lines/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--lines", type=int, default=808_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    digits, lines = args.digits, args.lines
    print(f"{digits}x{digits}-digit multiplication, {lines} train lines, best of {args.repeats}, "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="icot-bench-") as folder:
        out = Path(folder)
        sizes = {"train": lines, "valid": 0, "test": 0}
        seconds = best_seconds(lambda: generate_splits(out, digits, digits, sizes, seed=0), args.repeats)
        report("generate train.txt (end to end)", lines, seconds)
        report("  sample distinct pairs", lines,
               best_seconds(lambda: sample_pairs(digits, digits, lines, seed=0), args.repeats))
        a_digits, b_digits = sample_pairs(digits, digits, lines, seed=0)
        report("  render lines (in memory)", lines,
               best_seconds(lambda: render_all(a_digits, b_digits), args.repeats))
        train = out / "train.txt"
        print(f"  file size {train.stat().st_size / 1e6:.1f} MB")
        report("check train.txt (parse + re-derive)", lines,
               best_seconds(lambda: check_file(train), args.repeats))


if __name__ == "__main__":
    main()
