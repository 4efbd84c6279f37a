"""Tokenization throughput: a generated 4x4 multiplication train set, word-level tokenizer, first and cached run.

    python tools/bench_tokenize.py [--lines 808000] [--num-proc 1] [--workdir DIR]

Generates the lines with `icot.data.multiply`, reads them with the project's reader into an Arrow
dataset, builds a word-level tokenizer from the file, then runs `tokenize_dataset` twice into an
empty cache folder: the first run tokenizes, the second must load the cache. Tokens counted are
those of both training views (with-CoT and without-CoT ids) of every example.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc


def timed(action):
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def view_token_count(tokenized) -> int:
    arrow = tokenized.data
    return sum(int(pc.sum(pc.list_value_length(arrow.column(name))).as_py()) for name in ("cot_ids", "nocot_ids"))


def run(lines: int, num_proc: int, workdir: Path) -> dict[str, float]:
    from icot.data.multiply import generate_splits
    from icot.data.reader import load_examples
    from icot.data.tokenizer_build import build_tokenizer
    from icot.data.views import tokenize_dataset

    files, generate_s = timed(lambda: generate_splits(workdir / "mult", 4, 4, {"train": lines}, seed=0))
    train_file = files["train"]
    dataset, load_s = timed(lambda: load_examples(train_file, cache_dir=workdir / "examples"))
    tokenizer, build_s = timed(lambda: build_tokenizer([train_file], kind="word", out=workdir / "tokenizer"))
    cache_dir = workdir / "tokenized"
    first, first_s = timed(lambda: tokenize_dataset(dataset, tokenizer, num_proc=num_proc, cache_dir=cache_dir))
    second, cached_s = timed(lambda: tokenize_dataset(dataset, tokenizer, num_proc=num_proc, cache_dir=cache_dir))
    if second._fingerprint != first._fingerprint or second.cache_files != first.cache_files:
        raise RuntimeError("the second run did not load the first run's cache")
    tokens = view_token_count(first)
    return {"lines": lines, "num_proc": num_proc, "tokens": tokens, "generate_s": generate_s, "load_s": load_s,
            "build_tokenizer_s": build_s, "first_run_s": first_s, "cached_run_s": cached_s,
            "first_tokens_per_s": tokens / first_s, "cached_tokens_per_s": tokens / cached_s}


def report(figures: dict[str, float]) -> str:
    return "\n".join([
        f"4x4 multiplication, {figures['lines']:,} lines, word-level tokenizer, num_proc={figures['num_proc']}",
        f"  generate {figures['generate_s']:.1f} s, read into Arrow {figures['load_s']:.1f} s, "
        f"build tokenizer {figures['build_tokenizer_s']:.1f} s",
        f"  tokens (with-CoT + without-CoT views): {figures['tokens']:,}",
        f"  first run:  {figures['first_run_s']:8.2f} s  {figures['first_tokens_per_s']:14,.0f} tokens/s",
        f"  cached run: {figures['cached_run_s']:8.2f} s  {figures['cached_tokens_per_s']:14,.0f} tokens/s",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=808_000, help="training lines to generate (paper: 808,000)")
    parser.add_argument("--num-proc", type=int, default=1, help="processes for datasets.map")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and caches here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        print(report(run(args.lines, args.num_proc, args.workdir)))
        return
    with tempfile.TemporaryDirectory(prefix="icot-bench-tokenize-") as workdir:
        print(report(run(args.lines, args.num_proc, Path(workdir))))


if __name__ == "__main__":
    sys.exit(main())
