"""The newer methods, `icot compare` and `icot demo` as a hostile user and a flaky cluster use them (tiny GPT-2
from scratch, 3x3 multiplication, a word tokenizer, a few steps), one numbered case each:

1. continuous thoughts count against the positions: a Coconut curriculum or CODI row that outgrows them is
   refused before anything is written, and `icot eval` counts them beside the prompt and the new tokens;
2. an export before its curriculum's end is scored with room for the CoT it still writes, and says so;
3. SIGTERM to `icot compare` (the parent only) reaches the stage, which checkpoints; the rerun resumes it;
4. every stage is timed by one clock, the loop's, summed over the processes of a resumed stage;
5. a step rule that does not fit the data is refused, with the step counts logged;
6. NaN, infinity, a zero lambda or alpha, pretrain epochs beyond the run, a max_length below every
   example: refused with the key;
7. LoRA targets the model lacks: one line naming codi.lora_targets and its linear layers;
8. `icot pipeline` checks every stage, the run folder and the evaluation before the first stage trains;
   a method listed twice runs once; a stage that stops on bad input says to fix it;
9. a mode evaluates only its own stage's exports;
10. (the CODI adapter export: tests/test_codi.py loads it with peft as its README says);
11. `icot demo --out` naming a file: one line before anything runs;
12. resume compares paths as paths, whatever folder the job starts from.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.train_fixtures")
pytest_plugins = ["tests.train_fixtures"]

from icot.errors import UserError  # noqa: E402
from tests.train_fixtures import (RUN_TIMEOUT, icot_env, launch_and_signal, make_workspace,  # noqa: E402
                                  one_line_error, run_train, write_recipe)

CURRICULUM = {"thoughts_per_step": 1, "epochs_per_stage": 1, "max_latent_stage": 2, "epoch_offset": 1,
              "init_token": "+"}
CODI = {"latents": 3, "projection_dim": 48, "lora_r": 4, "lora_alpha": 8, "include_last_step": True}


def icot(cwd: Path, *args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icot", *args], cwd=cwd, env=icot_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A 3x3 workspace (128 training lines: 8 steps an epoch at batch 16) and a finished teacher."""
    folder = make_workspace(tmp_path_factory.mktemp("method-reliability"), train=128, valid=8, test=9)
    write_recipe(folder, methods=["coconut"], coconut=CURRICULUM, codi=CODI, train={"max_steps": 8})
    run_train(folder, "teacher", folder / "recipe.yaml")
    return folder


def teacher(ws: Path) -> str:
    return f"--inputs.start.dir={ws / 'run/teacher'}"


# 1. -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, overrides, named", [
    ("coconut", ["--coconut.thoughts_per_step=100"], "coconut.thoughts_per_step"),
    # Stage 1 (40 thoughts) fits the 128 positions; stage 3 (120) does not: refused before stage 1 trains.
    ("coconut", ["--coconut.thoughts_per_step=40", "--coconut.max_latent_stage=3"], "stage-3 Coconut sequence"),
    ("codi", ["--codi.latents=500"], "codi.latents"),
])
def test_thoughts_that_outgrow_the_positions_are_refused_before_anything_is_written(ws, stage, overrides, named):
    result = run_train(ws, stage, ws / "recipe.yaml", "--run_dir=outgrown", teacher(ws), *overrides, check=False)
    one_line_error(result, named, "128 positions", "model.max_positions")
    assert not (ws / "outgrown" / stage).exists()


def test_eval_counts_the_thoughts_against_the_positions():
    from icot.evaluate import fit_positions
    from icot.models.decoder import build_decoder, decoder_config

    decoder = build_decoder(decoder_config("gpt2", vocab_size=16, layers=1, hidden=8, heads=2, max_positions=20))
    features = [{"prompt_len": 6}, {"prompt_len": 8}]
    assert fit_positions(decoder, features, 12, given=False) == 12
    assert fit_positions(decoder, features, 12, given=False, added=5) == 7   # 8 + 5 thought positions + 7 = 20
    with pytest.raises(UserError, match="with the mode's 5 added positions"):
        fit_positions(decoder, features, 12, given=True, added=5)


def test_a_codi_export_with_thoughts_near_the_limit_evaluates(ws):
    # As many thoughts as the longest student row allows in 128 positions: the rows train, but the prompt with
    # its thoughts and the default max_new_tokens (the longest answer + 4) do not fit: icot eval lowers the
    # cap instead of indexing past the positions.
    from icot.data.collate import view_ids
    from icot.data.tokenizer_build import load_tokenizer
    from icot.evaluate import load_eval_set

    tokenizer = load_tokenizer(ws / "tok", "the test tokenizer")
    longest = max(len(view_ids(f, "cot_removed")) for split in ("train", "valid", "test")
                  for f in load_eval_set(ws / "data" / f"{split}.txt", tokenizer))
    latents = 128 - 2 - longest   # the student row: the prompt, the thoughts between 2 markers, the answer
    run_train(ws, "codi", ws / "recipe.yaml", "--run_dir=many", teacher(ws), f"--codi.latents={latents}",
              "--train.max_steps=2")
    result = icot(ws, "eval", "--mode", "codi", "--run_dir", "many", "--data", "data/test.txt", "--out", "many.json",
                  "--batch_size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((ws / "many.json").read_text())
    assert evaluated["examples"] == 9 and "lowered to fit" in evaluated["max_new_tokens_from"]


# 2. & 9. ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def early(ws) -> Path:
    """A Coconut export after 4 steps: stage 1 of 3 (the curriculum moves on every 8 steps)."""
    run_train(ws, "coconut", ws / "recipe.yaml", "--run_dir=early", teacher(ws), "--train.max_steps=4")
    return ws / "early"


def test_an_export_before_its_curriculum_ends_is_scored_with_room_for_its_cot(ws, early):
    result = icot(ws, "eval", "--mode", "coconut", "--run_dir", "early", "--data", "data/test.txt",
                  "--out", "early.json")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((ws / "early.json").read_text())
    assert evaluated["unfinished"].startswith("the export is at stage 1 of 3")
    assert "with-CoT" in evaluated["max_new_tokens_from"]
    from icot.data.tokenizer_build import load_tokenizer
    from icot.evaluate import default_max_new_tokens, load_eval_set

    features = load_eval_set(ws / "data/test.txt", load_tokenizer(early / "coconut/export", "the export"))
    assert evaluated["max_new_tokens"] == default_max_new_tokens(features, "cot")
    from icot.report import unfinished_notes

    assert unfinished_notes({"coconut": evaluated}) == ["", f"Coconut (continuous thoughts): {evaluated['unfinished']}."]


def test_a_mode_evaluates_only_its_own_stages_exports(ws, early):
    result = icot(ws, "eval", "--mode", "stepwise", "--model", str(early / "coconut/export"), "--data",
                  "data/test.txt")
    one_line_error(result, "an export of the 'coconut' stage", "mode 'stepwise'", "(the mode of 'coconut' is coconut)")


# 3. & 4. ------------------------------------------------------------------------------------------

def test_sigterm_to_compare_checkpoints_the_stage_and_the_rerun_resumes_it(ws):
    command = [sys.executable, "-m", "icot", "compare", "--config", "recipe.yaml", "--methods", "stepwise",
               "--run_dir=compared", "--train.max_steps=40", "--train.save_every=1000",
               "--stepwise.steps_per_token=5", "--eval_max_examples=4"]
    process = subprocess.Popen(command, cwd=ws, env=icot_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    watchdog = threading.Timer(600, process.kill)   # a hang fails the test instead of blocking
    watchdog.start()
    try:
        for line in process.stdout:   # the teacher trains once it logs a step
            if "[icot teacher] step 3/" in line:
                break
        process.send_signal(signal.SIGTERM)   # the parent only, as a container stop or `kill PID`
        stdout, stderr = process.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-3000:]
    assert "SIGTERM received: the running stages checkpointed" in stderr
    root = ws / "compared/teacher"
    assert (root / "PREEMPTED").exists() and not (ws / "compared/stepwise").exists()
    first = float(re.search(r"after ([\d.]+) s of training", stdout).group(1))
    stopped = int((root / "PREEMPTED").read_text().split()[1])
    assert stopped < 40
    rerun = subprocess.run(command, cwd=ws, env=icot_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout and f"at step {stopped}" in rerun.stdout
    table = json.loads((ws / "compared/compare.json").read_text())
    assert {row["mode"] for row in table["rows"]} == {"no_cot", "explicit", "stepwise"}
    # 4. One clock: the teacher's time is its loop's over both processes, as its manifest records it.
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["train_seconds"] > first > 0
    teacher_row = next(row for row in table["rows"] if row["stages"] == ["teacher"])
    assert teacher_row["train_seconds"] == pytest.approx(manifest["train_seconds"], abs=0.05)
    stepwise = json.loads((ws / "compared/stepwise/manifest.json").read_text())
    stepwise_row = next(row for row in table["rows"] if row["method"] == "stepwise")
    assert stepwise_row["train_seconds"] == pytest.approx(stepwise["train_seconds"], abs=0.05)


# 5. -----------------------------------------------------------------------------------------------

def test_the_step_rules_are_checked_against_the_cots():
    from icot.data.steps import describe_counts, rule_problem

    multiplication = ["1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 5 2 1 1"] * 3
    gsm8k = ["<<2*3=6>> <<6+4=10>>"] * 3
    assert "hold no << equation" in rule_problem(multiplication, "equations")
    assert rule_problem(multiplication, "plus") is None and rule_problem(multiplication, "words") is None
    assert "which plus would split inside" in rule_problem(gsm8k, "plus")
    assert "hold no +" in rule_problem(["05 051 067 78"] * 3, "plus")
    assert rule_problem(gsm8k, "equations") is None
    assert describe_counts([2, 3, 0, 3]) == "0-3 steps a CoT (mean 2.0), 1 of 4 without a step"


def test_a_step_rule_that_does_not_fit_the_data_is_refused(ws):
    result = run_train(ws, "coconut", ws / "recipe.yaml", "--run_dir=steps", teacher(ws), "--data.steps=equations",
                       check=False)
    one_line_error(result, "data.steps: equations does not fit", "hold no << equation")
    assert not (ws / "steps/coconut").exists()
    fitting = run_train(ws, "coconut", ws / "recipe.yaml", "--run_dir=steps", teacher(ws), "--train.max_steps=1")
    assert "data.steps auto: 3-3 steps a CoT (mean 3.0), 0 of 128 without a step" in fitting.stdout


def test_a_codi_teacher_row_left_without_cot_is_refused(ws):
    # One step a CoT (each CoT a single word): without the last step the teacher row holds no CoT.
    data = ws / "one-step"
    data.mkdir(exist_ok=True)
    lines = []
    for line in (ws / "data/train.txt").read_text().splitlines():
        question, rest = line.split("||")
        cot, answer = rest.split(" #### ")
        lines.append(f"{question}||{cot.split()[0]} #### {answer}")
    (data / "train.txt").write_text("\n".join(lines) + "\n")
    result = run_train(ws, "codi", ws / "recipe.yaml", "--run_dir=one-step", teacher(ws),
                       f"--data.train={data / 'train.txt'}", "--data.valid=null", "--codi.include_last_step=false",
                       "--data.steps=words", check=False)
    one_line_error(result, "codi.include_last_step false", "128 of 128 training CoTs have one step or none")


# 6. -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("--stepwise.smoothing_lambda=nan", "must be a number, got nan"),
    ("--codi.distill_weight=inf", "must be finite, got inf"),
    ("--stepwise.smoothing_lambda=0", "stepwise.smoothing_lambda: must be greater than 0.0"),
    ("--codi.lora_alpha=0", "codi.lora_alpha: must be greater than 0.0"),
])
def test_values_that_would_train_nonsense_are_refused_by_the_config(ws, override, message):
    from icot.config import load_stage_config

    stage = override.split(".")[0].lstrip("-")
    with pytest.raises(UserError, match=re.escape(message)):
        load_stage_config(stage, str(ws / "recipe.yaml"), [override])
    assert load_stage_config("stepwise", str(ws / "recipe.yaml"),
                             ["--stepwise.smoothing_lambda=inf"]).stepwise.smoothing_lambda == math.inf


@pytest.mark.parametrize("overrides, message", [
    (["--stepwise.pretrain_epochs=2"], "stepwise.pretrain_epochs: 2 epoch(s) of 8 steps before the removal starts, "
                                       "but the run trains 8 steps"),
    (["--stepwise.max_length=20"], "stepwise.max_length: 20 is shorter than every training example"),
])
def test_stepwise_settings_that_never_remove_or_train_one_example_are_refused(ws, overrides, message):
    result = run_train(ws, "stepwise", ws / "recipe.yaml", "--run_dir=never", teacher(ws), *overrides, check=False)
    one_line_error(result, message)
    assert not (ws / "never/stepwise").exists()


# 7. & 8. ------------------------------------------------------------------------------------------

def test_lora_targets_the_model_lacks_are_named_before_peft(ws):
    result = run_train(ws, "codi", ws / "recipe.yaml", "--run_dir=lora", teacher(ws),
                       "--codi.lora_targets=q_proj,c_attn", check=False)
    one_line_error(result, "codi.lora_targets: q_proj is not a linear layer of this gpt2 model", "c_attn, c_fc")


@pytest.mark.parametrize("overrides, message", [
    (["--methods=codi", "--codi.lora_targets=q_proj"], "codi.lora_targets: q_proj"),
    (["--methods=coconut", "--coconut.init_token=<<"], "coconut.init_token"),
    (["--methods=coconut", "--coconut.thoughts_per_step=100"], "coconut.thoughts_per_step"),
    (["--methods=stepwise", "--model.family=llama", "--stepwise.keep_position=true"], "stepwise.keep_position"),
    (["--methods=stepwise", "--eval_batch_size=0"], "--eval_batch_size: must be at least 1"),
    (["--methods=stepwise", "--data.test=missing.txt"], "data.test: no such file missing.txt"),
])
def test_the_pipeline_checks_every_stage_before_the_first_trains(ws, overrides, message):
    result = icot(ws, "pipeline", "--config", "recipe.yaml", "--run_dir=checked", *overrides)
    one_line_error(result, message)
    assert not (ws / "checked/teacher").exists() and not (ws / "checked/no_cot").exists()


def test_a_run_folder_that_is_a_file_is_refused_before_training(ws):
    (ws / "a-file").write_text("")
    one_line_error(icot(ws, "pipeline", "--config", "recipe.yaml", "--run_dir=a-file"), "run_dir", "a-file")


def test_a_method_listed_twice_runs_once(ws):
    from icot.config import load_methods

    assert load_methods(str(ws / "recipe.yaml"), ["--methods=codi,stepwise,codi"]) == ["codi", "stepwise"]


def test_a_stage_stopped_by_bad_input_says_to_fix_it_not_to_rerun(ws):
    # An input folder only the stage itself can check (another run's, or one this pipeline would write).
    result = icot(ws, "pipeline", "--config", "recipe.yaml", "--run_dir=bad-input", "--methods=stepwise",
                  "--only=stepwise", "--stepwise.start=teacher", f"--inputs.start.dir={ws / 'nowhere'}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("icot: error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "no DONE marker" in errors[0]   # the stage's own line, then the pipeline's
    assert "stage stepwise stopped on the error above; fix it" in errors[-1] and "resume" not in errors[-1]


# 11. ----------------------------------------------------------------------------------------------

def test_demo_out_naming_a_file_is_refused_before_anything_runs(ws):
    (ws / "demo-file").write_text("")
    one_line_error(icot(ws, "demo", "--method", "stepwise", "--out", "demo-file"), "--out: demo-file is a file")


# 12. ----------------------------------------------------------------------------------------------

def test_resume_compares_paths_as_paths_from_another_folder(ws, tmp_path):
    relative = ["--run_dir=paths", "--train.max_steps=40", "--train.save_every=1000"]
    code, _ = launch_and_signal(ws, "teacher", ws / "recipe.yaml", *relative, sig=signal.SIGTERM, at_step=3,
                                log_name="paths")
    assert code == 0
    stopped = int((ws / "paths/teacher/PREEMPTED").read_text().split()[1])
    # The same files spelled absolute (and with ./ and a trailing slash), from another working folder.
    absolute = [f"--run_dir={ws / 'paths'}", "--train.max_steps=40", "--train.save_every=1000",
                f"--model.tokenizer={ws}/./tok/", f"--data.train={ws / 'data/train.txt'}",
                f"--data.valid={ws / 'data/valid.txt'}", f"--data.test={ws / 'data/test.txt'}"]
    resumed = run_train(tmp_path, "teacher", ws / "recipe.yaml", *absolute)
    assert f"at step {stopped}" in resumed.stdout
    recorded = json.loads((ws / "paths/teacher/manifest.json").read_text())["data"]["train"]
    assert recorded == os.path.realpath(ws / "data/train.txt")
