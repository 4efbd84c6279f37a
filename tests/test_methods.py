"""Methods as plug-ins: the registry, a method declared outside the package, and the step hook's state.

- A declaration that names a stage twice, reads a stage no one declares, or uses an unknown view is
  refused with one line naming the problem.
- `tests/toy_method.py` registers `toy_curriculum` (one stage reading the shared teacher, a schedule with
  state, its own config section and mode) through `ICOT_PLUGINS`; `icot stages`, `icot train --help`,
  `icot pipeline` (order, skipping, results table) and `icot eval` take it without any change to `icot/`.
- A run of that stage stopped by SIGTERM in the middle of its schedule resumes bitwise on one rank, and
  on two ranks applies the same schedule at every step (the per-step `removed_tokens` equal the
  one-rank run's exactly).
- ICoT-KD's stage names appear in `icot/`, `slurm/` and `tools/` in its declaration only.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.train_fixtures")
pytest_plugins = ["tests.train_fixtures"]

from icot import registry  # noqa: E402
from icot.errors import UserError  # noqa: E402
from icot.registry import Method, StageSpec  # noqa: E402
from tests.train_fixtures import (ROOT, icot_env, launch_and_signal, make_workspace, read_scalars,  # noqa: E402
                                  run_train, stage_folder_problems, write_recipe)

PLUGIN = {"ICOT_PLUGINS": "tests.toy_method"}
STEPS, SAVE_EVERY = 24, 4
TAGS = ("train/loss", "train/lr", "train/grad_norm", "train/removed_tokens", "valid/loss", "valid/token_accuracy",
        "valid/accuracy")


def icot(*args, cwd, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "icot", *args], cwd=cwd, env=icot_env(**PLUGIN),
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("stages, problem", [
    ((StageSpec("teacher", "x:Y", "a second teacher"),), r"stage 'teacher' is declared twice"),
    ((StageSpec("mine", "x:Y", "t", reads={"start": "nowhere"}),), r"reads 'nowhere' \(start\), which no earlier"),
    ((StageSpec("mine", "x:Y", "t", views=("latent",)),), r"unknown views \['latent'\]"),
    ((StageSpec("eval", "x:Y", "t"),), r"stage name 'eval' is a reserved word"),
])
def test_bad_declarations_are_refused(stages, problem):
    before = registry.stage_names()
    with pytest.raises(UserError, match=problem):
        registry.register(Method(name="broken", title="broken", stages=stages))
    assert registry.stage_names() == before and "broken" not in registry.method_names()


def test_a_variant_reads_the_section_of_a_method_it_uses_and_only_a_declared_one():
    from icot.config import load_stage_config

    config = load_stage_config("coconut_simcot", None, ["--coconut.max_latent_stage=5", "--coconut_simcot.weight=2"])
    assert (config.coconut.max_latent_stage, config.coconut_simcot.weight) == (5, 2.0)
    assert not hasattr(load_stage_config("coconut", None, []), "coconut_simcot")
    with pytest.raises(UserError, match=r"uses the section of 'nowhere', which no registered method declares"):
        registry.register(Method(name="broken", title="broken", uses=("nowhere",),
                                 stages=(StageSpec("mine", "x:Y", "t"),)))
    assert "broken" not in registry.method_names()


def test_icot_kd_stage_names_appear_in_its_declaration_only():
    declaration = ROOT / "icot/methods/icot_kd/__init__.py"
    names = [spec.name for spec in registry.get_method("icot_kd").stages]
    assert names == ["mind_reading", "emulation", "coupling"]
    # In Python: no quoted name, and no `mind_reading` at all (it is no English word); in scripts: no name at all.
    in_python = re.compile(r"""["'](%s)["']|\bmind_reading\b""" % "|".join(names))
    in_scripts = re.compile(r"\b(%s)\b" % "|".join(names))
    found = []
    for path in sorted(ROOT.glob("icot/**/*.py")) + sorted((ROOT / "slurm").iterdir()) + sorted((ROOT / "tools").iterdir()):
        if path == declaration or not path.is_file() or path.suffix == ".md":   # docs may name stages
            continue
        text = path.read_text()
        pattern = in_python if path.suffix == ".py" else in_scripts
        found += [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
                  for m in pattern.finditer(text)]
    assert found == []


@pytest.fixture(scope="module")
def toy_workspace(tmp_path_factory) -> Path:
    folder = make_workspace(tmp_path_factory.mktemp("toy"), train=256, valid=8, test=9)
    write_recipe(folder, methods=["toy_curriculum"], toy_curriculum={"every": 3, "remove": 2, "decay_from": 12})
    return folder


def test_a_plugin_method_runs_through_stages_help_pipeline_and_eval(toy_workspace):
    folder = toy_workspace
    listed = icot("stages", "--config", "recipe.yaml", "--format", "tsv", cwd=folder).stdout.splitlines()
    assert listed == ["no_cot\tshared\t-\tno_cot", "teacher\tshared\t-\texplicit",
                      "toy_stage\ttoy_curriculum\tteacher\ttoy"]
    help_text = icot("train", "toy_stage", "--help", cwd=folder).stdout
    assert "  toy_curriculum.every: an integer, default 2" in help_text
    assert "  inputs.start.export: last, best, 'epoch N' or 'step N', default last" in help_text

    first = icot("pipeline", "--config", "recipe.yaml", "--eval_batch_size", "4", cwd=folder).stdout
    assert "stage 3/3 toy_stage: 4 steps" in first
    results = json.loads((folder / "run/results.json").read_text())
    assert list(results["modes"]) == ["no_cot", "explicit", "toy"]
    assert list(results["stages"]) == ["no_cot", "teacher", "toy_stage"]
    assert "| Toy curriculum |" in (folder / "run/results.md").read_text()
    root = folder / "run/toy_stage"
    assert stage_folder_problems(root, "toy_stage") == []
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["method"] == "toy_curriculum"
    assert manifest["input_exports"]["teacher"]["role"] == "start"
    removed = dict(read_scalars(root / "tb")["train/removed_tokens"])
    assert removed[1] == 0 and removed[4] >= 2   # the schedule ran: `every` 3, 2 (+0 or 1) at step 3

    again = icot("pipeline", "--config", "recipe.yaml", "--eval_batch_size", "4", cwd=folder).stdout
    assert again.count("already complete, skipped") == 3
    icot("eval", "--mode", "toy", "--run_dir", "run", "--data", "data/test.txt", "--out", "toy.json", cwd=folder)
    evaluated = json.loads((folder / "toy.json").read_text())
    assert evaluated["examples"] == 9 and evaluated["mode"] == "toy"
    assert evaluated["accuracy"] == results["modes"]["toy"]["accuracy"]
    # Without the plug-in the mode is unknown, in one line.
    plain = subprocess.run([sys.executable, "-m", "icot", "eval", "--mode", "toy", "--run_dir", "run", "--data",
                            "data/test.txt"], cwd=folder, env=icot_env(), capture_output=True, text=True)
    assert plain.returncode == 2 and "invalid choice: 'toy'" in plain.stderr


def schedule_overrides(workspace: Path, run_dir: str, dropout: float = 0.1) -> list[str]:
    return [f"--run_dir={run_dir}", f"--inputs.start.dir={workspace / 'run/teacher'}", f"--train.max_steps={STEPS}",
            f"--train.save_every={SAVE_EVERY}", "--train.eval_every=8", f"--model.dropout={dropout}"]


def straight_run(folder: Path, run_dir: str, dropout: float = 0.1) -> dict:
    """The toy stage run straight through on one rank (after the pipeline test made its teacher)."""
    if not (folder / "run/teacher/DONE").exists():
        run_train(folder, "teacher", folder / "recipe.yaml", env=PLUGIN)
    run_train(folder, "toy_stage", folder / "recipe.yaml", *schedule_overrides(folder, run_dir, dropout), env=PLUGIN)
    return read_scalars(folder / run_dir / "toy_stage/tb")


@pytest.fixture(scope="module")
def uninterrupted(toy_workspace) -> dict:
    return straight_run(toy_workspace, "straight")


def test_sigterm_mid_schedule_resumes_bitwise(toy_workspace, uninterrupted):
    folder = toy_workspace
    overrides = schedule_overrides(folder, "stopped")
    code, stdout = launch_and_signal(folder, "toy_stage", folder / "recipe.yaml", *overrides, sig=signal.SIGTERM,
                                     at_step=7, env=PLUGIN, log_name="stopped")
    assert code == 0, (folder / "stopped.stderr").read_text()[-3000:]
    stopped = int(re.search(r"step (\d+)", (folder / "stopped/toy_stage/PREEMPTED").read_text()).group(1))
    assert 7 <= stopped < STEPS
    removed = dict(uninterrupted["train/removed_tokens"])
    assert 0 < removed[stopped] < removed[STEPS]   # stopped in the middle of the schedule
    # The step hook's lr factor reached the optimizer: the rate logged at step s is the one step s used,
    # 1e-3 up to step 13 (0-based 12), then falling linearly to 0 at step 24 (0-based 24).
    lr = dict(uninterrupted["train/lr"])
    assert [lr[s] for s in (1, 13, 14, 20)] == pytest.approx([1e-3, 1e-3, 1e-3 * 11 / 12, 1e-3 * 5 / 12])
    result = run_train(folder, "toy_stage", folder / "recipe.yaml", *overrides, env=PLUGIN)
    assert f"at step {stopped}" in result.stdout
    got = read_scalars(folder / "stopped/toy_stage/tb")
    for tag in TAGS:
        assert got[tag] == uninterrupted[tag], tag   # bitwise, schedule state included


def test_two_ranks_apply_the_same_schedule_through_a_resume(toy_workspace):
    """Without dropout (each rank draws its own dropout masks), two ranks train what one rank does."""
    folder = toy_workspace
    uninterrupted = straight_run(folder, "straight_without_dropout", dropout=0.0)
    overrides = schedule_overrides(folder, "two_ranks", dropout=0.0)
    code, _ = launch_and_signal(folder, "toy_stage", folder / "recipe.yaml", *overrides, sig=signal.SIGUSR1,
                                at_step=7, nproc=2, env=PLUGIN, log_name="two_ranks")
    assert code == 0, (folder / "two_ranks.stderr").read_text()[-3000:]
    assert (folder / "two_ranks/toy_stage/PREEMPTED").exists()
    run_train(folder, "toy_stage", folder / "recipe.yaml", *overrides, nproc=2, env=PLUGIN)
    got = read_scalars(folder / "two_ranks/toy_stage/tb")
    assert got["train/removed_tokens"] == uninterrupted["train/removed_tokens"]   # exactly, every step
    for (step, value), (want_step, want) in zip(got["train/loss"], uninterrupted["train/loss"], strict=True):
        assert step == want_step and value == pytest.approx(want, rel=1e-5)
