"""Helpers for the training tests: tiny data and tokenizer, recipes, the CLI in a subprocess, TensorBoard.

Every run goes through the real command line (`python -m icot train ...` or `torchrun ... -m icot
train ...`) in a fresh process, exactly as a user runs it. Models are tiny (2 layers, 32 wide) and runs
a handful of steps, so each stage costs a few seconds, most of it interpreter and DeepSpeed start-up.

Also a pytest plugin (test modules name it in `pytest_plugins`): the session fixtures below run the
five stages once and the CLI, distributed and resume tests share them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from icot.registry import plan

ROOT = Path(__file__).resolve().parents[1]
STAGE_ORDER = tuple(spec.name for spec in plan(["icot_kd"]))   # the shared stages, then ICoT-KD's
TRAIN_TAGS = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s")
VALID_TAGS = ("valid/loss", "valid/token_accuracy", "valid/accuracy")
TINY = {"layers": 2, "hidden": 32, "heads": 2, "max_positions": 128}
RUN_TIMEOUT = 240  # seconds; a hang (a collective on one rank only) fails instead of blocking CI


def make_workspace(folder: Path, train: int = 256, valid: int = 17, test: int = 16) -> Path:
    """3x3 multiplication splits in `folder/data` and a word-level tokenizer in `folder/tok`."""
    from icot.data.multiply import generate_splits
    from icot.data.tokenizer_build import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    files = generate_splits(folder / "data", 3, 3, {"train": train, "valid": valid, "test": test}, seed=0)
    build_tokenizer([str(files["train"])], kind="word", out=folder / "tok")
    return folder


def write_recipe(folder: Path, name: str = "recipe.yaml", family: str = "gpt2", run_dir: str = "run",
                 model: dict | None = None, train: dict | None = None, **sections) -> Path:
    """A small recipe in `folder` (paths relative to it: runs use it as their working directory)."""
    recipe = {
        "run_dir": run_dir,
        "model": {"family": family, **TINY, "tokenizer": "tok", **(model or {})},
        "data": {"train": "data/train.txt", "valid": "data/valid.txt", "test": "data/test.txt"},
        # micro batch 8: one rank accumulates 2 micro batches, two ranks take one each; the grouping of
        # examples into micro batches, hence every loss term, is then the same for both.
        # 17 validation examples, 5 decoded: on two ranks, rank 1 runs a padding batch (9 + 8 rows in
        # batches of 8) and decodes 2 examples to rank 0's 3.
        "train": {"lr": 1.0e-3, "batch_size": 16, "micro_batch_size": 8, "max_steps": 4, "log_every": 1,
                  "eval_examples": 5, **(train or {})},
        **sections,
    }
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The one `icot: error:` line of a run refused with exit 2 and no traceback, holding every needle."""
    output = result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("icot: error:")]
    assert result.returncode == 2 and "Traceback" not in output and len(errors) == 1, output[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def icot_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def train_command(stage: str, recipe: Path | str, *overrides: str, nproc: int = 1) -> list[str]:
    args = ["-m", "icot", "train", stage, "--config", str(recipe), *overrides]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def run_train(cwd: Path, stage: str, recipe: Path | str, *overrides: str, nproc: int = 1, check: bool = True,
              timeout: float = RUN_TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`icot train` in a subprocess (`env`: extra environment variables); with `check`, a failure shows
    its output."""
    result = subprocess.run(train_command(stage, recipe, *overrides, nproc=nproc), cwd=cwd, env=icot_env(**(env or {})),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"icot train {stage} {' '.join(overrides)} (nproc {nproc}) exited {result.returncode}\n"
                    f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def launch_and_signal(cwd: Path, stage: str, recipe: Path | str, *overrides: str, sig: int, at_step: int,
                      nproc: int = 1, env: dict | None = None, log_name: str = "signalled") -> tuple[int, str]:
    """Start `icot train`, send `sig` once it logs step `at_step`; (exit code, its stdout). Its stderr goes
    to `cwd/<log_name>.stderr`. With several ranks the signal goes to every process of the run, as SLURM
    sends USR1 to a job step (torchrun starts each rank in a session of its own, so a process group
    does not reach them); torchrun itself ignores USR1 then, as slurm/stage.sbatch arranges."""
    command = train_command(stage, recipe, *overrides, nproc=nproc)
    if nproc > 1:
        command = ["bash", "-c", 'trap "" USR1; exec "$@"', "launch", *command]
    with open(cwd / f"{log_name}.stderr", "w") as stderr:
        process = subprocess.Popen(command, cwd=cwd, env=icot_env(**(env or {})), stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
        watchdog = threading.Timer(RUN_TIMEOUT, process.kill)  # a hang fails the test instead of blocking
        watchdog.start()
        lines, sent = [], False
        try:
            for line in process.stdout:  # PYTHONUNBUFFERED: each log line arrives as it is written
                lines.append(line)
                match = re.search(r"\] step (\d+)/", line)
                if not sent and match and int(match.group(1)) >= at_step:
                    for pid in [process.pid, *descendants(process.pid)]:
                        os.kill(pid, sig)
                    sent = True
        finally:
            watchdog.cancel()
        code = process.wait(timeout=RUN_TIMEOUT)
    assert sent, "the run finished before it could be interrupted:\n" + "".join(lines)[-3000:]
    return code, "".join(lines)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:   # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard folder as {tag: [(step, value), ...]} in step order, after
    the purges a resumed run's `purge_step` asks for (as TensorBoard itself shows the curves)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def step_losses(tb_dir: Path, tag: str = "train/loss") -> dict[int, float]:
    series = read_scalars(tb_dir)[tag]
    steps = [step for step, _ in series]
    assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
    return dict(series)


def stage_folder_problems(root: Path, stage: str) -> list[str]:
    """What is missing from a finished stage folder (empty when complete)."""
    needed = ["config.yaml", "ds_config.json", "ckpt", "tb", "export", "manifest.json", "DONE"]
    problems = [name for name in needed if not (root / name).exists()]
    if (root / "PREEMPTED").exists():
        problems.append("PREEMPTED left behind")
    if (root / "ckpt").is_dir() and not any((root / "ckpt").glob("step*")):
        problems.append("ckpt has no checkpoint")
    if (root / "tb").is_dir() and not any((root / "tb").glob("events.out.tfevents.*")):
        problems.append("tb has no event file")
    if (root / "manifest.json").is_file():
        manifest = json.loads((root / "manifest.json").read_text())
        if manifest.get("stage") != stage:
            problems.append(f"manifest names stage {manifest.get('stage')!r}")
    return problems


def run_chain(folder: Path, family: str) -> Path:
    """The five stages from the CLI, each reading the previous stage's folder; returns the run folder."""
    make_workspace(folder)
    recipe = write_recipe(folder, family=family)
    for stage in STAGE_ORDER:
        run_train(folder, stage, recipe)
    return folder / "run"


@pytest.fixture(scope="session")
def gpt2_chain(tmp_path_factory) -> Path:
    """A finished five-stage GPT-2 run (recipe `recipe.yaml` beside it), shared by the test modules."""
    return run_chain(tmp_path_factory.mktemp("chain-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def llama_chain(tmp_path_factory) -> Path:
    """The same with a tiny Llama."""
    return run_chain(tmp_path_factory.mktemp("chain-llama"), "llama")
