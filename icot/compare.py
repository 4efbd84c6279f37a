"""`icot compare`: several methods on one task, from one recipe, measured by the one harness.

Runs `icot pipeline` with the union of the methods' stages (the shared teacher and no-CoT baseline once;
completed stages are skipped), then writes `<run_dir>/compare.md`, `compare.json` and `compare.png`: for
every method, the accuracy of each of its modes, examples/s at batch 1 and batched, and the training
wall time of its own stages (and of the shared stages it reads, beside it); the plot adds every
stage's validation accuracy against its steps, curriculum changes marked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from icot import registry
from icot.config import load_methods, load_stage_config
from icot.errors import UserError
from icot.pipeline import run_pipeline
from icot.report import format_seconds, mode_title, plot_validation_curves


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def compare_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="icot compare", description="Several methods on one task from one recipe: one table "
                                                      "and one plot. Other --key=value arguments override the recipe.")
    parser.add_argument("--config", help="the recipe (YAML)")
    parser.add_argument("--methods", help="comma-separated methods (default: the recipe's methods:); "
                                          f"registered: {', '.join(registry.method_names())}")
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument("--eval_max_examples", type=int, default=None)
    parser.add_argument("--parallel_baseline", action="store_true",
                        help="train the no-CoT baseline beside the other stages, half the CPU threads each")
    return parser


def compare_cli(overrides: list[str]) -> None:
    args, rest = compare_parser().parse_known_args(overrides)
    if args.config is not None and not Path(args.config).is_file():
        raise UserError(f"--config: no such recipe file {args.config}")
    if args.methods:
        rest = [*rest, f"--methods={args.methods}"]
    run_compare(args.config, rest, args.eval_batch_size, args.eval_max_examples, args.parallel_baseline)


def run_compare(recipe: str | None, overrides: list[str], eval_batch_size: int = 32,
                eval_max_examples: int | None = None, parallel_baseline: bool = False) -> dict:
    methods = load_methods(recipe, overrides)
    run_pipeline(recipe, overrides, eval_batch_size=eval_batch_size, eval_max_examples=eval_max_examples,
                 parallel_baseline=parallel_baseline)
    run_dir = Path(load_stage_config(registry.plan(methods)[0].name, recipe, overrides).run_dir)
    return compare_run(run_dir, methods)


def compare_run(run_dir: Path, methods: list[str]) -> dict:
    """The table and plot of a run the pipeline has evaluated (its results.json)."""
    comparison = summarize(json.loads((run_dir / "results.json").read_text()), methods)
    write_comparison(run_dir, comparison)
    print((run_dir / "compare.md").read_text(), flush=True)
    return comparison


def summarize(results: dict, methods: list[str]) -> dict:
    """One row per mode of the run, grouped by method (the shared ones first), with the training wall time
    of the method's own stages and of the shared stages they read."""
    seconds = {name: stage["seconds"] for name, stage in results["stages"].items()}
    rows = []
    shared = [m.name for m in registry.methods() if m.shared]
    for method in [*shared, *methods]:
        own = [spec for spec in registry.get_method(method).stages if spec.name in seconds]
        reads = sorted({source for spec in own for source in spec.reads.values()} - {spec.name for spec in own})
        for spec in own:
            if spec.mode is None or spec.mode.name not in results["modes"]:
                continue
            mode = results["modes"][spec.mode.name]
            rows.append({
                "method": method, "mode": spec.mode.name, "title": mode_title(spec.mode.name),
                "accuracy": mode["accuracy"], "examples_per_s_batch1": mode["examples_per_s_batch1"],
                "examples_per_s_batched": mode["examples_per_s_batched"], "batch_size": mode["batch_size"],
                "train_seconds": sum(seconds[s.name] for s in own) if method not in shared else seconds[spec.name],
                "stages": [s.name for s in own] if method not in shared else [spec.name],
                "reads_seconds": {name: seconds[name] for name in reads if name in seconds},
                "unfinished": mode.get("unfinished"),
            })
    return {"machine": results["machine"], "test_data": results["test_data"], "rows": rows}


def write_comparison(run_dir: Path, comparison: dict) -> None:
    (run_dir / "compare.json").write_text(json.dumps(comparison, indent=2) + "\n")
    lines = [f"# icot compare: {run_dir}", "", f"Machine: {comparison['machine']}. Test data: "
             f"`{comparison['test_data']}`.", "",
             "| method | mode | accuracy | examples/s (batch 1) | examples/s (batched) | training wall time |",
             "|---|---|---|---|---|---|"]
    for row in comparison["rows"]:
        beside = "".join(f" + {name} {format_seconds(s)}" for name, s in row["reads_seconds"].items())
        lines.append(f"| {row['method']} | {row['title']} | {100 * row['accuracy']:.1f}% | "
                     f"{row['examples_per_s_batch1']:.1f} | {row['examples_per_s_batched']:.1f} (batch "
                     f"{row['batch_size']}) | {format_seconds(row['train_seconds'])} ({', '.join(row['stages'])})"
                     f"{beside} |")
    notes = [f"{row['title']}: {row['unfinished']}." for row in comparison["rows"] if row.get("unfinished")]
    lines += ["", *notes] if notes else []
    lines.append("")
    (run_dir / "compare.md").write_text("\n".join(lines))
    plot_comparison(run_dir, comparison)


def plot_comparison(run_dir: Path, comparison: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison["rows"]
    figure, (left, right, curves) = plt.subplots(1, 3, figsize=(16, 4.2))
    labels = [row["title"] for row in rows]
    left.barh(labels, [100 * row["accuracy"] for row in rows])
    left.set_xlabel("test accuracy (%)")
    left.set_xlim(0, 100)
    left.set_title("accuracy")
    for row in rows:
        right.scatter(row["train_seconds"] / 60, row["examples_per_s_batch1"], s=60, label=row["title"])
    right.set_xlabel("training wall time of its own stages (min)")
    right.set_ylabel("examples/s (batch 1)")
    right.set_title("cost")
    right.legend(fontsize=8)
    stages = list(dict.fromkeys(stage for row in rows for stage in [*row["reads_seconds"], *row["stages"]]))
    plot_validation_curves(curves, run_dir, stages)
    figure.tight_layout()
    figure.savefig(run_dir / "compare.png", dpi=110)
    plt.close(figure)
