"""The `icot` command: a Fire dispatcher and nothing more.

Fire guesses types (`a,b` becomes a tuple, `007` becomes 7), so commands that take configuration
overrides read the raw `--key=value` strings from the command line and hand them to the typed config
layer; Fire only picks the command. Every import is lazy so that `icot --help` is fast. A command
returns None and reports failure by raising `UserError` (one line, exit 2) or `SystemExit`.
"""

from __future__ import annotations

import sys

import fire

from icot.errors import UserError


def raw_overrides(argv: list[str], skip: int) -> list[str]:
    """The `--key=value` / `--key value` tokens after the first `skip` positional words."""
    return list(argv[skip:])


class DataCommands:
    """Generate and validate task data."""

    def multiply(self, digits=None, digits_a=None, digits_b=None, train=808000, valid=1000, test=1000,
                 seed=0, out="data/mult", format="txt", layout="paper"):
        """Generate N x M digit multiplication in the paper's format (train/valid/test, disjoint).

        --layout final_sum also writes the last running sum (the answer) in the CoT: `... + Pm ( Sm )`;
        --layout columns writes the column sums as the CoT (icot/data/multiply.py).
        """
        from icot.data.multiply import generate_splits_cli

        generate_splits_cli(digits=digits, digits_a=digits_a, digits_b=digits_b, train=train,
                            valid=valid, test=test, seed=seed, out=out, format=format, layout=layout)

    def check(self, *files, skip_bad=False):
        """Validate data files: format for all, and re-derive multiplication lines from operands."""
        from icot.data.check import check_files_cli

        check_files_cli(list(files), skip_bad=skip_bad)


class TokenizerCommands:
    """Tokenizers for models trained from scratch."""

    def build(self, *files, kind="word", out="tokenizer", vocab_size=8000):
        """Build a word-level (`kind=word`) or sentencepiece (`kind=sentencepiece`) tokenizer."""
        from icot.data.tokenizer_build import build_tokenizer_cli

        build_tokenizer_cli(list(files), kind=kind, out=out, vocab_size=vocab_size)


class Commands:
    """icot: implicit chain-of-thought reasoning via knowledge distillation."""

    def __init__(self, argv: list[str]):
        self._argv = argv
        self.data = DataCommands()
        self.tokenizer = TokenizerCommands()

    def train(self, stage, *_, **__):
        """Train one stage: icot train <stage> --config RECIPE [--key=value ...]."""
        from icot.stages import run_stage

        run_stage(stage, raw_overrides(self._argv, 2))

    def eval(self, *_, **__):
        """Evaluate a mode (no_cot | explicit | implicit) on a data file: accuracy and throughput."""
        from icot.evaluate import evaluate_cli

        evaluate_cli(raw_overrides(self._argv, 1))

    def pipeline(self, *_, **__):
        """Run every stage and the evaluation from one recipe, skipping completed stages."""
        from icot.pipeline import pipeline_cli

        pipeline_cli(raw_overrides(self._argv, 1))

    def demo(self, *_, **__):
        """The built-in CPU pipeline: generated multiplication, small GPT-2 from scratch."""
        from icot.pipeline import demo_cli

        demo_cli(raw_overrides(self._argv, 1))

    def bench(self, *_, **__):
        """Side-by-side throughput and overhead benchmarks."""
        from icot.bench import bench_cli

        bench_cli(raw_overrides(self._argv, 1))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Commands return None (Fire would print anything else) and signal failure by raising.
    try:
        fire.Fire(Commands(argv), command=argv, name="icot")
    except UserError as err:
        print(f"icot: error: {err}", file=sys.stderr)
        sys.exit(2)
