"""`icot demo`: the pipeline on a built-in CPU recipe (`icot/recipes/demo.yaml`) with generated
multiplication data and a word-level tokenizer built on it; nothing is downloaded. What the recipe's
settings come from, run by run: docs/DEMO.md."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from icot.errors import UserError
from icot.pipeline import run_pipeline

RECIPES = Path(__file__).resolve().parent / "recipes"
DEMO_RECIPE = RECIPES / "demo.yaml"


@dataclass
class DemoData:
    """The demo's generated task: digits_a x digits_b multiplication, disjoint splits.

    layout "columns" writes the schoolbook column sums as the CoT (see icot/data/multiply.py): the
    teacher's states then hold every answer digit; docs/DEMO.md says why the demo needs it.
    """

    digits_a: int = 3
    digits_b: int = 2
    train: int = 70_000
    valid: int = 500
    test: int = 1000
    seed: int = 0
    layout: str = "columns"


def demo_cli(overrides: list[str]) -> None:
    from icot.data.multiply import LAYOUTS

    parser = argparse.ArgumentParser(prog="icot demo", description="the built-in CPU pipeline")
    parser.add_argument("--out", default="runs/demo", help="folder for data, tokenizer and the run")
    parser.add_argument("--config", default=str(DEMO_RECIPE), help="the recipe (default: the built-in one)")
    defaults = DemoData()
    for name in ("digits_a", "digits_b", "train", "valid", "test", "seed"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name),
                            help=f"generated data: {name} (default {getattr(defaults, name)})")
    parser.add_argument("--layout", choices=LAYOUTS, default=defaults.layout,
                        help=f"the CoT's layout (default {defaults.layout}; see icot data multiply)")
    parser.add_argument("--eval_max_examples", type=int, default=None)
    parser.add_argument("--noparallel_baseline", dest="parallel_baseline", action="store_false",
                        help="train the no-CoT baseline after the other stages instead of beside them")
    args, rest = parser.parse_known_args(overrides)
    data = DemoData(args.digits_a, args.digits_b, args.train, args.valid, args.test, args.seed, args.layout)
    run_demo(Path(args.out), args.config, data, rest, eval_max_examples=args.eval_max_examples,
             parallel_baseline=args.parallel_baseline)


def check_same_data(settings_file: Path, data: DemoData) -> None:
    """A rerun must ask for the data already generated, or its stages would resume on other data."""
    try:
        written = json.loads(settings_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{settings_file}: not valid JSON ({error}); remove {settings_file.parent} to regenerate")
    differing = [f"{key} {written.get(key)!r} (asked: {value!r})" for key, value in asdict(data).items()
                 if written.get(key) != value]
    if differing:
        raise UserError(f"{settings_file.parent} was generated with other settings: {'; '.join(differing)}. "
                        f"Use another --out, or the same settings to resume")


def run_demo(out: Path, recipe: str, data: DemoData, overrides: list[str],
             eval_max_examples: int | None = None, parallel_baseline: bool = True) -> dict:
    """Generate the data and the tokenizer (once), then run the pipeline into `out`."""
    from icot.data.multiply import generate_splits, layout_label
    from icot.data.tokenizer_build import build_tokenizer

    data_dir, tokenizer_dir = out / "data", out / "tokenizer"
    settings_file = data_dir / "demo_data.json"
    if settings_file.exists():
        check_same_data(settings_file, data)
    else:
        print(f"[icot demo] generating {data.digits_a}x{data.digits_b} multiplication"
              f"{layout_label(data.layout)} into {data_dir}", flush=True)
        generate_splits(data_dir, data.digits_a, data.digits_b,
                        {"train": data.train, "valid": data.valid, "test": data.test}, data.seed,
                        layout=data.layout)
        # Written last: its presence means the splits are complete.
        settings_file.write_text(json.dumps(asdict(data), indent=1) + "\n")
    if not (tokenizer_dir / "tokenizer.json").exists():
        # The vocabulary comes from the training split; the few numbers it may lack are appended from the
        # others, which would otherwise be unknown words (an error).
        build_tokenizer([data_dir / "train.txt"], kind="word", out=tokenizer_dir,
                        cover=[data_dir / "valid.txt", data_dir / "test.txt"])
    paths = [f"--run_dir={out / 'run'}", f"--data.train={data_dir / 'train.txt'}",
             f"--data.valid={data_dir / 'valid.txt'}", f"--data.test={data_dir / 'test.txt'}",
             f"--model.tokenizer={tokenizer_dir}"]
    return run_pipeline(recipe, paths + list(overrides), eval_max_examples=eval_max_examples,
                        parallel_baseline=parallel_baseline)
