"""`icot train <stage>` from the command line, one rank, tiny random GPT-2 and Llama.

- The five stages run end to end, each reading the previous stage's folder, and each writes
  `<run>/<stage>/` with the resolved configs, ckpt/, tb/ (the scalar tags read back with TensorBoard's
  own event reader), a loadable export, a manifest naming its inputs and DONE.
- A completed stage is skipped on a second launch, untouched.
- Bad input stops with ONE line `icot: error: ...` on stderr, exit code 2 and no traceback, before
  anything is written: a config typo, a missing earlier stage, a teacher / student shape mismatch, an
  empty data file; a diverging run (NaN loss) names the step.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.train_fixtures")
pytest_plugins = ["tests.train_fixtures"]  # the session fixtures (five-stage runs), shared with other modules

from icot.config import load_resolved  # noqa: E402
from tests.train_fixtures import (STAGE_ORDER, TRAIN_TAGS, VALID_TAGS, make_workspace, read_scalars, run_train,
                                  stage_folder_problems, write_recipe)

STEPS = 4  # train.max_steps of the fixtures' recipe
DECODER_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
INPUTS = {"teacher": set(), "no_cot": set(), "mind_reading": {"teacher"}, "emulation": {"teacher"},
          "coupling": {"mind_reading", "emulation"}}


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 2, exactly one `icot: error:` line (each needle in it), no traceback anywhere."""
    output = result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("icot: error:")]
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------------------------------
# The five stages.


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_five_stages_from_the_cli(family, request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icot.models.io import load_component

    run = request.getfixturevalue(f"{family}_chain")
    for stage in STAGE_ORDER:
        root = run / stage
        assert stage_folder_problems(root, stage) == [], stage

        config = load_resolved(str(root / "config.yaml"))
        assert (config.stage, config.model.family, config.train.max_steps) == (stage, family, STEPS)
        ds_config = json.loads((root / "ds_config.json").read_text())
        assert (ds_config["train_batch_size"], ds_config["train_micro_batch_size_per_gpu"],
                ds_config["gradient_accumulation_steps"]) == (16, 8, 2)

        manifest = json.loads((root / "manifest.json").read_text())
        assert set(manifest["inputs"]) == INPUTS[stage], stage
        for name, folder in manifest["inputs"].items():
            assert Path(folder) == (run / name).resolve()
        assert (manifest["steps"], manifest["world_size"], manifest["examples"]) == (STEPS, 1, STEPS * 16)

        # The export: a Hugging Face decoder, or icot components beside their decoder.
        export = root / "export"
        if stage in ("teacher", "no_cot"):
            decoder = AutoModelForCausalLM.from_pretrained(export)
            assert type(decoder).__name__ == DECODER_CLASS[family]
            AutoTokenizer.from_pretrained(export)
        parts = {"mind_reading": {"student": export}, "emulation": {"emulator": export},
                 "coupling": {"student": export / "student", "emulator": export / "emulator"}}.get(stage, {})
        for kind, folder in parts.items():
            component = load_component(folder, expect=kind)
            assert type(component.decoder).__name__ == DECODER_CLASS[family]
            assert (component.num_layers, component.hidden_size) == (2, 32)
            AutoModelForCausalLM.from_pretrained(folder)  # the decoder alone loads with transformers
            AutoTokenizer.from_pretrained(folder)

        # TensorBoard, read back with its own event reader.
        scalars = read_scalars(root / "tb")
        for tag in TRAIN_TAGS:
            assert [step for step, _ in scalars.get(tag, [])] == list(range(1, STEPS + 1)), (stage, tag)
        # Emulation predicts states, not tokens: no token accuracy, nothing to decode.
        valid_tags = ("valid/loss",) if stage == "emulation" else VALID_TAGS
        for tag in valid_tags:
            assert [step for step, _ in scalars.get(tag, [])] == [STEPS], (stage, tag)
        assert all(value == pytest.approx(1e-3) for _, value in scalars["train/lr"])
        losses = [value for _, value in scalars["train/loss"]]
        assert all(0 < value < 1e3 for value in losses), (stage, losses)


def test_completed_stage_is_skipped_untouched(gpt2_chain):
    folder = gpt2_chain.parent
    before = snapshot(gpt2_chain / "teacher")
    result = run_train(folder, "teacher", folder / "recipe.yaml")
    assert "already complete" in result.stdout
    assert snapshot(gpt2_chain / "teacher") == before


# --------------------------------------------------------------------------------------------------
# One-line errors, nothing lost.


def test_config_typo(gpt2_chain):
    folder = gpt2_chain.parent
    before = snapshot(gpt2_chain)
    result = run_train(folder, "teacher", folder / "recipe.yaml", "--train.lrr=1", check=False)
    assert_one_line_error(result, "unknown key '--train.lrr'", "did you mean '--train.lr'?")
    assert snapshot(gpt2_chain) == before


def test_missing_earlier_stage(gpt2_chain):
    folder = gpt2_chain.parent
    # An unfinished (preempted) teacher is as missing as no teacher at all.
    partial = folder / "partial-run" / "teacher"
    partial.mkdir(parents=True)
    (partial / "PREEMPTED").write_text("step 2\n")
    for run_dir in ("no-run", "partial-run"):
        before = snapshot(folder / run_dir) if (folder / run_dir).exists() else {}
        result = run_train(folder, "mind_reading", folder / "recipe.yaml", f"--run_dir={run_dir}", check=False)
        assert_one_line_error(result, "needs a completed 'teacher' stage", f"{run_dir}/teacher has no DONE")
        assert not (folder / run_dir / "mind_reading").exists()
        assert (snapshot(folder / run_dir) if (folder / run_dir).exists() else {}) == before


def test_teacher_student_shape_mismatch(gpt2_chain):
    folder = gpt2_chain.parent
    teacher_before = snapshot(gpt2_chain / "teacher")
    result = run_train(folder, "mind_reading", folder / "recipe.yaml", "--run_dir=mismatch",
                       f"--inputs.teacher.dir={gpt2_chain / 'teacher'}", "--model.layers=3", check=False)
    assert_one_line_error(result, "shape mismatch", "teacher has 2 layers x 32 hidden",
                          "student has 3 layers x 32 hidden")
    assert not (folder / "mismatch").exists()  # checked before the new stage folder is written
    assert snapshot(gpt2_chain / "teacher") == teacher_before


@pytest.mark.parametrize("split", ["train", "valid"])
def test_empty_data_file(tmp_path, split):
    make_workspace(tmp_path, train=64, valid=8, test=8)
    (tmp_path / "empty.txt").write_text("")
    recipe = write_recipe(tmp_path)
    result = run_train(tmp_path, "teacher", recipe, f"--data.{split}=empty.txt", check=False)
    assert_one_line_error(result, "empty.txt", "no examples")
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_with_the_step(tmp_path):
    make_workspace(tmp_path, train=64, valid=8, test=8)
    recipe = write_recipe(tmp_path, train={"lr": 1e30})  # step 1 is finite, its update is not
    result = run_train(tmp_path, "teacher", recipe, check=False)
    line = assert_one_line_error(result, "teacher: loss is", "at step 2")
    assert "nan" in line or "inf" in line
    root = tmp_path / "run" / "teacher"
    assert not (root / "DONE").exists() and not (root / "export").exists()
    assert [step for step, _ in read_scalars(root / "tb")["train/loss"]] == [1]


def test_main_called_in_process_returns_after_a_process_group(monkeypatch, capsys):
    # The program exits without finalization after a process group (icot.cli.end_after_process_group);
    # called from a caller's interpreter (a test, a notebook) it must return.
    import icot.engine
    from icot.cli import main

    monkeypatch.setattr(icot.engine, "process_group_started", True)
    main(["stages", "--all"])
    assert "stepwise" in capsys.readouterr().out
