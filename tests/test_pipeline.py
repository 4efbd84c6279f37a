"""`icot pipeline` / `icot demo` end to end on tiny settings, and the time-left estimate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from icot import registry
from icot.config import load_stage_config
from icot.data.multiply import parse_operands, render_line
from icot.config import DemoConfig
from icot.demo import DEMO_RECIPE, RECIPES, REFERENCE_DATA_VARIABLE, official_test_file
from icot.pipeline import Progress, run_stages, view_tokens
from icot.report import StageRun, format_seconds

STAGES = [spec.name for spec in registry.plan(["icot_kd"])]   # what a recipe without `methods:` trains

TINY = ["--model.layers=2", "--model.hidden=32", "--model.heads=2", "--model.max_positions=256",
        "--train.batch_size=16", "--train.max_steps=4", "--train.log_every=2", "--train.eval_examples=4",
        "--train.lr=1e-3"]


def icot(*args, cwd):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, "-m", "icot", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_time_left_weighs_each_stage_by_its_work(tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("1 2 * 3 4||5 6 + 7 8 ( 9 ) #### 1 2 3\n" * 5 + "not a data line\n")
    tokens = view_tokens(str(data))
    cot_view, no_cot_view, prompt = 5 + 8 + 3 + 2, 5 + 3 + 2, 5 + 1
    assert tokens == {"cot": cot_view, "nocot": no_cot_view, "prompt": prompt}
    assert view_tokens(str(tmp_path / "absent.txt")) is None
    config = {stage: load_stage_config(stage, str(DEMO_RECIPE), [f"--data.train={data}"]) for stage in STAGES}

    def work_per_step(config, tokens):
        return registry.get_stage(config.stage).load().work_per_step(config, tokens)

    work = {stage: work_per_step(config[stage], tokens) for stage in STAGES}
    assert work["teacher"] == 64 * 3 * cot_view
    assert work["no_cot"] == work["mind_reading"] == 64 * 3 * no_cot_view   # the demo caches teacher states
    assert work["emulation"] == 128 * 3 * prompt
    assert work["coupling"] == 64 * 3 * (prompt + no_cot_view)
    uncached = load_stage_config("emulation", str(DEMO_RECIPE), ["--icot_kd.teacher_state_cache=false"])
    assert work_per_step(uncached, tokens) == 128 * (3 * prompt + cot_view)
    # 100 teacher steps took 60 s: 300 no-CoT steps are estimated from their own work, not the teacher's
    # seconds per step.
    runs = [StageRun("teacher", 100, 100 * work["teacher"], seconds=60.0),
            StageRun("no_cot", 300, 300 * work["no_cot"])]
    assert Progress(runs).estimate_left(0) is None
    assert Progress(runs).estimate_left(1) == pytest.approx(60.0 * 3 * no_cot_view / cot_view)
    assert format_seconds(Progress(runs).estimate_left(1)) == "1m40s"
    # `--only=eval` runs no stage at all.
    assert run_stages(str(DEMO_RECIPE), [], []) == []


def check_results(run_dir: Path):
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["modes"]) == {"no_cot", "explicit", "implicit"}
    for mode in results["modes"].values():
        assert 0.0 <= mode["accuracy"] <= 1.0
        assert mode["examples_per_s_batch1"] > 0 and mode["examples_per_s_batched"] > 0
    assert set(results["stages"]) == set(STAGES)
    table = (run_dir / "results.md").read_text()
    assert "Implicit CoT" in table and "examples/s (batch 1)" in table
    assert (run_dir / "results.png").stat().st_size > 10_000
    for stage in STAGES:
        assert (run_dir / stage / "DONE").exists()
    return results


def test_demo_runs_a_shortened_multiplication_pipeline_and_skips_completed_stages(tmp_path):
    out = tmp_path / "demo"
    # train.threads reaches torch in the stage processes, set per stage here: 3 for the baseline beside the
    # stages, 2 for the teacher; the other stages keep the pipeline's half of the cores.
    args = ["demo", "--out", str(out), "--digits_a", "2", "--digits_b", "2", "--train", "256", "--valid", "16", "--test", "24", *TINY,
            "--stages.no_cot.train.threads=3", "--stages.teacher.train.threads=2"]
    first = icot(*args, cwd=tmp_path)
    assert "estimate" not in first.stderr  # progress goes to stdout
    assert "about" in first.stdout and "left" in first.stdout  # the time-left estimate is shown
    check_results(out / "run")
    # The demo trains the no-CoT baseline beside the other stages, from the start: it overlaps the teacher.
    assert "steps, beside the other stages" in first.stdout
    spans = {}
    for stage in ("teacher", "no_cot"):
        manifest = json.loads((out / "run" / stage / "manifest.json").read_text())
        spans[stage] = (manifest["started_at"], manifest["finished_at"])
    assert spans["no_cot"][0] < spans["teacher"][1] and spans["teacher"][0] < spans["no_cot"][1]
    threads = {stage: json.loads((out / "run" / stage / "manifest.json").read_text())["threads"] for stage in STAGES}
    assert threads == {**{stage: max(1, os.cpu_count() // 2) for stage in STAGES}, "no_cot": 3, "teacher": 2}
    # Only the stages in sequence draw a progress bar: two bars on one terminal garble each other.
    assert "teacher: " in first.stderr and "no_cot: " not in first.stderr
    stage_lines = {line.split(" | ")[0][2:]: line for line in (out / "run/results.md").read_text().splitlines()
                   if line.startswith("| ")}
    assert "(beside the other stages, 3 threads)" in stage_lines["no_cot"] and "beside" not in stage_lines["teacher"]
    first_times = json.loads((out / "run/results.json").read_text())["stages"]
    second = icot(*args, cwd=tmp_path)
    assert second.stdout.count("already complete, skipped") == len(STAGES)
    # Every stage, run now or skipped, reports the training time its manifest recorded (one clock).
    for stage, entry in json.loads((out / "run/results.json").read_text())["stages"].items():
        manifest = json.loads((out / "run" / stage / "manifest.json").read_text())
        assert entry["skipped"] and entry["seconds"] == manifest["train_seconds"] > 0, stage
        assert first_times[stage]["seconds"] == entry["seconds"], stage
    assert DEMO_RECIPE.exists()
    # The demo's data writes the column sums as the CoT; asking for other data in the same folder is
    # refused before anything runs.
    line = (out / "data/train.txt").read_text().splitlines()[0]
    assert " + " not in line and line == render_line(*parse_operands(line), layout="columns")
    other = subprocess.run([sys.executable, "-m", "icot", *args, "--layout", "paper"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode != 0
    assert f"{out / 'data'} was generated with other settings: layout 'columns' (asked: 'paper')" in other.stderr


def test_gsm8k_smoke_pipeline_with_sentencepiece_and_token_mixture(tmp_path, reference_data):
    gsm8k = reference_data / "gsm8k_aug"
    test_slice = tmp_path / "test_slice.txt"
    test_slice.write_text("".join(open(gsm8k / "test.txt", encoding="utf-8").readlines()[:12]))
    icot("tokenizer", "build", str(gsm8k / "valid.txt"), "--kind", "sentencepiece", "--out", "tok",
         "--vocab_size", "3000", cwd=tmp_path)
    recipe = tmp_path / "gsm8k.yaml"
    recipe.write_text(f"""run_dir: run
model: {{family: gpt2, layers: 2, hidden: 32, heads: 2, tokenizer: tok, max_positions: 512}}
data: {{train: {gsm8k / 'valid.txt'}, valid: {test_slice}, test: {test_slice}, max_length: 512,
       max_train_examples: 64}}
train: {{lr: 1.0e-3, batch_size: 8, max_steps: 3, log_every: 1, eval_examples: 2}}
icot_kd: {{mixture: token, freeze: student}}
""")
    icot("pipeline", "--config", str(recipe), "--eval_batch_size", "4", cwd=tmp_path)
    results = check_results(tmp_path / "run")
    assert results["modes"]["implicit"]["examples"] == 12
    emulator = json.loads((tmp_path / "run/emulation/export/icot_component.json").read_text())
    assert emulator["mixture_size"] > 1000   # one component per vocabulary token
    evaluated = icot("eval", "--mode", "implicit", "--run_dir", "run", "--data", str(test_slice),
                     "--out", "eval.json", cwd=tmp_path)
    assert json.loads((tmp_path / "eval.json").read_text())["examples"] == 12, evaluated.stdout


def test_stepwise_4x4_demo_evaluates_on_the_official_test_set_or_says_it_generated_one(tmp_path, reference_data):
    """The stepwise 4x4 recipe takes BIG-bench's test set where the reference data folder holds it, and says it
    generated one elsewhere."""
    tiny = [*TINY, "--stepwise.steps_per_token=1", "--eval_max_examples", "12", "--train", "256", "--valid", "16",
            "--test", "24"]
    absent = tmp_path / "no_reference_data"
    absent.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "ICOT_REFERENCE_DATA"}
    four = ["--config", str(RECIPES / "demo_stepwise_4x4.yaml")]
    generated = subprocess.run([sys.executable, "-m", "icot", "demo", "--method", "stepwise", *four, "--out", "generated",
                                "--reference_data", str(absent), *tiny], cwd=tmp_path,
                               env=dict(env, DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=900)
    assert generated.returncode == 0, generated.stdout[-3000:] + generated.stderr[-3000:]
    assert "evaluating on a generated test split instead" in generated.stdout
    results = json.loads((tmp_path / "generated/run/results.json").read_text())
    assert set(results["modes"]) == {"no_cot", "explicit", "stepwise"}
    assert results["modes"]["stepwise"]["examples"] == 12
    assert "Stepwise internalization" in (tmp_path / "generated/run/results.md").read_text()
    assert len((tmp_path / "generated/data/test.txt").read_text().splitlines()) == 24

    official = icot("demo", "--method", "stepwise", *four, "--out", "official", "--reference_data", str(reference_data),
                    *tiny, cwd=tmp_path)
    test_file = reference_data / "4_by_4_mult/test_bigbench.txt"
    assert f"evaluating on the official test set {test_file}" in official.stdout
    assert not (tmp_path / "official/data/test.txt").exists()   # no generated test split
    official_pairs = {line.split("||")[0] for line in test_file.read_text().splitlines()}
    train_pairs = {line.split("||")[0] for line in (tmp_path / "official/data/train.txt").read_text().splitlines()}
    assert not official_pairs & train_pairs
    manifest = json.loads((tmp_path / "official/run/stepwise/manifest.json").read_text())
    assert manifest["data"]["test"] == str(test_file)


def test_an_explicit_reference_data_folder_is_the_only_one_looked_in(tmp_path, monkeypatch):
    holding, empty = tmp_path / "holding", tmp_path / "empty"
    (holding / "4_by_4_mult").mkdir(parents=True)
    (holding / "4_by_4_mult/test_bigbench.txt").write_text("1 2 3 4 * 5 6 7 8||x #### 1\n")
    empty.mkdir()
    data = DemoConfig(official_test="4_by_4_mult/test_bigbench.txt")
    monkeypatch.setenv(REFERENCE_DATA_VARIABLE, str(holding))
    assert official_test_file(data, None) == holding / "4_by_4_mult/test_bigbench.txt"
    assert official_test_file(data, str(empty)) is None   # not the environment's folder


def assert_generated_3x2_paper(out: Path, stdout: str) -> None:
    """The later methods' demos: 3x2 multiplication in the papers' layout, a generated test split (3x2 has no
    official one, so nothing is said about one)."""
    line = (out / "data/train.txt").read_text().splitlines()[0]
    assert line == render_line(*parse_operands(line), layout="paper") and " + " in line
    assert [len(operand.split()) for operand in line.split("||")[0].split(" * ")] == [3, 2]
    assert len((out / "data/test.txt").read_text().splitlines()) == 24
    assert "official test set" not in stdout and "generated test split instead" not in stdout


def test_codi_demo_recipe_runs_end_to_end(tmp_path):
    tiny = [*TINY, "--eval_max_examples", "12", "--train", "256", "--valid", "16", "--test", "24",
            "--codi.lora_r=8", "--codi.projection_dim=32"]
    absent = tmp_path / "no_reference_data"
    absent.mkdir()
    demo = icot("demo", "--method", "codi", "--out", "demo", "--reference_data", str(absent), *tiny, cwd=tmp_path)
    assert_generated_3x2_paper(tmp_path / "demo", demo.stdout)
    results = json.loads((tmp_path / "demo/run/results.json").read_text())
    assert set(results["modes"]) == {"no_cot", "explicit", "codi"}
    assert results["modes"]["codi"]["examples"] == 12
    assert "CODI (continuous thoughts)" in (tmp_path / "demo/run/results.md").read_text()
    manifest = json.loads((tmp_path / "demo/run/codi/manifest.json").read_text())
    assert manifest["input_exports"]["teacher"]["role"] == "start"
    assert (tmp_path / "demo/run/codi/export/adapter/adapter_config.json").is_file()


def test_coconut_demo_recipe_runs_end_to_end(tmp_path):
    tiny = [*TINY, "--eval_max_examples", "12", "--train", "256", "--valid", "16", "--test", "24"]
    absent = tmp_path / "no_reference_data"
    absent.mkdir()
    demo = icot("demo", "--method", "coconut", "--out", "demo", "--reference_data", str(absent), *tiny, cwd=tmp_path)
    assert_generated_3x2_paper(tmp_path / "demo", demo.stdout)
    results = json.loads((tmp_path / "demo/run/results.json").read_text())
    assert set(results["modes"]) == {"no_cot", "explicit", "coconut"}
    assert results["modes"]["coconut"]["examples"] == 12
    assert "Coconut (continuous thoughts)" in (tmp_path / "demo/run/results.md").read_text()
    manifest = json.loads((tmp_path / "demo/run/coconut/manifest.json").read_text())
    assert manifest["input_exports"]["teacher"]["role"] == "start"


def test_every_method_demo_trains_the_shared_stages_once_and_writes_one_table(tmp_path):
    tiny = [*TINY, "--eval_max_examples", "12", "--train", "256", "--valid", "16", "--test", "24",
            "--codi.lora_r=8", "--codi.projection_dim=32", "--stepwise.steps_per_token=1",
            "--coconut.steps_per_stage=1", "--coconut.max_latent_stage=2"]
    demo = icot("demo", "--method", "all", "--out", "all", *tiny, cwd=tmp_path)
    run = tmp_path / "all/run"
    results = json.loads((run / "results.json").read_text())
    plan = [spec.name for spec in registry.plan(["icot_kd", "stepwise", "coconut", "codi"])]
    assert list(results["stages"]) == plan and plan.count("teacher") == plan.count("no_cot") == 1
    comparison = json.loads((run / "compare.json").read_text())
    assert [row["mode"] for row in comparison["rows"]] == ["no_cot", "explicit", "implicit", "stepwise", "coconut",
                                                           "codi"]
    for row in comparison["rows"]:
        assert row["examples_per_s_batch1"] > 0 and row["train_seconds"] > 0, row["mode"]
    table = (run / "compare.md").read_text()
    assert "| stepwise | Stepwise internalization (ICoT-SI) |" in table and table in demo.stdout
    assert (run / "compare.png").stat().st_size > 10_000
    assert_generated_3x2_paper(tmp_path / "all", demo.stdout)
