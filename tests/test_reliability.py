"""What a hostile user or a flaky cluster does to a run, case by case (the teacher stage, tiny GPT-2, CPU):

1. a truncated, empty or missing file in the newest checkpoint: resume skips it, says why, and takes the
   one before; a save cut short before its marker counts as no checkpoint;
2. retention orders by step and never deletes the checkpoint just written; a fresh start moves the
   earlier run's checkpoints aside instead of mixing them in;
3. a run checkpointed on 1 rank resumes on 2, and back, at the same data position;
4. a changed config on resume: a shape or batch change is refused before anything is written, a
   learning-rate and schedule change applies, and both are logged and recorded;
5. two runs on one folder: the second stops with one line; a killed run leaves no stale lock;
6. a word the tokenizer does not know, a NUL byte, a byte-order mark mid-file: an error naming file:line
   (skipped and counted with data.skip_bad_lines);
7. examples too long for the model: dropped with a count or stopped with file:line, before training;
   `icot eval` names the line;
8. Ctrl-C checkpoints and exits cleanly, and `icot pipeline` waits for the stage to do so;
9. an empty or corrupt tokenizer folder, a run folder that cannot be written, `icot eval --out FOLDER`,
   an emulator trained with another tokenizer of the same size: one line each, nothing lost;
10. files icot reads load with `weights_only=True`: a planted RNG file or teacher-state cache runs no code;
11. a resumed run is bitwise the uninterrupted one, also without gradient accumulation.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.train_fixtures")
pytest_plugins = ["tests.train_fixtures"]

from tests.train_fixtures import (icot_env, launch_and_signal, make_workspace, one_line_error,  # noqa: E402
                                  read_scalars, run_train, stage_folder_problems, train_command, write_recipe)

CKPT = "run/teacher/ckpt"


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    folder = make_workspace(tmp_path_factory.mktemp("reliability"), train=256, valid=8, test=8)
    write_recipe(folder, train={"max_steps": 8, "save_every": 4, "keep_last": 3})
    return folder


@pytest.fixture(scope="module")
def base(ws) -> Path:
    """A finished teacher run with checkpoints at steps 4 and 8 (and its straight-through losses)."""
    run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=base")
    return ws / "base" / "teacher"


def preempted_copy(base: Path, ws: Path, name: str) -> Path:
    """The base run's stage folder as a run stopped after its step-8 checkpoint would leave it."""
    root = ws / name / "teacher"
    shutil.copytree(base, root)
    for leftover in ("DONE", "export", "exports.json", "manifest.json", "LOCK"):
        path = root / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return root


# 1. ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate rng_rank0.pt", "empty rng_rank0.pt", "truncate model states",
                                    "empty model states", "delete model states", "delete the marker"])
def test_a_damaged_newest_checkpoint_is_skipped_with_the_reason(ws, base, damage):
    name = "damaged-" + damage.replace(" ", "-").replace(".", "")
    root = preempted_copy(base, ws, name)
    newest = root / "ckpt" / "step00000008"
    target = newest / ("rng_rank0.pt" if "rng" in damage else "mp_rank_00_model_states.pt")
    if damage.startswith("truncate"):
        target.write_bytes(target.read_bytes()[:100])
    elif damage.startswith("empty"):
        target.write_bytes(b"")
    elif damage == "delete model states":
        target.unlink()
    else:
        (newest / "icot_checkpoint.json").unlink()
    result = run_train(ws, "teacher", ws / "recipe.yaml", f"--run_dir={name}")
    assert f"skipped checkpoint {Path(name) / 'teacher/ckpt/step00000008'}:" in result.stdout, result.stdout
    assert "resumed from" in result.stdout and "step00000004 at step 4" in result.stdout
    assert stage_folder_problems(root, "teacher") == []
    assert dict(read_scalars(root / "tb")["train/loss"]) == dict(read_scalars(base / "tb")["train/loss"])


# 2. ----------------------------------------------------------------------------------------------

def test_retention_orders_by_step_and_a_fresh_start_moves_the_old_run_aside(ws, base):
    from icot.checkpoints import retain, tag_of

    folder = ws / "retention"
    for step in (4, 40, 8):
        (folder / tag_of(step)).mkdir(parents=True)
        (folder / tag_of(step) / "rng_rank0.pt").write_bytes(b"x")
        (folder / tag_of(step) / "mp_rank_00_model_states.pt").write_bytes(b"x")
    # Keep 2 by step: 40 and 8, never 4 when it was just written.
    assert sorted(p.name for p in retain(folder, 2, folder / tag_of(4))) == []
    assert sorted(p.name for p in retain(folder, 2, folder / tag_of(8))) == [tag_of(4)]

    root = preempted_copy(base, ws, "fresh")
    (root / "exports").mkdir()
    result = run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=fresh", "--train.resume=never",
                       "--train.max_steps=6", "--train.save_every=2", "--train.keep_last=2")
    assert "starting teacher from step 0: the earlier run's checkpoints and exports are in" in result.stdout
    [aside] = list(root.glob("previous-*"))
    assert sorted(p.name for p in (aside / "ckpt").glob("step*")) == ["step00000004", "step00000008"]
    assert (aside / "exports").is_dir()
    assert sorted(p.name for p in (root / "ckpt").glob("step*")) == ["step00000004", "step00000006"]
    assert stage_folder_problems(root, "teacher") == []


# 3. ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first, then", [(1, 2), (2, 1)])
def test_a_run_resumes_on_another_number_of_ranks(ws, first, then):
    name = f"ranks-{first}-{then}"
    run_train(ws, "teacher", ws / "recipe.yaml", f"--run_dir={name}", nproc=first)
    root = ws / name / "teacher"
    for leftover in ("DONE", "export", "exports.json", "manifest.json"):
        path = root / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = run_train(ws, "teacher", ws / "recipe.yaml", f"--run_dir={name}", "--train.max_steps=12", nproc=then)
    assert f"written by {first} rank(s), on {then}" in result.stdout
    assert "train.max_steps 8 -> 12" in result.stdout   # a change that may apply on resume
    straight = ws / f"straight-{then}"
    if not (straight / "teacher/DONE").exists():
        run_train(ws, "teacher", ws / "recipe.yaml", f"--run_dir={straight.name}", "--train.max_steps=12", nproc=then)
    got, want = (dict(read_scalars(r / "tb")["train/loss"]) for r in (root, straight / "teacher"))
    assert sorted(got) == list(range(1, 13))
    for step in range(9, 13):   # the same data position: the same batches, up to summation order
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


# 4. ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, keys", [
    (["--model.hidden=48"], ["model.hidden (32 -> 48)"]),
    (["--train.batch_size=32", "--train.micro_batch_size=16"], ["train.batch_size (16 -> 32)"]),
    (["--train.seed=7", "--icot_kd.delta=3"], ["train.seed (42 -> 7)"]),
])
def test_a_change_that_alters_training_is_refused_before_anything_is_written(ws, base, overrides, keys):
    name = "refused-" + hashlib.md5(" ".join(overrides).encode()).hexdigest()[:6]
    root = preempted_copy(base, ws, name)
    before = digest(root)
    result = run_train(ws, "teacher", ws / "recipe.yaml", f"--run_dir={name}", *overrides, check=False)
    one_line_error(result, "cannot resume", "step00000008 with a changed", *keys, "--train.resume=never")
    assert digest(root) == before


def test_a_learning_rate_and_schedule_change_applies_and_is_recorded(ws, base):
    root = preempted_copy(base, ws, "changed-lr")
    (root / "ckpt/step00000008").rename(root / "ckpt/step00000008.gone")   # resume from step 4
    result = run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=changed-lr", "--train.lr=1e-4",
                       "--train.schedule=linear")
    assert ("resuming with changed settings: train.lr 0.001 -> 0.0001, train.schedule 'constant' -> 'linear'"
            in result.stdout), result.stdout
    lr = dict(read_scalars(root / "tb")["train/lr"])
    assert [lr[s] for s in (1, 4)] == pytest.approx([1e-3, 1e-3])
    assert [lr[s] for s in (5, 6, 7, 8)] == pytest.approx([1e-4 * (1 - s / 8) for s in (4, 5, 6, 7)])
    assert "lr: 0.0001" in (root / "config.yaml").read_text()
    assert list(root.glob("config.*.yaml"))   # the earlier config kept beside it
    changes = json.loads((root / "manifest.json").read_text())["resumed_with_changes"]
    assert changes == [{"step": 4, "changes": {"train.lr": [1e-3, 1e-4], "train.schedule": ["constant", "linear"]}}]


# 5. ----------------------------------------------------------------------------------------------

def test_one_run_per_folder_and_no_stale_lock(ws):
    first = subprocess.Popen(train_command("teacher", ws / "recipe.yaml", "--run_dir=locked", "--train.max_steps=100000",
                                           "--train.save_every=1"), cwd=ws, env=icot_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:
            if re.search(r"\] step 3/", line):
                break
        second = run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=locked", "--train.lr=1e-4", check=False)
        one_line_error(second, "locked/teacher is in use by pid", f"pid {first.pid} on", "one run per stage folder")
        assert first.poll() is None   # the first run goes on
    finally:
        first.kill()   # kill -9: the lock goes with the process
        first.wait()
    result = run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=locked")
    assert "resumed from" in result.stdout and stage_folder_problems(ws / "locked/teacher", "teacher") == []


# 6. ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage, problem", [
    ("garbage", "'xyzzy' is not in the vocabulary of tokenizer"),
    ("nul", "a NUL byte at column"),
    ("bom", "a byte-order mark (U+FEFF) inside the file"),
])
def test_unknown_text_is_an_error_naming_file_and_line(ws, damage, problem):
    lines = (ws / "data/train.txt").read_text().splitlines()
    question, rest = lines[6].split("||")
    lines[6] = {"garbage": f"{question}||xyzzy {rest}", "nul": f"{question}||\x00{rest}",
                "bom": f"\ufeff{lines[6]}"}[damage]
    bad = ws / f"data/train_{damage}.txt"
    bad.write_text("\n".join(lines) + "\n")
    result = run_train(ws, "teacher", ws / "recipe.yaml", f"--run_dir=text-{damage}", f"--data.train={bad}",
                       check=False)
    one_line_error(result, f"{bad}:7:", problem)
    assert not (ws / f"text-{damage}").exists()
    if damage != "garbage":   # `icot data check` reads with the same reader
        checked = subprocess.run([sys.executable, "-m", "icot", "data", "check", str(bad)], cwd=ws, env=icot_env(),
                                 capture_output=True, text=True)
        assert checked.returncode != 0 and f"{bad}:7:" in checked.stdout + checked.stderr
    skipped = run_train(ws, "teacher", ws / "recipe.yaml", f"--run_dir=text-{damage}", f"--data.train={bad}",
                        "--data.skip_bad_lines=true")
    counted = "with words the tokenizer does not know" if damage == "garbage" else "skipped 1 malformed line"
    assert counted in skipped.stdout + skipped.stderr


# 7. ----------------------------------------------------------------------------------------------

def test_examples_too_long_for_the_model_are_caught_before_training(ws, base):
    from icot.data.multiply import generate_splits

    # 2x2 lines (21 tokens with their CoT) and, from line 65 on, the workspace's 3x3 ones (43 tokens).
    short = generate_splits(ws / "data-2x2", 2, 2, {"train": 64}, seed=1)["train"].read_text()
    mixed = ws / "data/mixed.txt"
    mixed.write_text(short + (ws / "data/train.txt").read_text())
    args = ["--model.max_positions=30", f"--data.train={mixed}"]
    dropped = run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=short-drop", *args)
    assert f"{mixed}: dropped 256 of 320 examples longer than the model's 30 positions" in dropped.stderr
    assert stage_folder_problems(ws / "short-drop/teacher", "teacher") == []
    stopped = run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=short-stop", *args, "--data.overlength=error",
                        check=False)
    one_line_error(stopped, f"{mixed}:65:", "more than the model's 30 positions")
    assert not (ws / "short-stop").exists()
    long_line = ws / "data/long.txt"
    long_line.write_text((ws / "data/test.txt").read_text().splitlines()[0].replace("||", "||" + "1 " * 120) + "\n")
    result = subprocess.run([sys.executable, "-m", "icot", "eval", "--mode", "explicit", "--model", str(base),
                             "--data", str(long_line)], cwd=ws, env=icot_env(), capture_output=True, text=True)
    one_line_error(result, f"{long_line}:1:", "more than the model's 128 positions")


# 8. ----------------------------------------------------------------------------------------------

def test_ctrl_c_checkpoints_and_exits_cleanly(ws):
    overrides = ["--run_dir=interrupt", "--train.max_steps=40"]
    code, stdout = launch_and_signal(ws, "teacher", ws / "recipe.yaml", *overrides, sig=signal.SIGINT, at_step=6,
                                     log_name="interrupt")
    assert code == 0, (ws / "interrupt.stderr").read_text()[-2000:]
    assert "Ctrl-C: checkpointing at the next step" in (ws / "interrupt.stderr").read_text()
    stopped = int((ws / "interrupt/teacher/PREEMPTED").read_text().split()[1])
    assert (ws / f"interrupt/teacher/ckpt/step{stopped:08d}/icot_checkpoint.json").is_file()
    result = run_train(ws, "teacher", ws / "recipe.yaml", *overrides)
    assert f"at step {stopped}" in result.stdout


def test_ctrl_c_in_the_pipeline_lets_the_stage_checkpoint(ws):
    command = [sys.executable, "-m", "icot", "pipeline", "--config", "recipe.yaml", "--run_dir=pipe-interrupt",
               "--only=teacher", "--train.max_steps=100000"]
    # As in a terminal's foreground job: a shell that starts a job in the background (CI, nohup) hands it
    # SIGINT ignored, and Python then keeps ignoring it, as it should.
    process = subprocess.Popen(command, cwd=ws, env=icot_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    root = ws / "pipe-interrupt/teacher"
    watchdog = threading.Timer(600, process.kill)   # a hang fails the test instead of blocking
    watchdog.start()
    try:
        for line in process.stdout:   # the stage is training once it logs a step (setup can take a while)
            if "[icot teacher] step 2/" in line:
                break
        assert process.poll() is None, process.stderr.read()[-2000:]
        os.killpg(process.pid, signal.SIGINT)   # Ctrl-C reaches the terminal's whole process group
        _, stderr = process.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert "SIGINT: the running stages checkpoint and exit; waiting for them" in stderr
    assert "icot: stopped: SIGINT received: the running stages checkpointed" in stderr
    assert (root / "PREEMPTED").exists() and list(root.glob("ckpt/step*/icot_checkpoint.json"))


# 9. ----------------------------------------------------------------------------------------------

def test_a_tokenizer_folder_that_is_empty_or_corrupt(ws):
    (ws / "tok-empty").mkdir(exist_ok=True)
    corrupt = ws / "tok-corrupt"
    shutil.copytree(ws / "tok", corrupt, dirs_exist_ok=True)
    (corrupt / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    for folder in (ws / "tok-empty", corrupt):
        result = run_train(ws, "teacher", ws / "recipe.yaml", f"--run_dir=tok-{folder.name}",
                           f"--model.tokenizer={folder}", check=False)
        one_line_error(result, "model.tokenizer: cannot load a tokenizer from", str(folder))


def test_eval_out_naming_a_folder_is_refused_before_evaluating(ws, base):
    (ws / "out-folder").mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "icot", "eval", "--mode", "explicit", "--model", str(base),
                             "--data", "data/test.txt", "--out", "out-folder"], cwd=ws, env=icot_env(),
                            capture_output=True, text=True)
    one_line_error(result, "--out: out-folder is a folder")
    assert "accuracy" not in result.stdout   # nothing was evaluated first


def test_reading_an_export_trained_with_another_tokenizer_of_the_same_size(ws, base):
    other = ws / "teacher-other-tokenizer"
    shutil.copytree(base, other, dirs_exist_ok=True)
    definition = json.loads((other / "export/tokenizer.json").read_text())
    vocab = definition["model"]["vocab"]
    first, second = [word for word in vocab if word.isdigit()][:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]   # same size, two ids swapped
    (other / "export/tokenizer.json").write_text(json.dumps(definition))
    result = run_train(ws, "mind_reading", ws / "recipe.yaml", "--run_dir=other-tok", f"--inputs.teacher.dir={other}",
                       check=False)
    one_line_error(result, "inputs.teacher:", "was trained with another tokenizer", "their token ids differ")
    assert not (ws / "other-tok").exists()


def read_only(folder: Path):
    """Mount `folder` read-only over itself (a bind mount: root only); returns how to undo it."""
    folder.mkdir(parents=True, exist_ok=True)
    for command in (["mount", "--bind", str(folder), str(folder)], ["mount", "-o", "remount,ro,bind", str(folder)]):
        if subprocess.run(command, capture_output=True).returncode != 0:
            subprocess.run(["umount", str(folder)], capture_output=True)
            pytest.skip("a read-only folder needs a bind mount, which this machine refuses (root only)")
    return lambda: subprocess.run(["umount", str(folder)], check=True)


def test_folders_that_cannot_be_written(ws):
    """A read-only run_dir stops at once; a read-only TensorBoard folder stops before training; a
    read-only export folder stops after training with the checkpoint kept, and the rerun exports."""
    undo = read_only(ws / "ro-run")
    try:
        one_line_error(run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=ro-run", check=False),
                       "run_dir: cannot write ro-run/teacher", "Read-only file system")
    finally:
        undo()
    undo = read_only(ws / "ro-tb/teacher/tb")
    try:
        one_line_error(run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=ro-tb", check=False),
                       "the TensorBoard folder: cannot write ro-tb/teacher/tb")
    finally:
        undo()
    undo = read_only(ws / "ro-export/teacher/export")
    try:
        failed = run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=ro-export", check=False)
        one_line_error(failed, "cannot write the export ro-export/teacher/export", "the checkpoint of step 8 is kept")
    finally:
        undo()
    done = run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=ro-export")
    assert "at step 8" in done.stdout and stage_folder_problems(ws / "ro-export/teacher", "teacher") == []


# 10. ---------------------------------------------------------------------------------------------

class _Planted:
    """Unpickling it would create a file: what a planted checkpoint file could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_planted_files_run_no_code(ws, base, gpt2_chain, tmp_path):
    import torch

    root = preempted_copy(base, ws, "planted")
    sentinel = ws / "planted-ran"
    rng = root / "ckpt/step00000008/rng_rank0.pt"
    assert set(torch.load(rng, weights_only=True)) >= {"python", "numpy", "torch"}   # tensors and numbers only
    with open(rng, "wb") as handle:
        pickle.dump({"torch": _Planted(str(sentinel))}, handle)
    marker = root / "ckpt/step00000008/icot_checkpoint.json"
    record = json.loads(marker.read_text())
    record["files"]["rng_rank0.pt"] = rng.stat().st_size   # the planter fixed the marker too
    marker.write_text(json.dumps(record))
    result = run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=planted")
    assert "not a tensor-only RNG state" in result.stdout and not sentinel.exists()

    teacher = tmp_path / "teacher"
    shutil.copytree(gpt2_chain / "teacher", teacher, ignore=shutil.ignore_patterns("ckpt", "tb"))
    folder = gpt2_chain.parent
    run_train(folder, "mind_reading", folder / "recipe.yaml", f"--run_dir={tmp_path / 'cached'}",
              f"--inputs.teacher.dir={teacher}", "--icot_kd.teacher_state_cache=true")
    [cache] = list((teacher / "state_cache").glob("*.pt"))
    with open(cache, "wb") as handle:
        pickle.dump(_Planted(str(sentinel)), handle)
    result = run_train(folder, "mind_reading", folder / "recipe.yaml", f"--run_dir={tmp_path / 'cached-again'}",
                       f"--inputs.teacher.dir={teacher}", "--icot_kd.teacher_state_cache=true", check=False)
    one_line_error(result, f"{cache}: not a teacher-state cache icot wrote")
    assert not sentinel.exists()


# 11. ---------------------------------------------------------------------------------------------

def test_resume_is_bitwise_without_gradient_accumulation(ws):
    """One micro batch per step, dropout, 60 steps: DeepSpeed's fused CPU Adam drifted by an ULP on about
    a third of the steps after a resume; torch's AdamW (what icot asks for on a CPU) does not."""
    overrides = ["--train.micro_batch_size=null", "--train.max_steps=60", "--model.dropout=0.1", "--train.save_every=0"]
    run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=bitwise-straight", *overrides)
    code, _ = launch_and_signal(ws, "teacher", ws / "recipe.yaml", "--run_dir=bitwise-stopped", *overrides,
                                sig=signal.SIGTERM, at_step=20, log_name="bitwise")
    assert code == 0
    run_train(ws, "teacher", ws / "recipe.yaml", "--run_dir=bitwise-stopped", *overrides)
    ds_config = json.loads((ws / "bitwise-stopped/teacher/ds_config.json").read_text())
    assert ds_config["optimizer"]["params"]["torch_adam"] is True
    for tag in ("train/loss", "train/grad_norm"):
        assert read_scalars(ws / "bitwise-stopped/teacher/tb")[tag] == read_scalars(ws / "bitwise-straight/teacher/tb")[tag]
