"""The `icot` command: a Fire dispatcher and nothing more.

Fire picks the command and parses the plain options of the data and tokenizer commands. It guesses
types (`a,b` becomes a tuple, `007` becomes 7), so the commands that take configuration overrides
(train, config, eval, pipeline, demo, bench) read the raw `--key=value` strings from the command line
and hand them to the typed config layer or their own argument parser. Every import is lazy so that
`icot --help` is fast. A command returns None and reports failure by raising `UserError` (one line,
exit 2) or `SystemExit`.
"""

from __future__ import annotations

import os
import sys

import fire

from icot.errors import UserError


def raw_overrides(argv: list[str], skip: int) -> list[str]:
    """The `--key=value` / `--key value` tokens after the first `skip` positional words."""
    return list(argv[skip:])


class DataCommands:
    """Generate, validate and convert task data."""

    def multiply(self, digits=None, digits_a=None, digits_b=None, train=808000, valid=1000, test=1000,
                 seed=0, out="data/mult", format="txt", layout="paper", exclude=()):
        """Generate N x M digit multiplication in the paper's format (train/valid/test, disjoint).

        --layout final_sum also writes the last running sum (the answer) in the CoT: `... + Pm ( Sm )`;
        --layout columns writes the column sums as the CoT (icot/data/multiply.py).
        --exclude FILE[,FILE]: no generated line shares operands with these files (e.g. the official
        BIG-bench test set and the papers' validation file, for a training set that evaluates on them).
        """
        from icot.data.multiply import generate_splits_cli

        generate_splits_cli(digits=digits, digits_a=digits_a, digits_b=digits_b, train=train,
                            valid=valid, test=test, seed=seed, out=out, format=format, layout=layout,
                            exclude=exclude)

    def check(self, *files, skip_bad=False):
        """Validate data: format for all, and re-derive multiplication lines from operands.

        Args:
          files: text files of INPUT||COT #### ANSWER lines, Coconut JSON lists or dataset folders, each
            read as `icot data convert --help` says. A bad line is named by file and line, a bad record
            by file, record index (from 0) and the key at fault.
          skip_bad: count malformed lines or records instead of failing on them.
        """
        from icot.data.check import check_files_cli

        check_files_cli(list(files), skip_bad=skip_bad)

    def convert(self, source=None, out=None, skip_bad=False):
        """Write any data icot reads as its text lines: icot data convert SOURCE --out FILE.txt.

        The format of SOURCE is read from SOURCE itself, as data.train/valid/test are read. A record
        becomes the line question||cot #### answer, its steps joined by single spaces (Coconut split
        GSM8K-Aug's CoT on them, so its equations come back as they were).

        Args:
          source: the data to convert, in one of three formats. A text file of INPUT||COT #### ANSWER
            lines. A JSON file holding a list of records with the keys question, steps (a list of
            strings) and answer, as Coconut writes them; other keys are ignored. A `datasets` folder of
            one split with the columns question, cot (or steps) and answer, as CODI's GSM8k-Aug; that is
            a saved Dataset, the folder of one split of a saved DatasetDict, or parquet, json or csv files.
          out: the text file to write, never SOURCE. It is replaced only once every example is written,
            so an error leaves an existing file as it was.
          skip_bad: skip malformed lines or records (counted) instead of stopping at the first.
        """
        from icot.data.convert import convert_cli

        convert_cli(source, out=out, skip_bad=skip_bad)


class TokenizerCommands:
    """Tokenizers for models trained from scratch."""

    def build(self, *files, kind="word", out="tokenizer", vocab_size=8000, cover=()):
        """Build a word-level (`kind=word`) or sentencepiece (`kind=sentencepiece`) tokenizer.

        --cover FILE[,FILE] (word kind): every word of these files (a validation or test split) is in the
        vocabulary too, after the words of FILE..., whose ids do not depend on them.
        """
        from icot.data.tokenizer_build import build_tokenizer_cli

        build_tokenizer_cli(list(files), kind=kind, out=out, vocab_size=vocab_size, cover=cover)


def stage_list() -> str:
    from icot import registry

    lines = ["icot train STAGE --config RECIPE [--key=value ...]; `icot train STAGE --help` lists its keys.", ""]
    for method in registry.methods():
        lines.append(f"{method.name}: {method.title}")
        lines.extend(f"  {spec.name:14s} {spec.title}" for spec in method.stages)
    return "\n".join(lines)


class Commands:
    """icot: implicit chain-of-thought reasoning, every method on one engine and one evaluation."""

    def __init__(self, argv: list[str]):
        self._argv = argv
        self.data = DataCommands()
        self.tokenizer = TokenizerCommands()

    def train(self, stage=None, *_, **__):
        """Train one stage: icot train STAGE --config RECIPE [--key=value ...]; STAGE --help lists its keys."""
        if stage is None or str(stage).startswith("-"):
            print(stage_list())
            return
        from icot.train import run_stage

        run_stage(stage, raw_overrides(self._argv, 2))

    def config(self, *_, **__):
        """Print the resolved config of every stage of a recipe (or --stage S): icot config --config RECIPE."""
        from icot.config_cli import config_cli

        config_cli(raw_overrides(self._argv, 1))

    def stages(self, *_, **__):
        """The stages a recipe trains, in order, with what each reads and the mode it serves."""
        from icot.config_cli import stages_cli

        stages_cli(raw_overrides(self._argv, 1))

    def eval(self, *_, **__):
        """Evaluate one mode (icot eval --help lists them) on a data file: accuracy and throughput."""
        from icot.evaluate import evaluate_cli

        evaluate_cli(raw_overrides(self._argv, 1))

    def pipeline(self, *_, **__):
        """Run every stage of the recipe's methods and the evaluation, skipping completed stages."""
        from icot.pipeline import pipeline_cli

        pipeline_cli(raw_overrides(self._argv, 1))

    def compare(self, *_, **__):
        """Several methods on one task from one recipe: one table and one plot (accuracy, speed, training time)."""
        from icot.compare import compare_cli

        compare_cli(raw_overrides(self._argv, 1))

    def demo(self, *_, **__):
        """The built-in CPU pipeline: generated multiplication, small GPT-2 from scratch."""
        from icot.demo import demo_cli

        demo_cli(raw_overrides(self._argv, 1))

    def bench(self, *_, **__):
        """Side-by-side throughput of every mode and the training-step overhead."""
        from icot.bench import bench_cli

        bench_cli(raw_overrides(self._argv, 1))


def end_after_process_group() -> None:
    """Exit now, without interpreter finalization, if this program ran a process group (train, eval,
    bench): as `Strategy.exit_process` does for several ranks, for one too, since a gloo worker thread
    still releasing the last collective during finalization aborts the process after a finished run
    (exit -6, "terminate called without an active exception"). Everything is written and flushed.
    Only for the program itself (`main()` reading sys.argv), never inside a caller's interpreter."""
    engine = sys.modules.get("icot.engine")   # imported by every command that starts a process group
    if engine is not None and engine.process_group_started:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main(argv: list[str] | None = None) -> None:
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    # Commands return None (Fire would print anything else) and signal failure by raising.
    try:
        fire.Fire(Commands(argv), command=argv, name="icot")
        if as_program:
            end_after_process_group()
    except UserError as err:
        code = getattr(err, "exit_code", 2)   # a signal that stopped the stages (StagesStopped): 128 + it
        print(f"icot: {'error' if code == 2 else 'stopped'}: {err}", file=sys.stderr)
        sys.exit(code)
    except KeyboardInterrupt:   # a stage interrupted by Ctrl-C checkpoints and exits 0 by itself
        print("icot: interrupted", file=sys.stderr)
        sys.exit(130)
