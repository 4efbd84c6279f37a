"""Typed stage configs: merge order, stage overrides, coercion, errors, resolved round trip."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from icot.config import (STAGES, Paths, StageConfig, TrainConfig, config_to_dict, load_resolved, load_stage_config,
                         save_resolved)
from icot.errors import UserError


@pytest.fixture
def recipe(tmp_path):
    """Write a recipe from indented YAML text; returns its path."""

    def write(text: str, name: str = "recipe.yaml") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return str(path)

    return write


def test_defaults_without_recipe():
    config = load_stage_config("teacher")
    assert config == StageConfig(stage="teacher")
    assert config.train.lr == 5e-5 and config.train.betas == [0.9, 0.999] and config.train.grad_clip == 0.0
    assert config.method.delta == "dynamic" and config.model.name_or_path is None


def test_merge_order_defaults_recipe_stage_cli(recipe):
    path = recipe("""
        run_dir: runs/demo
        train: {lr: 1e-3, epochs: 2, batch_size: 16}
        model: {layers: 8}
        stages:
          teacher:
            train: {epochs: 3, lr: 2e-3}
          coupling:
            method: {freeze: student}
    """)
    teacher = load_stage_config("teacher", path, ["--train.epochs=5"])
    assert teacher.run_dir == "runs/demo"
    assert teacher.model.layers == 8  # recipe shared
    assert teacher.train.lr == 2e-3  # recipe stage beats recipe shared
    assert teacher.train.epochs == 5.0  # command line beats the recipe's stage section
    assert teacher.train.batch_size == 16
    assert teacher.train.weight_decay == 0.01  # default
    assert teacher.method.freeze == "none"  # another stage's section does not leak

    coupling = load_stage_config("coupling", path, [])
    assert coupling.method.freeze == "student"
    assert coupling.train.lr == 1e-3 and coupling.train.epochs == 2.0


def test_cli_stage_overrides_apply_only_to_that_stage(recipe):
    path = recipe("train: {lr: 1e-3}\n")
    overrides = ["--train.lr=1e-4", "--stages.teacher.train.lr", "3e-4", "--stages.emulation.model.layers=2"]
    assert load_stage_config("teacher", path, overrides).train.lr == 3e-4  # stage-specific beats shared
    assert load_stage_config("no_cot", path, overrides).train.lr == 1e-4
    assert load_stage_config("emulation", path, overrides).model.layers == 2
    assert load_stage_config("teacher", path, overrides).model.layers == 4


def test_config_flag_and_space_separated_values(recipe):
    path = recipe("run_dir: from_file\n")
    config = load_stage_config("teacher", None, ["--config", path, "--run_dir", "x", "--train.seed=7"])
    assert config.run_dir == "x" and config.train.seed == 7
    assert load_stage_config("teacher", path, ["--config", path]).run_dir == "from_file"
    with pytest.raises(UserError, match="two recipes"):
        load_stage_config("teacher", path, ["--config=other.yaml"])


def test_scientific_notation_from_yaml_and_cli(recipe):
    # PyYAML resolves `1e-4` (no dot) to a string; the declared float type must win.
    path = recipe("train: {lr: 1e-4, eps: 1.0e-6, weight_decay: 0}\n")
    config = load_stage_config("teacher", path, [])
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)
    assert config.train.eps == 1e-6 and config.train.weight_decay == 0.0
    assert load_stage_config("teacher", None, ["--train.lr=1e-4"]).train.lr == 1e-4
    assert load_stage_config("teacher", None, ["--train.max_steps=1e3"]).train.max_steps == 1000


def test_strings_stay_verbatim(recipe):
    path = recipe("model: {tokenizer: 007}\nmethod: {delta: 0}\ntrain: {resume: 'null'}\n")
    config = load_stage_config("teacher", path, [])
    assert config.model.tokenizer == "007"
    assert config.method.delta == "0"
    assert config.train.resume == "null"  # quoted in YAML: a string, not None
    cli = load_stage_config("teacher", None, ["--model.tokenizer=007", "--method.delta=3"])
    assert cli.model.tokenizer == "007" and cli.method.delta == "3"
    assert load_stage_config("teacher", None, ["--method.mixture=none"]).method.mixture == "none"


def test_booleans_ints_and_none(recipe):
    path = recipe("""
        model: {gradient_checkpointing: true, kv_heads: 2, name_or_path: ~}
        data: {skip_bad_lines: 1, max_train_examples: null}
    """)
    config = load_stage_config("teacher", path, [])
    assert config.model.gradient_checkpointing is True and config.data.skip_bad_lines is True
    assert config.model.kv_heads == 2 and config.model.name_or_path is None
    cli = load_stage_config("teacher", path, ["--model.gradient_checkpointing=false", "--model.kv_heads=none",
                                              "--data.skip_bad_lines=0", "--train.offload", "--train.zero_stage=3"])
    assert cli.model.gradient_checkpointing is False and cli.data.skip_bad_lines is False
    assert cli.model.kv_heads is None
    assert cli.train.offload is True  # a bare boolean flag
    assert load_stage_config("teacher", None, ["--data.train=null"]).data.train is None


def test_lists_from_cli_and_yaml(recipe):
    assert load_stage_config("teacher", None, ["--train.betas=0.9,0.95"]).train.betas == [0.9, 0.95]
    assert load_stage_config("teacher", None, ["--train.betas=[0.8, 0.9]"]).train.betas == [0.8, 0.9]
    path = recipe("train:\n  betas:\n    - 0.5\n    - 1e-1\n")
    assert load_stage_config("teacher", path, []).train.betas == [0.5, 0.1]
    with pytest.raises(UserError, match=r"train\.betas: expected two numbers"):
        load_stage_config("teacher", None, ["--train.betas=0.9"])
    with pytest.raises(UserError, match=r"train\.betas: expected a number, got 'x'"):
        load_stage_config("teacher", None, ["--train.betas=0.9,x"])


@pytest.mark.parametrize("text, message", [
    ("trian: {lr: 1}\n", r"recipe\.yaml:1: unknown key 'trian'; did you mean 'train'\?"),
    ("train:\n  lrr: 1\n", r"recipe\.yaml:2: unknown key 'train\.lrr'; did you mean 'train\.lr'\?"),
    ("lr: 1\n", r"unknown key 'lr'; did you mean 'train\.lr'\?"),
    ("stages:\n  teacher:\n    train:\n      epoch: 3\n",
     r"recipe\.yaml:4: unknown key 'stages\.teacher\.train\.epoch'; did you mean 'stages\.teacher\.train\.epochs'\?"),
    ("stages:\n  teachr:\n    train: {lr: 1}\n",
     r"recipe\.yaml:3: unknown key 'stages\.teachr'; did you mean 'stages\.teacher'\?"),
    ("stages:\n  coupling:\n    model: {layerz: 3}\n", r"unknown key 'stages\.coupling\.model\.layerz'"),
])
def test_unknown_keys_in_recipe(recipe, text, message):
    path = recipe(text)
    with pytest.raises(UserError, match=message):
        load_stage_config("teacher", path, [])


@pytest.mark.parametrize("override, message", [
    ("--train.lrr=1", r"command line: unknown key '--train\.lrr'; did you mean '--train\.lr'\?"),
    ("--modle.layers=2", r"unknown key '--modle'; did you mean '--model'\?"),
    ("--stages.teacher.train.lrr=1", r"unknown key '--stages\.teacher\.train\.lrr'; did you mean "
                                     r"'--stages\.teacher\.train\.lr'\?"),
    ("--stages.techer.train.lr=1", r"unknown key '--stages\.techer'; did you mean '--stages\.teacher'\?"),
    ("--train.lr.x=1", r"--train\.lr: expected a value, not a section"),
    ("--stage=coupling", r"this config is for stage 'coupling', not 'teacher'"),
])
def test_unknown_keys_on_command_line(override, message):
    with pytest.raises(UserError, match=message):
        load_stage_config("teacher", None, [override])


@pytest.mark.parametrize("text, override, message", [
    ("train:\n  lr: fast\n", None, r"recipe\.yaml:2: train\.lr: expected a number, got 'fast'"),
    ("model: {layers: 2.5}\n", None, r"recipe\.yaml:1: model\.layers: expected an integer, got '2\.5'"),
    ("train: {offload: maybe}\n", None, r"train\.offload: expected true or false, got 'maybe'"),
    ("train: {lr: [1, 2]}\n", None, r"train\.lr: expected a number, got a list"),
    ("train: 3\n", None, r"recipe\.yaml:1: train: expected a section"),
    ("model: {family: null}\n", None, r"model\.family: expected a string, got null"),
    ("train: {betas: null}\n", None, r"train\.betas: expected a list, got null"),
    (None, "--train.batch_size=big", r"command line: --train\.batch_size: expected an integer, got 'big'"),
    (None, "--train.epochs", r"--train\.epochs: expected a number, got no value"),
])
def test_wrong_types_name_the_key(recipe, text, override, message):
    path = recipe(text) if text else None
    with pytest.raises(UserError, match=message):
        load_stage_config("teacher", path, [override] if override else [])


@pytest.mark.parametrize("override, message", [
    ("--train.schedule=cos", r"--train\.schedule: 'cos' is not one of constant, linear, cosine"),
    ("--train.precision=fp8", r"not one of fp32, bf16, fp16"),
    ("--train.zero_stage=4", r"--train\.zero_stage: 4 is not one of 0, 1, 2, 3"),
    ("--method.mixture=gumbel", r"not one of none, token"),
    ("--method.freeze=teacher", r"not one of none, student, emulator"),
    ("--model.family=bert", r"not one of gpt2, llama, mistral, qwen2"),
    ("--method.delta=fixed", r"--method\.delta: expected 'dynamic', 'first_column' or a non-negative integer"),
    ("--train.batch_size=0", r"--train\.batch_size: must be at least 1, got 0"),
    ("--train.offload=true", r"train\.offload needs train\.zero_stage 2 or 3"),
    ("--train.micro_batch_size=64", r"train\.micro_batch_size \(64\) exceeds train\.batch_size \(32\)"),
])
def test_enumerations_and_ranges(override, message):
    with pytest.raises(UserError, match=message):
        load_stage_config("teacher", None, [override])


def test_accepted_enumeration_values():
    config = load_stage_config("mind_reading", None, ["--method.delta=first_column", "--train.schedule=cosine",
                                                      "--train.precision=bf16", "--train.zero_stage=3"])
    assert (config.method.delta, config.train.schedule, config.train.precision) == ("first_column", "cosine", "bf16")


def test_unknown_stage_and_bad_arguments(recipe):
    with pytest.raises(UserError, match=r"unknown stage 'teachr'.*did you mean 'teacher'"):
        load_stage_config("teachr")
    with pytest.raises(UserError, match=r"unexpected argument 'lr=1'"):
        load_stage_config("teacher", None, ["lr=1"])
    with pytest.raises(UserError, match=r"recipe\.yaml:2: invalid YAML"):
        load_stage_config("teacher", recipe("run_dir: x\ntrain: lr: 1\n"), [])
    with pytest.raises(UserError, match=r"duplicate key 'train\.lr'"):
        load_stage_config("teacher", recipe("train:\n  lr: 1\n  lr: 2\n"), [])
    with pytest.raises(UserError, match=r"cannot read config"):
        load_stage_config("teacher", "/nonexistent/recipe.yaml", [])
    with pytest.raises(UserError, match=r"recipe must be a mapping"):
        load_stage_config("teacher", recipe("- a\n- b\n"), [])


def test_empty_sections_are_allowed(recipe):
    assert load_stage_config("teacher", recipe("train:\nstages:\n"), []) == StageConfig(stage="teacher")
    assert load_stage_config("teacher", recipe(""), []) == StageConfig(stage="teacher")


def test_resolved_round_trip(tmp_path, recipe):
    path = recipe("""
        run_dir: runs/rt
        model: {tokenizer: '007', name_or_path: none_dir, kv_heads: 2}
        train: {lr: 1e-4, betas: [0.9, 0.95], eps: 1e-12, max_steps: 100}
        method: {delta: '3', mixture: none}
        teacher_dir: runs/rt/teacher
    """)
    config = load_stage_config("mind_reading", path, ["--data.cache_dir=null", "--train.resume=none"])
    out = tmp_path / "resolved" / "config.yaml"
    save_resolved(config, out)
    assert load_resolved(str(out)) == config
    assert load_stage_config("mind_reading", str(out), []) == config
    assert yaml.safe_load(out.read_text()) == config_to_dict(config)  # plain YAML, readable by anyone
    with pytest.raises(UserError, match=r"config is for stage 'mind_reading', not 'teacher'"):
        load_stage_config("teacher", str(out), [])


def test_config_to_dict_is_nested_plain_data():
    data = config_to_dict(load_stage_config("teacher"))
    assert data["train"]["betas"] == [0.9, 0.999] and data["stage"] == "teacher"
    assert set(data) == {"stage", "run_dir", "model", "data", "train", "method", "teacher_dir", "student_dir",
                         "emulator_dir"}


def test_train_config_defaults_record_paper_choices():
    train = TrainConfig()
    assert (train.lr, train.weight_decay, train.batch_size, train.schedule) == (5e-5, 0.01, 32, "constant")
    assert train.grad_clip == 0.0 and train.micro_batch_size is None


def test_stage_paths():
    paths = Paths.of(load_stage_config("emulation", None, ["--run_dir=runs/a"]))
    assert str(paths.root) == "runs/a/emulation"
    assert [p.name for p in (paths.config, paths.ds_config, paths.ckpt, paths.tb, paths.export, paths.manifest)] == \
        ["config.yaml", "ds_config.json", "ckpt", "tb", "export", "manifest.json"]
    assert Paths.for_stage("r", "teacher").ckpt.as_posix() == "r/teacher/ckpt"
    assert STAGES == ("teacher", "no_cot", "mind_reading", "emulation", "coupling")
