"""Stop and resume, one rank on CPU: bitwise the same losses as an uninterrupted run.

The teacher stage with dropout 0.1 (so the restored RNG matters), a linear schedule with warmup (so the
restored LR scheduler matters), validation every 10 steps and a checkpoint every 4 (keeping 2).

- SIGTERM mid-run: the loop checkpoints at the next step and exits 0 leaving PREEMPTED; launching the
  same command again resumes from that checkpoint, finishes, removes PREEMPTED and writes DONE. Every
  logged train/loss, train/lr, train/grad_norm and valid/* value equals the uninterrupted run's, bitwise.
- SIGKILL mid-run (no chance to checkpoint): the relaunch resumes from the last periodic checkpoint and
  the TensorBoard curves continue without the steps the killed run logged past it (purge_step), again
  bitwise equal to the uninterrupted run.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.train_fixtures")

from tests.train_fixtures import launch_and_signal as signal_run  # noqa: E402
from tests.train_fixtures import make_workspace, read_scalars, run_train, stage_folder_problems, write_recipe  # noqa: E402

STEPS, SAVE_EVERY, EVAL_EVERY = 40, 4, 10
TAGS = ("train/loss", "train/lr", "train/grad_norm", "valid/loss", "valid/token_accuracy", "valid/accuracy")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = make_workspace(tmp_path_factory.mktemp("resume"), train=256, valid=8, test=8)
    write_recipe(folder, model={"dropout": 0.1},
                 train={"max_steps": STEPS, "save_every": SAVE_EVERY, "keep_last": 2, "eval_every": EVAL_EVERY,
                        "schedule": "linear", "warmup_steps": 2, "lr": 3e-3})
    return folder


@pytest.fixture(scope="module")
def reference(workspace) -> dict:
    """The uninterrupted run's scalars."""
    run_train(workspace, "teacher", workspace / "recipe.yaml", "--run_dir=uninterrupted")
    return read_scalars(workspace / "uninterrupted" / "teacher" / "tb")


def test_the_batch_order_is_computed_once_per_epoch(monkeypatch):
    from types import SimpleNamespace

    import icot.loop as loop
    from icot.config import StageConfig, TrainConfig

    real, calls = loop.batch_order, []
    monkeypatch.setattr(loop, "batch_order", lambda *args: calls.append(args) or real(*args))
    config = StageConfig(stage="teacher", train=TrainConfig(batch_size=4, max_steps=7, seed=3))
    strategy = SimpleNamespace(micro_batch_size=4, gradient_accumulation=1)
    trainer = loop.Trainer(None, config, strategy, None, train_set=range(13))   # 3 steps an epoch
    rows = [trainer.epoch_order(step)[step % trainer.steps_per_epoch].tolist() for step in range(7)]
    assert [args[3] for args in calls] == [0, 1, 2]   # one permutation per epoch, not one per step
    want = [real(13, 4, 3, step // 3)[step % 3].tolist() for step in range(7)]
    assert rows == want


def launch_and_signal(folder: Path, run_dir: str, sig: int, at_step: int) -> tuple[int, str]:
    """Start the teacher stage, send `sig` once it logs step `at_step`; (exit code, its stdout)."""
    return signal_run(folder, "teacher", folder / "recipe.yaml", f"--run_dir={run_dir}", sig=sig, at_step=at_step,
                      log_name=run_dir)


def assert_same_curves(reference: dict, got: dict) -> None:
    for tag in TAGS:
        want, have = reference[tag], got[tag]
        assert [step for step, _ in have] == [step for step, _ in want], tag  # each step once, in order
        assert have == want, tag  # bitwise


def test_reference_lr_schedule(reference):
    """The schedule spans exactly train.max_steps optimizer steps: warmup 2, then linear to 0."""
    lr = dict(reference["train/lr"])
    expected = {step: 3e-3 * (step / 3 if step <= 2 else 1 - (step - 3) / (STEPS - 2)) for step in range(1, STEPS + 1)}
    assert sorted(lr) == list(range(1, STEPS + 1))
    for step in lr:
        assert lr[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-12), step
    assert [step for step, _ in reference["valid/loss"]] == [10, 20, 30, 40]


def test_sigterm_then_relaunch_continues_bitwise(workspace, reference):
    root = workspace / "sigterm" / "teacher"
    code, stdout = launch_and_signal(workspace, "sigterm", signal.SIGTERM, at_step=6)
    assert code == 0, (workspace / "sigterm.stderr").read_text()[-3000:]
    stopped = int(re.search(r"step (\d+)", (root / "PREEMPTED").read_text()).group(1))
    assert 6 <= stopped < STEPS
    assert f"stop requested: checkpoint written at step {stopped}" in stdout
    assert not (root / "DONE").exists() and not (root / "export").exists()
    assert (root / "ckpt" / f"step{stopped:08d}" / "rng_rank0.pt").is_file()
    assert len(list((root / "ckpt").glob("step*"))) <= 2  # keep_last

    result = run_train(workspace, "teacher", workspace / "recipe.yaml", "--run_dir=sigterm")
    assert f"resumed from {Path('sigterm') / 'teacher' / 'ckpt' / f'step{stopped:08d}'} at step {stopped}" \
        in result.stdout
    assert stage_folder_problems(root, "teacher") == []  # DONE written, PREEMPTED gone
    assert len(list((root / "tb").glob("events.out.tfevents.*"))) == 2  # one writer per launch, one folder
    assert_same_curves(reference, read_scalars(root / "tb"))


def test_sigkill_then_relaunch_purges_and_continues_bitwise(workspace, reference):
    root = workspace / "sigkill" / "teacher"
    code, _ = launch_and_signal(workspace, "sigkill", signal.SIGKILL, at_step=SAVE_EVERY + 2)
    assert code == -signal.SIGKILL
    logged = max(step for step, _ in read_scalars(root / "tb")["train/loss"])
    complete = sorted(int(p.parent.name[len("step"):]) for p in (root / "ckpt").glob("step*/rng_rank0.pt"))
    assert complete and complete[-1] < logged  # the killed run logged steps past its last checkpoint
    assert not (root / "PREEMPTED").exists()

    result = run_train(workspace, "teacher", workspace / "recipe.yaml", "--run_dir=sigkill")
    assert f"at step {complete[-1]}" in result.stdout
    assert stage_folder_problems(root, "teacher") == []
    assert_same_curves(reference, read_scalars(root / "tb"))
