"""`icot pipeline`: every stage of the recipe's methods, then the evaluation of every mode, from one recipe.

The stages come from the registry (`icot.registry.plan`): the shared teacher and no-CoT baseline, then
each method's stages in their declared order. Each stage runs as its own `python -m icot train`
process, exactly as a user or a SLURM job would run it, so a completed stage (DONE marker) is skipped
and an interrupted one resumes from its checkpoint. The results go into `<run>/results.md`,
`results.json` and `results.png` (`icot.report`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from icot import registry
from icot.config import Paths, load_methods, load_stage_config
from icot.errors import StagesStopped, UserError
from icot.report import StageRun, completed_stage, evaluate_all, format_seconds, recorded_seconds, write_results
from icot.stage import DONE_MARKER

EVAL_STEP = "eval"


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


def planned_steps(config) -> int:
    """Optimizer steps the stage will run (for the time estimate): max_steps or epochs x batches."""
    from icot.data.reader import count_examples

    if config.train.max_steps is not None:
        return config.train.max_steps
    lines = count_examples(config.data.train) if config.data.train else 0
    if config.data.max_train_examples is not None:
        lines = min(lines, config.data.max_train_examples)
    return max(1, int(config.train.epochs * (lines // config.train.batch_size)))


def view_tokens(path: str | None, sample: int = 1000) -> dict[str, float] | None:
    """Mean words per view (with-CoT, without-CoT, prompt, separators included) from the first examples of
    local data (a file or a dataset folder), a stand-in for tokens that needs no tokenizer; None for a hub
    dataset or unreadable data."""
    from icot.data.reader import iter_examples

    if not path or not Path(path).exists():
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
    if not count:
        return None
    question, cot, answer = (total / count for total in totals)
    return {"cot": question + cot + answer + 2, "nocot": question + answer + 2, "prompt": question + 1}


def beside_stages(plan: list[registry.StageSpec]) -> set[str]:
    """The stages that can train beside the others: shared ones that read nothing and that no stage of
    the plan reads (the no-CoT baseline)."""
    read = {source for spec in plan for source in spec.reads.values()}
    shared = {m.name for m in registry.methods() if m.shared}
    return {spec.name for spec in plan if spec.method in shared and not spec.reads and spec.name not in read}


def run_stages(recipe: str | None, overrides: list[str], stages: list[str],
               parallel_baseline: bool = False) -> list[StageRun]:
    """Run the stages in order, each as its own `icot train` process.

    With parallel_baseline the no-CoT baseline, which needs nothing from the other stages, runs beside
    them and each process gets half the CPU threads: small models use a second thread poorly, so on a
    small CPU machine two single-thread processes train about twice as much in the same wall time.
    """
    configs = [load_stage_config(name, recipe, overrides) for name in stages]
    tokens = view_tokens(configs[0].data.train) if configs else None   # none for --only=eval
    runs = []
    for config in configs:
        steps = planned_steps(config)
        # Without example lengths every step counts the same.
        work = registry.get_stage(config.stage).load().work_per_step(config, tokens) if tokens else 1.0
        runs.append(StageRun(config.stage, steps, steps * work))
    beside = beside_stages([registry.get_stage(name) for name in stages]) if parallel_baseline else set()
    # The estimate covers the stages in sequence; one running beside them is announced on its own.
    progress = Progress([run for run in runs if run.name not in beside])
    environment = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2))) if beside else None
    background: list[tuple[StageRun, subprocess.Popen]] = []
    done_in_sequence = 0
    # Stages beside the sequence start first, so they overlap all of it, the teacher included.
    order = sorted(range(len(runs)), key=lambda i: runs[i].name not in beside)
    with StageSignals() as signals:
        for index in order:
            run, config = runs[index], configs[index]
            label = f"stage {index + 1}/{len(runs)} {run.name}"
            if (Paths.of(config).root / DONE_MARKER).exists():
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
                background.append((run, signals.start(command, quiet)))
                continue
            progress.announce(done_in_sequence, f"{label}: {run.steps} steps")
            try:
                returncode = signals.start(command, environment).wait()
                signals.check()
                _check_stage_ended(run, config, returncode)
            except BaseException:   # a failed or stopped stage: the stages beside it stop too
                _stop(background)
                raise
            done_in_sequence += 1
        for run, process in background:
            # No estimate: its own validation lines show how far it is.
            progress.announce(done_in_sequence, f"waiting for {run.name}, which runs beside the others",
                              estimate=False)
            returncode = process.wait()
            signals.check()
            _check_stage_ended(run, configs[runs.index(run)], returncode)
    progress.announce(done_in_sequence, "all stages complete")
    return runs


class StageSignals:
    """While stages run, SIGTERM, SIGHUP and SIGINT to the pipeline (a container stop, `kill PID`, a closed
    ssh session, Ctrl-C) go on to every running stage process as SIGTERM: each checkpoints at its next step
    and exits, and the pipeline, having waited for them, stops (`StagesStopped`); a rerun resumes them.
    Without this a signal to the parent alone would orphan the stage, which trained on unattended. SIGTERM,
    not the signal itself: a terminal's Ctrl-C reaches the stage too, and a second SIGINT aborts it; a
    second Ctrl-C to the pipeline kills the stages."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def __init__(self):
        self.processes: list[subprocess.Popen] = []
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StageSignals":
        for number in self.SIGNALS:
            self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def start(self, command: list[str], environment: dict | None) -> subprocess.Popen:
        """A stage process, unless a signal has come (then `StagesStopped`)."""
        self.check()
        process = subprocess.Popen(command, env=environment)
        self.processes.append(process)
        return process

    def check(self) -> None:
        if self.received is not None:
            raise StagesStopped(self.received)

    def _handle(self, number, frame) -> None:
        again = number == signal.SIGINT and self.received == signal.SIGINT
        self.received = number
        running = [process for process in self.processes if process.poll() is None]
        print(f"\n[icot pipeline] {signal.Signals(number).name}: "
              + ("killing the stages" if again else "the running stages checkpoint and exit; waiting for them"),
              file=sys.stderr, flush=True)
        for process in running:
            if again:
                process.kill()
            else:
                process.send_signal(signal.SIGTERM)


def _stop(background: list[tuple[StageRun, subprocess.Popen]]) -> None:
    """End the stages running beside a failed one; they saved checkpoints and resume on the next run."""
    for _, process in background:
        if process.poll() is None:
            process.terminate()
        process.wait()


def _check_stage_ended(run: StageRun, config, returncode: int) -> None:
    if returncode == 2:   # a UserError: bad input, which a rerun alone would meet again
        raise UserError(f"stage {run.name} stopped on the error above; fix it and rerun the same command (completed "
                        f"stages are skipped)")
    if returncode != 0:
        raise UserError(f"stage {run.name} failed (exit code {returncode}); rerun the same command to resume it")
    if not (Paths.of(config).root / DONE_MARKER).exists():
        raise UserError(f"stage {run.name} stopped before the end (preempted?); rerun to resume")
    # One clock for every stage, run now or earlier: the loop's time its manifest records.
    run.seconds = recorded_seconds(Paths.of(config).root)


def pipeline_parser(prog: str = "icot pipeline") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, add_help=True,
                                     description="Every stage of the recipe's methods, then the evaluation "
                                                 "of every mode; completed stages are skipped. Other "
                                                 "--key=value arguments override the recipe.")
    parser.add_argument("--config", help="the recipe (YAML)")
    parser.add_argument("--only", help="comma-separated subset of the run's stages and eval (icot stages "
                                       "--config RECIPE lists them)")
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument("--eval_max_examples", type=int, default=None)
    parser.add_argument("--parallel_baseline", action="store_true",
                        help="train the no-CoT baseline beside the other stages, half the CPU threads each")
    return parser


def parse_pipeline_args(overrides: list[str]) -> tuple[argparse.Namespace, list[str]]:
    args, rest = pipeline_parser().parse_known_args(overrides)
    if args.config is not None and not Path(args.config).is_file():
        raise UserError(f"--config: no such recipe file {args.config}")
    return args, rest


def pipeline_cli(overrides: list[str]) -> None:
    args, rest = parse_pipeline_args(overrides)
    run_pipeline(args.config, rest, only=args.only, eval_batch_size=args.eval_batch_size,
                 eval_max_examples=args.eval_max_examples, parallel_baseline=args.parallel_baseline)


def check_before_training(config, recipe: str | None, overrides: list[str], stages: list[str], evaluates: bool,
                          eval_batch_size: int, eval_max_examples: int | None) -> None:
    """What would stop the run after its stages have trained, checked before the first: every stage's config
    and set-up checks (`icot.preflight`; completed stages are skipped), the run folder, the evaluation's
    arguments and test file."""
    from icot.files import writable_folder
    from icot.preflight import check_stages

    configs = [load_stage_config(name, recipe, overrides) for name in stages]
    writable_folder(Path(config.run_dir), "run_dir")
    if evaluates:
        if eval_batch_size < 1:
            raise UserError(f"--eval_batch_size: must be at least 1, got {eval_batch_size}")
        if eval_max_examples is not None and eval_max_examples < 1:
            raise UserError(f"--eval_max_examples: must be at least 1, got {eval_max_examples}")
        if config.data.test is None:
            raise UserError("data.test: the pipeline evaluates on the test split; name a file")
        if not Path(config.data.test).exists():
            raise UserError(f"data.test: no such file {config.data.test}")
    check_stages([c for c in configs if not (Paths.of(c).root / DONE_MARKER).exists()])


def run_pipeline(recipe: str | None, overrides: list[str], only: str | None = None, eval_batch_size: int = 32,
                 eval_max_examples: int | None = None, parallel_baseline: bool = False) -> dict:
    started = time.time()
    plan = [spec.name for spec in registry.plan(load_methods(recipe, overrides))]
    steps = [*plan, EVAL_STEP]
    wanted = [s.strip() for s in only.split(",")] if only else steps
    unknown = [s for s in wanted if s not in steps]
    if unknown:
        raise UserError(f"--only: unknown step(s) {', '.join(unknown)}; choose from {', '.join(steps)}")
    config = load_stage_config(plan[0], recipe, overrides)   # validates the recipe before anything runs
    run_dir = Path(config.run_dir)
    check_before_training(config, recipe, overrides, [s for s in plan if s in wanted], EVAL_STEP in wanted,
                          eval_batch_size, eval_max_examples)
    stages = run_stages(recipe, overrides, [s for s in plan if s in wanted], parallel_baseline)
    if EVAL_STEP not in wanted:
        return {}
    modes = [spec.mode.name for spec in map(registry.get_stage, plan) if spec.mode is not None]
    evaluation = evaluate_all(run_dir, modes, config.data.test, eval_batch_size, eval_max_examples)
    all_stages = stages if len(stages) == len(plan) else [completed_stage(run_dir / s) for s in plan]
    write_results(run_dir, all_stages, evaluation, config.data.test, time.time() - started)
    print((run_dir / "results.md").read_text(), flush=True)
    return evaluation
