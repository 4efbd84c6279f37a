"""`icot demo [--method M]`: the pipeline on a method's built-in CPU recipe (`Method.demo`, in
icot/recipes/) with generated multiplication data and a word-level tokenizer built on it; nothing is
downloaded. `--method all` runs every method with a demo on one task from one recipe (`demo_all.yaml`:
the shared teacher and no-CoT baseline once) and adds `icot compare`'s table and plot.

The recipe's `demo:` section says what data to generate; where it names an official test file
(`official_test`, e.g. the BIG-bench 4x4 set) and the reference data folder holds it, the run is
evaluated on it and the generated splits share no pair with it; elsewhere a generated test split stands
in, and the run says so. What the recipes' settings come from: docs/DEMO.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from icot import registry
from icot.compare import compare_run
from icot.config import DemoConfig, load_demo, load_methods
from icot.errors import UserError
from icot.files import writable_folder
from icot.pipeline import run_pipeline

RECIPES = Path(__file__).resolve().parent / "recipes"
DEMO_RECIPE = RECIPES / "demo.yaml"
ALL = "all"
ALL_RECIPE = RECIPES / "demo_all.yaml"
REFERENCE_DATA_VARIABLE = "ICOT_REFERENCE_DATA"
REFERENCE_DATA_BESIDE = Path("..") / "shared" / "data"   # beside a checkout, as in this project's workplace


def default_method() -> str:
    return next(m.name for m in registry.methods() if m.default)


def demo_cli(overrides: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="icot demo", description="a method's built-in CPU pipeline")
    parser.add_argument("--method", default=default_method(),
                        choices=[m.name for m in registry.methods() if m.demo] + [ALL],
                        help=f"whose demo (default %(default)s); {ALL}: every method on one task, one table")
    parser.add_argument("--out", help="folder for data, tokenizer and the run (default runs/<the recipe's name>: "
                                      "runs/demo, runs/demo_stepwise, ..., runs/demo_all)")
    parser.add_argument("--config", help="the recipe (default: the method's built-in one)")
    parser.add_argument("--reference_data", help=f"the folder of the official test files, the only one looked in when "
                                                 f"given (default: ${REFERENCE_DATA_VARIABLE}, else "
                                                 f"{REFERENCE_DATA_BESIDE})")
    for f in dataclasses.fields(DemoConfig):
        parser.add_argument(f"--{f.name}", help=f"generated data: {f.metadata['help']} (default: the recipe's)")
    parser.add_argument("--eval_max_examples", type=int, default=None)
    parser.add_argument("--noparallel_baseline", dest="parallel_baseline", action="store_false",
                        help="train the no-CoT baseline after the other stages instead of beside them")
    args, rest = parser.parse_known_args(overrides)
    every = args.method == ALL
    recipe = args.config or str(ALL_RECIPE if every else RECIPES / registry.get_method(args.method).demo)
    if not Path(recipe).is_file():
        raise UserError(f"--config: no such recipe file {recipe}")
    data = load_demo(recipe, {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)
                              if getattr(args, f.name) is not None})
    out = Path(args.out or Path("runs") / Path(recipe).stem)
    writable_folder(out, "--out")   # before the data generation, not in its traceback
    run_demo(out, recipe, data, rest, eval_max_examples=args.eval_max_examples,
             parallel_baseline=args.parallel_baseline, reference_data=args.reference_data)
    if every:
        compare_run(out / "run", load_methods(recipe, rest))


def official_test_file(data: DemoConfig, reference_data: str | None) -> Path | None:
    """The official test file the recipe names, where a reference data folder holds it. A folder given
    explicitly is the only one looked in: pointing it at an empty folder must mean "no official set"."""
    if data.official_test is None:
        return None
    folders = [reference_data] if reference_data else [os.environ.get(REFERENCE_DATA_VARIABLE), REFERENCE_DATA_BESIDE]
    for folder in folders:
        if folder and (Path(folder) / data.official_test).is_file():
            return Path(folder) / data.official_test
    return None


def check_same_data(settings_file: Path, settings: dict) -> None:
    """A rerun must ask for the data already generated, or its stages would resume on other data."""
    try:
        written = json.loads(settings_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{settings_file}: not valid JSON ({error}); remove {settings_file.parent} to regenerate")
    differing = [f"{key} {written.get(key)!r} (asked: {value!r})" for key, value in settings.items()
                 if written.get(key) != value]
    if differing:
        raise UserError(f"{settings_file.parent} was generated with other settings: {'; '.join(differing)}. "
                        f"Use another --out, or the same settings to resume")


def run_demo(out: Path, recipe: str, data: DemoConfig, overrides: list[str], eval_max_examples: int | None = None,
             parallel_baseline: bool = True, reference_data: str | None = None) -> dict:
    """Generate the data and the tokenizer (once), then run the pipeline into `out`."""
    from icot.data.multiply import generate_splits, layout_label
    from icot.data.tokenizer_build import build_tokenizer

    data_dir, tokenizer_dir = out / "data", out / "tokenizer"
    official = official_test_file(data, reference_data)
    settings = {**dataclasses.asdict(data), "official_test_file": str(official.resolve()) if official else None}
    settings_file = data_dir / "demo_data.json"
    if data.official_test and official is None:
        print(f"[icot demo] no {data.official_test} in the reference data folder (--reference_data, "
              f"${REFERENCE_DATA_VARIABLE} or {REFERENCE_DATA_BESIDE}): evaluating on a generated test split "
              f"instead", flush=True)
    if settings_file.exists():
        check_same_data(settings_file, settings)
    else:
        print(f"[icot demo] generating {data.digits_a}x{data.digits_b} multiplication{layout_label(data.layout)} "
              f"into {data_dir}" + (f", sharing no pair with {official}" if official else ""), flush=True)
        sizes = {"train": data.train, "valid": data.valid, "test": 0 if official else data.test}
        generate_splits(data_dir, data.digits_a, data.digits_b, sizes, data.seed, layout=data.layout,
                        exclude=[official] if official else [])
        # Written last: its presence means the splits are complete.
        settings_file.write_text(json.dumps(settings, indent=1) + "\n")
    test = official or data_dir / "test.txt"
    if not (tokenizer_dir / "tokenizer.json").exists():
        # The vocabulary comes from the training split; the few numbers it may lack are appended from the
        # others, which would otherwise be unknown words (an error).
        build_tokenizer([data_dir / "train.txt"], kind="word", out=tokenizer_dir,
                        cover=[data_dir / "valid.txt", test])
    if official:
        print(f"[icot demo] evaluating on the official test set {official}", flush=True)
    paths = [f"--run_dir={out / 'run'}", f"--data.train={data_dir / 'train.txt'}",
             f"--data.valid={data_dir / 'valid.txt'}", f"--data.test={test}", f"--model.tokenizer={tokenizer_dir}"]
    return run_pipeline(recipe, paths + list(overrides), eval_max_examples=eval_max_examples,
                        parallel_baseline=parallel_baseline)
