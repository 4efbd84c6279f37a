"""`icot pipeline`: every stage, then the three-mode evaluation, from one recipe; `icot demo`: the
same on a built-in CPU recipe with generated multiplication data.

Each stage runs as its own `python -m icot train` process, exactly as a user or a SLURM job would
run it, so a completed stage (DONE marker) is skipped and an interrupted one resumes from its
checkpoint. The evaluation table goes into `<run>/results.md`, `results.json` and `results.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from icot.config import STAGES, Paths, load_stage_config
from icot.errors import UserError

MODES = ("no_cot", "explicit", "implicit")
RECIPES = Path(__file__).resolve().parent / "recipes"
DEMO_RECIPE = RECIPES / "demo.yaml"


@dataclass
class StageRun:
    name: str
    steps: int
    work: float = 0.0     # relative cost of the whole stage (see work_per_step); 0 where unknown
    seconds: float = 0.0
    skipped: bool = False
    beside: bool = False  # ran beside the stages in sequence, with half the CPU threads


@dataclass
class Progress:
    """Elapsed time and an estimate of what is left: seconds per unit of work measured on the stages
    run so far, times the work of the stages to come."""

    stages: list[StageRun]
    started: float = field(default_factory=time.time)

    def estimate_left(self, current: int) -> float | None:
        done = [s for s in self.stages[:current] if not s.skipped and s.work]
        if not done:
            return None
        per_unit = sum(s.seconds for s in done) / sum(s.work for s in done)
        return per_unit * sum(s.work for s in self.stages[current:])

    def announce(self, current: int, what: str, estimate: bool = True) -> None:
        elapsed = time.time() - self.started
        left = self.estimate_left(current) if estimate else None
        eta = f", about {format_seconds(left)} of training left" if left is not None else ""
        print(f"[icot pipeline] {what} (elapsed {format_seconds(elapsed)}{eta})", flush=True)


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def planned_steps(config) -> int:
    """Optimizer steps the stage will run (for the time estimate): max_steps or epochs x batches."""
    if config.train.max_steps is not None:
        return config.train.max_steps
    lines = count_lines(config.data.train) if config.data.train else 0
    if config.data.max_train_examples is not None:
        lines = min(lines, config.data.max_train_examples)
    return max(1, int(config.train.epochs * (lines // config.train.batch_size)))


def count_lines(path: str) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


@dataclass
class ExampleLength:
    """Mean words per example part, a stand-in for tokens that needs no tokenizer."""

    question: float
    cot: float
    answer: float


def example_length(path: str | None, sample: int = 1000) -> ExampleLength | None:
    """From the first lines of a local data file; None for a hub dataset or an unreadable file."""
    from icot.data.reader import iter_examples

    if not path or not Path(path).is_file():
        return None
    totals, count = [0, 0, 0], 0
    try:
        for _, example in iter_examples(path, skip_bad=True):
            for index, part in enumerate((example.question, example.cot, example.answer)):
                totals[index] += len(part.split())
            count += 1
            if count == sample:
                break
    except UserError:
        return None
    return ExampleLength(*(total / count for total in totals)) if count else None


def work_per_step(config, length: ExampleLength) -> float:
    """Tokens through the decoders per optimizer step, a training pass (forward and backward) counting
    three forwards. Stages differ a lot here (the teacher reads the CoT, emulation only the input), so
    one stage's seconds per step says little about another's."""
    cot_view = length.question + length.cot + length.answer + 2   # with the two separators
    no_cot_view, prompt = length.question + length.answer + 2, length.question + 1
    trained = {"teacher": cot_view, "no_cot": no_cot_view, "mind_reading": no_cot_view,
               "emulation": prompt, "coupling": prompt + no_cot_view}[config.stage]
    reads_teacher = config.stage in ("mind_reading", "emulation") and not config.method.teacher_state_cache
    return config.train.batch_size * (3 * trained + (cot_view if reads_teacher else 0))


def run_stages(recipe: str | None, overrides: list[str], stages: list[str],
               parallel_baseline: bool = False) -> list[StageRun]:
    """Run the stages in order, each as its own `icot train` process.

    With parallel_baseline the no-CoT baseline, which needs nothing from the other stages, runs beside
    them and each process gets half the CPU threads: small models use a second thread poorly, so on a
    small CPU machine two single-thread processes train about twice as much in the same wall time.
    """
    configs = [load_stage_config(name, recipe, overrides) for name in stages]
    length = example_length(configs[0].data.train) if configs else None   # none for --only=eval
    runs = []
    for config in configs:
        steps = planned_steps(config)
        # Without example lengths every step counts the same.
        runs.append(StageRun(config.stage, steps, steps * (work_per_step(config, length) if length else 1.0)))
    beside = {"no_cot"} if parallel_baseline else set()
    # The estimate covers the stages in sequence; one running beside them is announced on its own.
    progress = Progress([run for run in runs if run.name not in beside])
    environment = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2))) if beside else None
    background: list[tuple[StageRun, subprocess.Popen, float]] = []
    done_in_sequence = 0
    # Stages beside the sequence start first, so they overlap all of it, the teacher included.
    order = sorted(range(len(runs)), key=lambda i: runs[i].name not in beside)
    for index in order:
        run, config = runs[index], configs[index]
        label = f"stage {index + 1}/{len(runs)} {run.name}"
        if (Paths.of(config).root / "DONE").exists():
            run.skipped, run.seconds = True, completed_stage(Paths.of(config).root).seconds
            done_in_sequence += run.name not in beside
            progress.announce(done_in_sequence, f"{label}: already complete, skipped")
            continue
        command = [sys.executable, "-m", "icot", "train", run.name, *(["--config", recipe] if recipe else []),
                   *overrides]
        if run.name in beside:
            run.beside = True
            progress.announce(done_in_sequence, f"{label}: {run.steps} steps, beside the other stages")
            quiet = dict(environment, ICOT_PROGRESS_BAR="0")   # its validation lines still show
            background.append((run, subprocess.Popen(command, env=quiet), time.time()))
            continue
        progress.announce(done_in_sequence, f"{label}: {run.steps} steps")
        started = time.time()
        try:
            returncode = subprocess.run(command, env=environment).returncode
            run.seconds = time.time() - started
            _check_stage_ended(run, config, returncode)
        except BaseException:   # a failed stage or Ctrl-C: the stages beside it stop too
            _stop(background)
            raise
        done_in_sequence += 1
    for run, process, started in background:
        # No estimate: its own validation lines show how far it is.
        progress.announce(done_in_sequence, f"waiting for {run.name}, which runs beside the others", estimate=False)
        returncode = process.wait()
        run.seconds = time.time() - started
        _check_stage_ended(run, configs[runs.index(run)], returncode)
    progress.announce(done_in_sequence, "all stages complete")
    return runs


def _stop(background: list[tuple[StageRun, subprocess.Popen, float]]) -> None:
    """End the stages running beside a failed one; they saved checkpoints and resume on the next run."""
    for _, process, _ in background:
        if process.poll() is None:
            process.terminate()
            process.wait()


def _check_stage_ended(run: StageRun, config, returncode: int) -> None:
    if returncode != 0:
        raise UserError(f"stage {run.name} failed (exit code {returncode}); rerun the same command to resume it")
    if not (Paths.of(config).root / "DONE").exists():
        raise UserError(f"stage {run.name} stopped before the end (preempted?); rerun to resume")


def completed_stage(folder: Path) -> StageRun:
    """A stage finished by an earlier invocation, as its manifest records it."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        manifest = {}
    return StageRun(folder.name, int(manifest.get("steps", 0)), seconds=float(manifest.get("wall_seconds", 0.0)),
                    skipped=True)


def evaluate_all(run_dir: Path, data: str, batch_size: int, max_examples: int | None) -> dict[str, dict]:
    from icot.evaluate import evaluate_mode

    results = {}
    for mode in MODES:
        print(f"[icot pipeline] evaluating {mode} on {data}", flush=True)
        results[mode] = evaluate_mode(mode, run_dir, data, batch_sizes=(1, batch_size), max_examples=max_examples)
    return results


def machine_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


MODE_NAMES = {"no_cot": "No CoT", "explicit": "Explicit CoT (teacher)", "implicit": "Implicit CoT (emulator + student)"}


def write_results(run_dir: Path, stages: list[StageRun], evaluation: dict[str, dict], data: str,
                  total_seconds: float) -> None:
    results = {
        "machine": machine_description(),
        "test_data": data,
        "modes": evaluation,
        "stages": {s.name: {"steps": s.steps, "seconds": round(s.seconds, 1), "skipped": s.skipped, "beside": s.beside}
                   for s in stages},
        "wall_seconds": round(total_seconds, 1),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# icot results: {run_dir}", "", f"Machine: {results['machine']}. Test data: `{data}`.", "",
             "| mode | accuracy | token accuracy | examples/s (batch 1) | examples/s (batched) |",
             "|---|---|---|---|---|"]
    for mode in MODES:
        r = evaluation[mode]
        lines.append(f"| {MODE_NAMES[mode]} | {100 * r['accuracy']:.1f}% | {100 * r['token_accuracy']:.1f}% | "
                     f"{r['examples_per_s_batch1']:.1f} | {r['examples_per_s_batched']:.1f} "
                     f"(batch {r['batch_size']}) |")
    lines += ["", "| stage | steps | wall time |", "|---|---|---|"]
    for s in stages:
        note = " (earlier run)" if s.skipped else " (beside the other stages, half the threads)" if s.beside else ""
        lines.append(f"| {s.name} | {s.steps} | {format_seconds(s.seconds)}{note} |")
    lines += ["", f"Total wall time of this invocation: {format_seconds(total_seconds)}.", ""]
    (run_dir / "results.md").write_text("\n".join(lines))
    plot_results(run_dir, stages, evaluation)


def validation_curve(stage_folder: Path, tag: str = "valid/accuracy") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (stage_folder / "tb").is_dir():
        return []
    events = EventAccumulator(str(stage_folder / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags().get("scalars", []):
        return []
    return [(e.step, e.value) for e in events.Scalars(tag)]


def plot_results(run_dir: Path, stages: list[StageRun], evaluation: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in MODES:
        r = evaluation[mode]
        left.scatter(r["examples_per_s_batch1"], 100 * r["accuracy"], s=60, label=MODE_NAMES[mode])
        left.annotate(f"{100 * r['accuracy']:.0f}%", (r["examples_per_s_batch1"], 100 * r["accuracy"]),
                      textcoords="offset points", xytext=(6, 4))
    left.set_xlabel("examples/s (batch 1)")
    left.set_ylabel("test accuracy (%)")
    left.set_ylim(-5, 105)
    left.set_title("accuracy vs throughput")
    left.legend(fontsize=8)
    for s in stages:
        curve = validation_curve(run_dir / s.name)
        if curve:
            steps, values = zip(*curve)
            right.plot(steps, [100 * v for v in values], marker="o", label=s.name)
    right.set_xlabel("optimizer step")
    right.set_ylabel("validation accuracy (%)")
    right.set_ylim(-5, 105)
    right.set_title("validation accuracy during training")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(run_dir / "results.png", dpi=110)
    plt.close(figure)


def parse_pipeline_args(overrides: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="icot pipeline", add_help=True)
    parser.add_argument("--config", help="the recipe (YAML)")
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join((*STAGES, "eval")))
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument("--eval_max_examples", type=int, default=None)
    parser.add_argument("--parallel_baseline", action="store_true",
                        help="train the no-CoT baseline beside the other stages, half the CPU threads each")
    args, rest = parser.parse_known_args(overrides)
    if args.config is not None and not Path(args.config).is_file():
        raise UserError(f"--config: no such recipe file {args.config}")
    return args, rest


def pipeline_cli(overrides: list[str]) -> None:
    args, rest = parse_pipeline_args(overrides)
    run_pipeline(args.config, rest, only=args.only, eval_batch_size=args.eval_batch_size,
                 eval_max_examples=args.eval_max_examples, parallel_baseline=args.parallel_baseline)


def run_pipeline(recipe: str | None, overrides: list[str], only: str | None = None, eval_batch_size: int = 32,
                 eval_max_examples: int | None = None, parallel_baseline: bool = False) -> dict:
    started = time.time()
    wanted = [s.strip() for s in only.split(",")] if only else [*STAGES, "eval"]
    unknown = [s for s in wanted if s not in (*STAGES, "eval")]
    if unknown:
        raise UserError(f"--only: unknown step(s) {', '.join(unknown)}; choose from {', '.join((*STAGES, 'eval'))}")
    config = load_stage_config("teacher", recipe, overrides)   # validates the recipe before anything runs
    run_dir = Path(config.run_dir)
    stages = run_stages(recipe, overrides, [s for s in STAGES if s in wanted], parallel_baseline)
    if "eval" not in wanted:
        return {}
    if config.data.test is None:
        raise UserError("data.test: the pipeline evaluates on the test split; name a file")
    evaluation = evaluate_all(run_dir, config.data.test, eval_batch_size, eval_max_examples)
    all_stages = stages if len(stages) == len(STAGES) else [completed_stage(run_dir / s) for s in STAGES]
    write_results(run_dir, all_stages, evaluation, config.data.test, time.time() - started)
    print((run_dir / "results.md").read_text(), flush=True)
    return evaluation


@dataclass
class DemoData:
    """The demo's generated task: digits_a x digits_b multiplication, disjoint splits.

    layout "columns" writes the schoolbook column sums as the CoT (see icot/data/multiply.py): the
    teacher's states then hold every answer digit; the recipe's notes say why the demo needs it.
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
        build_tokenizer([data_dir / "train.txt"], kind="word", out=tokenizer_dir)
    paths = [f"--run_dir={out / 'run'}", f"--data.train={data_dir / 'train.txt'}",
             f"--data.valid={data_dir / 'valid.txt'}", f"--data.test={data_dir / 'test.txt'}",
             f"--model.tokenizer={tokenizer_dir}"]
    return run_pipeline(recipe, paths + list(overrides), eval_max_examples=eval_max_examples,
                        parallel_baseline=parallel_baseline)
