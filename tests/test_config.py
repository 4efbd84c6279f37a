"""Typed stage configs: merge order, stage overrides, coercion, errors, resolved round trip."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from icot import registry
from icot.config import (Paths, StageConfig, TrainConfig, config_help, config_to_dict, load_methods, load_resolved,
                         load_stage_config, save_resolved, stage_config)
from icot.errors import UserError
from icot.exports import ExportChoice


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
    assert config.model.name_or_path is None and not hasattr(config, "icot_kd")   # the teacher has no method section
    assert load_stage_config("coupling").icot_kd.delta == "dynamic"


def test_merge_order_defaults_recipe_stage_cli(recipe):
    path = recipe("""
        run_dir: runs/demo
        train: {lr: 1e-3, epochs: 2, batch_size: 16}
        model: {layers: 8}
        stages:
          teacher:
            train: {epochs: 3, lr: 2e-3}
          coupling:
            icot_kd: {freeze: student}
    """)
    teacher = load_stage_config("teacher", path, ["--train.epochs=5"])
    assert teacher.run_dir == "runs/demo"
    assert teacher.model.layers == 8  # recipe shared
    assert teacher.train.lr == 2e-3  # recipe stage beats recipe shared
    assert teacher.train.epochs == 5.0  # command line beats the recipe's stage section
    assert teacher.train.batch_size == 16
    assert teacher.train.weight_decay == 0.01  # default
    assert load_stage_config("emulation", path, []).icot_kd.freeze == "none"  # another stage's section does not leak

    coupling = load_stage_config("coupling", path, [])
    assert coupling.icot_kd.freeze == "student"
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
    path = recipe("model: {tokenizer: 007}\nicot_kd: {delta: 0}\ntrain: {resume: 'null'}\n")
    config = load_stage_config("mind_reading", path, [])
    assert config.model.tokenizer == "007"
    assert config.icot_kd.delta == 0   # `dynamic` or an integer, typed once
    assert config.train.resume == "null"  # quoted in YAML: a string, not None
    cli = load_stage_config("mind_reading", None, ["--model.tokenizer=007", "--icot_kd.delta=3"])
    assert cli.model.tokenizer == "007" and cli.icot_kd.delta == 3
    assert load_stage_config("coupling", None, ["--icot_kd.mixture=none"]).icot_kd.mixture == "none"


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
    # Another method's section is checked even where this stage does not read it.
    ("icot_kd: {deltaa: 3}\n", r"recipe\.yaml:1: unknown key 'icot_kd\.deltaa'; did you mean 'icot_kd\.delta'\?"),
    ("icot_kd: {delta: diagonal}\n", r"icot_kd\.delta: expected 'dynamic' or an integer, got 'diagonal'"),
    ("stages:\n  teacher:\n    icot_kd: {delta: 3}\n", r"unknown key 'stages\.teacher\.icot_kd'"),
    ("inputs: {studnet: {dir: x}}\n", r"unknown key 'inputs\.studnet'; did you mean 'inputs\.student'\?"),
    ("inputs: {student: {export: epoch0}}\n",
     r"inputs\.student\.export: expected last, best, 'epoch N' or 'step N' \(N >= 1\), got 'epoch0'"),
    ("methods: [icot_kd, icot]\n", r"recipe\.yaml:1: methods: unknown method 'icot'; registered: icot_kd"),
    ("method: {delta: 3}\n", r"recipe\.yaml:1: the 'method:' section is now named after its method "
                             r"\(icot_kd:, stepwise:, coconut:, codi:, coconut_simcot:, codi_simcot:\); rename it"),
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
    ("model: {family: null}\n", None, r"model\.family: expected one of gpt2, llama, mistral, qwen2, got null"),
    ("train: {betas: null}\n", None, r"train\.betas: expected a list, got null"),
    (None, "--train.batch_size=big", r"command line: --train\.batch_size: expected an integer, got 'big'"),
    (None, "--train.epochs", r"--train\.epochs: expected a number, got no value"),
])
def test_wrong_types_name_the_key(recipe, text, override, message):
    path = recipe(text) if text else None
    with pytest.raises(UserError, match=message):
        load_stage_config("teacher", path, [override] if override else [])


@pytest.mark.parametrize("override, message", [
    ("--train.schedule=cos", r"--train\.schedule: expected one of constant, linear, cosine, got 'cos'"),
    ("--train.precision=fp8", r"expected one of fp32, bf16, fp16"),
    ("--train.zero_stage=4", r"--train\.zero_stage: expected one of 0, 1, 2, 3, got '4'"),
    ("--icot_kd.mixture=gumbel", r"expected one of none, token"),
    ("--icot_kd.freeze=teacher", r"expected one of none, student, emulator"),
    ("--model.family=bert", r"expected one of gpt2, llama, mistral, qwen2"),
    ("--icot_kd.delta=fixed", r"--icot_kd\.delta: expected 'dynamic' or an integer, got 'fixed'"),
    ("--icot_kd.delta=-1", r"--icot_kd\.delta: must be at least 0, got -1"),
    ("--train.batch_size=0", r"--train\.batch_size: must be at least 1, got 0"),
    ("--train.offload=true", r"train\.offload needs train\.zero_stage 2 or 3"),
    ("--train.micro_batch_size=64", r"train\.micro_batch_size \(64\) exceeds train\.batch_size \(32\)"),
])
def test_enumerations_and_ranges(override, message):
    with pytest.raises(UserError, match=message):
        load_stage_config("teacher", None, [override])


def test_accepted_enumeration_values():
    config = load_stage_config("mind_reading", None, ["--icot_kd.delta=0", "--train.schedule=cosine",
                                                      "--train.precision=bf16", "--train.zero_stage=3"])
    assert (config.icot_kd.delta, config.train.schedule, config.train.precision) == (0, "cosine", "bf16")
    assert config.train.zero_stage == 3 and isinstance(config.train.zero_stage, int)
    choice = load_stage_config("coupling", None, ["--inputs.student.export=Epoch 7"]).inputs.student.export
    assert choice == ExportChoice("epoch", 7) and str(choice) == "epoch 7"


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
    assert load_stage_config("coupling", recipe("icot_kd:\ninputs:\n"), []) == stage_config("coupling")


def test_resolved_round_trip(tmp_path, recipe):
    path = recipe("""
        run_dir: runs/rt
        model: {tokenizer: '007', name_or_path: none_dir, kv_heads: 2}
        train: {lr: 1e-4, betas: [0.9, 0.95], eps: 1e-12, max_steps: 100}
        icot_kd: {delta: 3, mixture: none}
        inputs: {teacher: {dir: runs/rt/teacher, export: best}}
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
    assert set(data) == {"stage", "run_dir", "model", "data", "train"}
    coupling = config_to_dict(load_stage_config("coupling"))
    assert set(coupling) == {"stage", "run_dir", "model", "data", "train", "inputs", "icot_kd"}
    assert coupling["inputs"] == {"student": {"dir": None, "export": "last"}, "emulator": {"dir": None, "export": "last"}}


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
    assert registry.stage_names() == ["no_cot", "teacher", "mind_reading", "emulation", "coupling", "stepwise", "coconut",
                                     "codi", "coconut_simcot", "codi_simcot"]


def test_a_resolved_config_written_before_method_sections_loads(tmp_path):
    """Run folders written before methods had their own sections keep working: `method:` becomes the
    stage's method section (`first_column` is delta 0) and `<role>_dir` becomes `inputs.<role>.dir`."""
    old = tmp_path / "config.yaml"
    old.write_text(textwrap.dedent("""
        stage: coupling
        run_dir: runs/old
        train: {lr: 0.001}
        method: {delta: first_column, mixture: none, freeze: student}
        teacher_dir: null
        student_dir: runs/old/mind_reading
        emulator_dir: null
    """))
    config = load_resolved(str(old))
    assert config.icot_kd.delta == 0 and config.icot_kd.freeze == "student" and config.train.lr == 1e-3
    assert config.inputs.student.dir == "runs/old/mind_reading" and config.inputs.emulator.dir is None


def test_methods_come_from_the_command_line_then_the_recipe_then_the_default(recipe):
    assert load_methods() == ["icot_kd"]   # Method.default
    path = recipe("methods: [icot_kd]\n")
    assert load_methods(path, []) == ["icot_kd"]
    assert load_methods(path, ["--methods=icot_kd"]) == ["icot_kd"]
    with pytest.raises(UserError, match=r"command line: --methods: unknown method 'nope'"):
        load_methods(path, ["--methods=nope"])
    # `methods:` is the run's, not a stage's: it is not part of any stage config.
    assert load_stage_config("teacher", path, []) == StageConfig(stage="teacher")


def test_help_lists_every_key_with_type_default_and_meaning():
    text = config_help("coupling")
    assert "icot train coupling: couple and optimize" in text
    assert "reads: mind_reading (as student), emulation (as emulator)" in text
    lines = text.splitlines()
    index = lines.index("  train.lr: a number, default 5e-05")
    assert "AdamW learning rate" in lines[index + 1]
    for key in ("model.family: one of gpt2, llama, mistral, qwen2, default gpt2",
                "icot_kd.delta: 'dynamic' or an integer, default dynamic",
                "inputs.student.export: last, best, 'epoch N' or 'step N', default last",
                "train.precision: one of fp32, bf16, fp16, default fp32"):
        assert f"  {key}" in lines, key
    # Every field of the config has help text.
    keys = [line for line in lines if line.startswith("  ") and not line.startswith("      ") and ": " in line
            and ", default " in line]
    assert len(keys) == len([i for i, line in enumerate(lines) if line in keys and lines[i + 1].startswith("      ")])
    assert "icot_kd" not in config_help("teacher")


def test_config_command_prints_every_stage_as_it_will_be_recorded(recipe, capsys):
    from icot.config_cli import config_cli, stages_cli

    path = recipe("train: {lr: 1e-3}\nstages:\n  coupling:\n    inputs: {student: {export: epoch 2}}\n")
    config_cli(["--config", path, "--train.seed=7"])
    sections = capsys.readouterr().out.split("# ---- ")[1:]
    assert [s.split(":", 1)[0] for s in sections] == [spec.name for spec in registry.plan(["icot_kd"])]
    resolved = {data["stage"]: data for data in (yaml.safe_load(s.split("\n", 1)[1]) for s in sections)}
    assert all(data["train"]["seed"] == 7 and data["train"]["lr"] == 1e-3 for data in resolved.values())
    assert resolved["coupling"]["inputs"]["student"]["export"] == "epoch 2"
    assert resolved["coupling"] == config_to_dict(load_stage_config("coupling", path, ["--train.seed=7"]))
    config_cli(["--config", path, "--stage", "teacher"])
    assert capsys.readouterr().out.count("# ---- ") == 1
    stages_cli(["--config", path, "--format", "tsv"])
    assert capsys.readouterr().out.splitlines()[-1] == "coupling\ticot_kd\tmind_reading emulation\timplicit"


def test_activation_is_checked_against_transformers_names():
    assert load_stage_config("teacher", None, ["--model.activation=gelu_pytorch_tanh"]).model.activation == \
        "gelu_pytorch_tanh"
    assert load_stage_config("teacher", None, []).model.activation is None
    with pytest.raises(UserError, match=r"--model\.activation: expected a transformers activation name "
                                        r"\(ACT2FN\) such as gelu.*got 'gelux'"):
        load_stage_config("teacher", None, ["--model.activation=gelux"])
