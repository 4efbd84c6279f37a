"""The shipped recipes: each resolves for every stage it trains, and the paper recipes say, setting by
setting, what the reference README's commands say (da03/implicit_chain_of_thought, README.md).

The README gives its commands for 4x4 multiplication with GPT-2 Small "as an example"; the other
multiplication rows change the data folder and the model only. It gives no GSM8K commands; the GSM8K
recipes are checked for what the paper and the scripts fix (fp32, the official test file, the token
mixture).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from icot import registry
from icot.config import load_methods, load_stage_config
from icot.demo import RECIPES
from icot.exports import ExportChoice

# The reference README's commands, one entry per exported variable (section "Training", then
# "Generation & Evaluation"), for 4x4 multiplication with GPT-2 Small.
REFERENCE_COMMANDS = {
    "teacher": {"EPOCHS": 1, "LR": 5e-5, "BSZ": 32},
    "mind_reading": {"EPOCHS": 40, "LR": 5e-5, "BSZ": 32, "DELTA": "dynamic", "TEACHER": "checkpoint_0"},
    "emulation": {"EPOCHS": 40, "LR": 5e-5, "BSZ": 32, "DELTA": "dynamic", "MIXTURE_SIZE": 1,
                  "TEACHER": "checkpoint_0"},
    "coupling": {"EPOCHS": 40, "LR": 5e-5, "BSZ": 32, "STUDENT": "checkpoint_6", "EMULATOR": "checkpoint_5"},
    "generate": {"BSZ": 1, "test_path": "test_bigbench.txt"},
}
# What every reference training script fixes: `dtype = 'float32'`, torch AdamW with its defaults.
REFERENCE_SCRIPTS = {"precision": "fp32", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}

MULTIPLICATION = {   # recipe: (model folder, digits, whether the README names the coupled checkpoints)
    "gpt2_small_4x4": ("gpt2", 4, True), "gpt2_small_5x5": ("gpt2", 5, False),
    "gpt2_medium_4x4": ("gpt2-medium", 4, False), "gpt2_medium_5x5": ("gpt2-medium", 5, False),
}
GSM8K = {"gpt2_small_gsm8k": "gpt2", "gpt2_medium_gsm8k": "gpt2-medium"}


def checkpoint_choice(name: str) -> ExportChoice:
    """The reference's `checkpoint_<i>` (saved after epoch i, counted from 0) as an export choice."""
    return ExportChoice("epoch", int(name.rsplit("_", 1)[1]) + 1)


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_resolves_for_every_stage_it_trains(recipe):
    for spec in registry.plan(load_methods(str(recipe))):
        assert load_stage_config(spec.name, str(recipe), []).stage == spec.name


@pytest.mark.parametrize("name", sorted(MULTIPLICATION))
def test_multiplication_recipes_follow_the_reference_commands(name):
    model, digits, names_checkpoints = MULTIPLICATION[name]
    recipe = str(RECIPES / f"{name}.yaml")
    folder = f"data/{digits}_by_{digits}_mult"
    configs = {stage: load_stage_config(stage, recipe) for stage in REFERENCE_COMMANDS if stage != "generate"}
    for stage, settings in REFERENCE_COMMANDS.items():
        if stage == "generate":
            continue
        config = configs[stage]
        assert config.train.epochs == settings["EPOCHS"] and config.train.max_steps is None, (stage, "EPOCHS")
        assert config.train.lr == settings["LR"], (stage, "LR")
        assert config.train.batch_size == settings["BSZ"] and config.train.schedule == "constant", (stage, "BSZ")
        assert config.model.name_or_path == f"models/{model}", (stage, "MODEL")
        for key, value in REFERENCE_SCRIPTS.items():
            assert getattr(config.train, key) == value, (stage, key)
        assert config.train.grad_clip == 0.0, stage   # the paper-era runs; the header names the reference's 1.0
        assert (config.data.train, config.data.valid) == (f"{folder}/train.txt", f"{folder}/valid.txt"), stage
        if "DELTA" in settings:
            assert config.icot_kd.delta == settings["DELTA"], (stage, "DELTA")
        if "MIXTURE_SIZE" in settings:
            assert config.icot_kd.mixture == "none", (stage, "MIXTURE_SIZE 1")
        if "TEACHER" in settings:   # checkpoint_0 of a one-epoch teacher is its final export
            assert checkpoint_choice(settings["TEACHER"]) == ExportChoice("epoch", configs["teacher"].train.epochs)
            assert config.inputs.teacher.export == ExportChoice("last"), stage
    coupling = configs["coupling"]
    for role, stage, variable in (("student", "mind_reading", "STUDENT"), ("emulator", "emulation", "EMULATOR")):
        choice = coupling.inputs.__dict__[role].export
        if names_checkpoints:
            wanted = checkpoint_choice(REFERENCE_COMMANDS["coupling"][variable])
            assert choice == wanted, (role, variable)
            assert wanted.number in configs[stage].train.export_epochs, (stage, "exports that epoch")
        else:
            assert choice == ExportChoice("last"), role
    assert coupling.data.test == f"{folder}/{REFERENCE_COMMANDS['generate']['test_path']}"
    text = Path(recipe).read_text()
    assert f"--exclude {folder}/valid.txt,{folder}/test_bigbench.txt" in text   # generated training data
    assert "train.grad_clip=1.0" in text and "train.precision=bf16" in text   # both choices documented


@pytest.mark.parametrize("name", sorted(GSM8K))
def test_gsm8k_recipes_keep_the_papers_settings(name):
    recipe = str(RECIPES / f"{name}.yaml")
    for spec in registry.plan(load_methods(recipe)):
        config = load_stage_config(spec.name, recipe)
        for key, value in REFERENCE_SCRIPTS.items():
            assert getattr(config.train, key) == value, (spec.name, key)
        assert config.train.lr == 5e-5 and config.train.batch_size == 32 and config.train.grad_clip == 0.0
        assert config.model.name_or_path == f"models/{GSM8K[name]}"
        assert config.data.test == "data/gsm8k/test.txt"
        if spec.method == "icot_kd":
            assert (config.icot_kd.mixture, config.icot_kd.freeze) == ("token", "student")


# The stepwise-internalization README's commands (da03/Internalize_CoT_Step_by_Step, README.md "Training"
# for 9x9 with GPT-2, and "Command for GSM8K" with Mistral-7B), one entry per exported variable. The
# 4x4 settings are the 9x9 ones (issue #7); 5x5, 7x7 and GPT-2 on GSM8K are not in the repository.
STEPWISE_COMMANDS = {
    "mult": {"MODEL": "gpt2", "EPOCHS": 200, "LR": 5e-5, "BSZ": 32, "ACCUMULATE": 1, "REMOVE_PER_EPOCH": 8,
             "REMOVE_ALL_WHEN_REMOVE_BEYOND": math.inf, "REMOVAL_SMOOTHING_LAMBDA": 4, "REMOVAL_SIDE": "left",
             "PRETRAIN_EPOCHS": 0, "SEED": 3456, "reset_optimizer": True, "bf16": False, "MAX_LEN_TRAIN": None},
    "gsm8k": {"MODEL": "Mistral-7B-v0.1", "EPOCHS": 80, "LR": 1e-5, "BSZ": 16, "ACCUMULATE": 2,
              "REMOVE_PER_EPOCH": 8, "REMOVE_ALL_WHEN_REMOVE_BEYOND": 39, "REMOVAL_SMOOTHING_LAMBDA": 4,
              "REMOVAL_SIDE": "left", "PRETRAIN_EPOCHS": 0, "SEED": 1234, "reset_optimizer": True, "bf16": True,
              "MAX_LEN_TRAIN": 150},
}
STEPWISE_RECIPES = {"stepwise_gpt2_small_4x4": "mult", "stepwise_gpt2_small_5x5": "mult",
                    "stepwise_gpt2_small_7x7": "mult", "stepwise_gpt2_small_9x9": "mult",
                    "stepwise_mistral_7b_gsm8k": "gsm8k"}


@pytest.mark.parametrize("name", sorted(STEPWISE_RECIPES))
def test_stepwise_recipes_follow_the_reference_commands(name):
    command = STEPWISE_COMMANDS[STEPWISE_RECIPES[name]]
    recipe = str(RECIPES / f"{name}.yaml")
    assert load_methods(recipe) == ["stepwise"]
    config = load_stage_config("stepwise", recipe)
    options = config.stepwise
    assert config.model.name_or_path == f"models/{command['MODEL']}"
    assert config.train.epochs == command["EPOCHS"] and config.train.max_steps is None
    assert config.train.lr == command["LR"]
    assert config.train.batch_size == command["BSZ"] * command["ACCUMULATE"]   # the global batch
    assert options.remove_per_epoch == command["REMOVE_PER_EPOCH"]
    threshold = command["REMOVE_ALL_WHEN_REMOVE_BEYOND"]
    assert (options.remove_all_beyond is None) == math.isinf(threshold)
    if not math.isinf(threshold):
        assert options.remove_all_beyond == threshold
    assert options.smoothing_lambda == command["REMOVAL_SMOOTHING_LAMBDA"] and options.side == command["REMOVAL_SIDE"]
    assert options.pretrain_epochs == command["PRETRAIN_EPOCHS"] and options.remove_start_from == 0
    assert config.train.seed == command["SEED"] and options.reset_optimizer is command["reset_optimizer"]
    assert config.train.precision == ("bf16" if command["bf16"] else "fp32")
    assert options.max_length == command["MAX_LEN_TRAIN"]
    # What train.py fixes: torch AdamW (weight decay 0.01), constant LR, no warmup, clipping at 1.0, a
    # validation each epoch; from the pretrained base model.
    assert (config.train.weight_decay, config.train.schedule, config.train.warmup_steps) == (0.01, "constant", 0)
    assert config.train.grad_clip == 1.0 and config.train.eval_each_epoch and options.start == "base"
    if STEPWISE_RECIPES[name] == "mult":
        digits = name.rsplit("_", 1)[1].split("x")[0]
        assert config.data.test == f"data/{digits}_by_{digits}_mult/test_bigbench.txt"


# The Coconut reference's GSM8K configs (facebookresearch/coconut args/gsm_cot.yaml, gsm_coconut.yaml):
# batch 32 per GPU on 4 GPUs, weight decay 0.01; the Coconut run resumes at epoch 3 of 25.
COCONUT_COT = {"lr": 1e-4, "batch": 128, "weight_decay": 0.01}
COCONUT = {"c_thought": 2, "epochs_per_stage": 3, "max_latent_stage": 3, "pad_latent_to_max": True,
           "uniform_prob": 0.0, "resume": 3, "num_epochs": 25, "lr": 1e-4, "reset_optimizer": True}
COCONUT_RECIPES = {"coconut_gpt2_gsm8k": ("gpt2", "fp32", 1e-4), "coconut_llama3_1b_gsm8k": ("Llama-3.2-1B", "bf16", 1e-5)}


@pytest.mark.parametrize("name", sorted(COCONUT_RECIPES))
def test_coconut_recipes_follow_the_reference_configs(name):
    model, precision, lr = COCONUT_RECIPES[name]
    recipe = str(RECIPES / f"{name}.yaml")
    assert load_methods(recipe) == ["coconut"]
    teacher, config = load_stage_config("teacher", recipe), load_stage_config("coconut", recipe)
    options = config.coconut
    assert config.model.name_or_path == teacher.model.name_or_path == f"models/{model}"
    assert (teacher.train.batch_size, teacher.train.weight_decay) == (COCONUT_COT["batch"], COCONUT_COT["weight_decay"])
    assert teacher.train.epochs == 6 and teacher.train.export_each_epoch   # the paper's CoT checkpoint
    assert options.start == "teacher" and config.inputs.start.export == ExportChoice("epoch", 6)
    assert options.thoughts_per_step == COCONUT["c_thought"] and options.epochs_per_stage == COCONUT["epochs_per_stage"]
    assert options.max_latent_stage == COCONUT["max_latent_stage"]
    assert options.pad_latent_to_max is COCONUT["pad_latent_to_max"] and options.uniform_prob == COCONUT["uniform_prob"]
    assert options.epoch_offset == COCONUT["resume"]
    assert config.train.epochs == COCONUT["num_epochs"] - COCONUT["resume"] and config.train.max_steps is None
    assert options.reset_optimizer == "epoch" and options.token_init == "copy" and options.init_token == "<<"
    assert config.train.lr == teacher.train.lr == lr and config.train.batch_size == 128
    assert config.train.weight_decay == 0.01 and config.train.precision == teacher.train.precision == precision
    # run.py: no schedule, warmup or clipping; validation each epoch; one step per equation.
    assert (config.train.schedule, config.train.warmup_steps, config.train.grad_clip) == ("constant", 0, 0.0)
    assert config.train.eval_each_epoch and config.data.steps == "auto"
    assert config.data.test == "data/gsm8k/test.txt"
    if precision == "bf16":
        assert config.train.zero_stage == 3 and config.model.gradient_checkpointing


# codi:scripts/train_gpt2_gsm8k-aug.sh:12-41 and train_llama1b_gsm8k-aug.sh:12-43 (METHODS.md 3.4).
CODI_SCRIPTS = {
    "codi_gpt2_gsm8k": {"model": "gpt2", "bs": 64, "ga": 2, "epochs": 40, "lr": 3e-3, "prj_dim": 768,
                        "distill_loss_factor": 1.0, "max_token_num": 1000},
    "codi_llama3_1b_gsm8k": {"model": "Llama-3.2-1B-Instruct", "bs": 32, "ga": 4, "epochs": 10, "lr": 8e-4,
                             "prj_dim": 2048, "distill_loss_factor": 20.0, "max_token_num": 200},
}


@pytest.mark.parametrize("name", sorted(CODI_SCRIPTS))
def test_codi_recipes_follow_the_reference_scripts(name):
    script = CODI_SCRIPTS[name]
    recipe = str(RECIPES / f"{name}.yaml")
    assert load_methods(recipe) == ["codi"]
    config = load_stage_config("codi", recipe)
    options, train = config.codi, config.train
    assert config.model.name_or_path == f"models/{script['model']}" and options.start == "base"
    assert train.batch_size == script["bs"] * script["ga"] == 128 and train.micro_batch_size == script["bs"]
    assert (train.epochs, train.lr, train.max_steps) == (script["epochs"], script["lr"], None)
    assert (train.schedule, train.warmup_ratio, train.warmup_steps) == ("cosine", 0.03, 0)
    assert (train.weight_decay, train.grad_clip, train.precision, train.seed) == (0.1, 2.0, "bf16", 11)
    assert (options.latents, options.projection_dim, options.projection_dropout) == (6, script["prj_dim"], 0.0)
    assert options.projection_norm and options.distill_div_std and options.distill_loss == "smooth_l1"
    assert (options.distill_weight, options.teacher_weight) == (script["distill_loss_factor"], 1.0)
    assert options.teacher_passes == 2 and not options.include_last_step and not options.reference_masking
    assert options.lora and (options.lora_r, options.lora_alpha, options.lora_dropout) == (128, 32, 0.1)
    assert options.lora_targets == []   # per family: GPT-2 c_attn, c_proj, c_fc; Llama q, k, v, o, up, down, gate
    assert config.data.max_length == script["max_token_num"] and config.data.test == "data/gsm8k/test.txt"
    if "llama" in name:
        assert train.zero_stage == 3
    else:
        assert config.model.dropout == 0.1   # GPT-2's dropout as loaded by the reference
    for shared in ("teacher", "no_cot"):   # a full fine-tune's settings, not the adapters'
        stage = load_stage_config(shared, recipe)
        assert stage.train.lr < 1e-3 and stage.train.schedule == "constant"


# --------------------------------------------------------------------------------------------------
# Bai et al. 2025 (arXiv 2510.00184): the from-scratch 4x4 reproduction and its shortened variant.


def test_bai_reproduction_is_their_model_from_scratch_with_the_reference_schedule():
    recipe = str(RECIPES / "stepwise_bai_4x4.yaml")
    assert load_methods(recipe) == ["stepwise"]
    plan = [spec.name for spec in registry.plan(load_methods(recipe))]
    assert "no_cot" in plan and "stepwise" in plan   # the fine-tuning baseline beside it
    stepwise, no_cot = load_stage_config("stepwise", recipe), load_stage_config("no_cot", recipe)
    for config in (stepwise, no_cot):
        model = config.model
        # ajyl/icot ckpts/2L4H/config.json: GPT-2, 2 layers, 4 heads, 768 wide, dropout 0.1; from scratch.
        assert (model.family, model.layers, model.heads, model.hidden, model.dropout) == ("gpt2", 2, 4, 768, 0.1)
        assert model.name_or_path is None and model.tokenizer == "data/4_by_4_mult/tokenizer"
        assert config.data.test == "data/4_by_4_mult/test_bigbench.txt"
    options, train = stepwise.stepwise, stepwise.train
    # ICoT-SI's README schedule for multiplication (4x4 as 9x9, issue #7).
    assert (options.start, options.remove_per_epoch, options.smoothing_lambda, options.side) == ("base", 8, 4, "left")
    assert (options.pretrain_epochs, options.reset_optimizer, options.remove_all_beyond) == (0, True, None)
    assert options.steps_per_token == [] and options.advance_at_loss is None and not options.keep_position
    assert (train.lr, train.batch_size, train.schedule, train.epochs, train.precision) == (5e-5, 32, "constant", 200, "fp32")
    assert (train.grad_clip, train.seed, train.max_steps) == (1.0, 3456, None)
    assert no_cot.train.epochs == train.epochs   # the baseline trains as long


def test_bai_short_variant_keeps_the_model_and_fits_ten_minutes_of_steps():
    full, short = str(RECIPES / "stepwise_bai_4x4.yaml"), str(RECIPES / "stepwise_bai_4x4_short.yaml")
    stages = {name: load_stage_config(name, short) for name in ("teacher", "no_cot", "stepwise")}
    reference = load_stage_config("stepwise", full).model
    for config in stages.values():
        model = config.model
        assert (model.family, model.layers, model.heads, model.hidden) == (reference.family, reference.layers,
                                                                          reference.heads, reference.hidden)
        assert model.name_or_path is None and config.train.precision == "bf16"
    options = stages["stepwise"].stepwise
    assert options.start == "teacher" and options.advance_at_loss == 0.05
    # Every one of the 46 CoT tokens of 4x4 goes within the stage's steps, with room for the final decay.
    assert 46 * options.steps_per_token[0] < stages["stepwise"].train.max_steps
    steps = sum(config.train.max_steps for config in stages.values())
    # The header's size: 32,000 steps; at the ~7.5 ms a step it estimates, under 10 minutes with the eval.
    assert steps == 32_000 and steps * 7.5e-3 < 6 * 60
    assert stages["no_cot"].train.max_steps >= stages["stepwise"].train.max_steps + stages["teacher"].train.max_steps


# SIM-CoT's forks (InternLM/SIM-CoT; METHODS.md 4.4): its Coconut fork's args/gsm_cot.yaml:16-43,
# gsm_coconut.yaml:16-44 and gsm_simcot.yaml:13-47 (batch per GPU x accumulation x 8 GPUs; `checkpoint_N` is
# saved after N epochs), and its CODI fork's scripts/train_llama1b_gsm8k-aug-decoder.sh:7-44.
SIMCOT_COCONUT = {"cot": {"lr": 1e-4, "weight_decay": 0.01, "batch": 16 * 1 * 8, "checkpoint": 20},
                  "coconut": {"num_epochs": 25, "batch": 8 * 2 * 8},
                  "simcot": {"num_epochs": 35, "batch": 8 * 1 * 8, "seed": 0},
                  "both": {"c_thought": 2, "epochs_per_stage": 3, "max_latent_stage": 5, "pad_latent_to_max": True,
                           "uniform_prob": 0.0, "resume": 3, "lr": 1e-4, "weight_decay": 0.01, "bf16": False}}
SIMCOT_CODI = {"model": "Llama-3.2-1B-Instruct", "bs": 64, "ga": 2, "epochs": 10, "lr": 8e-4, "max_grad_norm": 2.0,
               "lora_r": 128, "lora_alpha": 32, "weight_decay": 0.1, "warmup_ratio": 0.03, "num_latent": 6,
               "prj_dim": 2048, "prj_dropout": 0.0, "distill_loss_factor": 20.0, "max_token_num": 200, "seed": 11}


def test_the_coconut_simcot_recipe_follows_the_forks_configs():
    recipe = str(RECIPES / "coconut_simcot_gpt2_gsm8k.yaml")
    assert load_methods(recipe) == ["coconut", "coconut_simcot"]
    teacher = load_stage_config("teacher", recipe)
    cot = SIMCOT_COCONUT["cot"]
    assert (teacher.train.lr, teacher.train.weight_decay, teacher.train.batch_size) == (cot["lr"], cot["weight_decay"],
                                                                                        cot["batch"])
    assert teacher.train.export_each_epoch and teacher.train.epochs >= cot["checkpoint"]
    both = SIMCOT_COCONUT["both"]
    for stage, run in (("coconut", "coconut"), ("coconut_simcot", "simcot")):
        config = load_stage_config(stage, recipe)
        options, train = config.coconut, config.train
        assert config.model.name_or_path == "models/gpt2" and options.start == "teacher"
        assert config.inputs.start.export == ExportChoice("epoch", cot["checkpoint"])
        assert (options.thoughts_per_step, options.epochs_per_stage, options.max_latent_stage) == (
            both["c_thought"], both["epochs_per_stage"], both["max_latent_stage"])
        assert options.pad_latent_to_max is both["pad_latent_to_max"] and options.uniform_prob == both["uniform_prob"]
        assert options.epoch_offset == both["resume"] and options.reset_optimizer == "epoch"
        assert train.epochs == SIMCOT_COCONUT[run]["num_epochs"] - both["resume"] and train.max_steps is None
        assert train.batch_size == SIMCOT_COCONUT[run]["batch"]
        assert (train.lr, train.weight_decay, train.precision) == (both["lr"], both["weight_decay"], "fp32")
        assert (train.schedule, train.warmup_steps, train.grad_clip) == ("constant", 0, 0.0)
        assert config.data.steps == "auto" and config.data.test == "data/gsm8k/test.txt"
    simcot = load_stage_config("coconut_simcot", recipe)
    assert simcot.train.seed == SIMCOT_COCONUT["simcot"]["seed"]
    # coconut.py:782-793, run.py:120-122: weight 1.0, a fresh pretrained decoder in eval mode, a sum per row.
    options = simcot.coconut_simcot
    assert (options.weight, options.decoder_start, options.decoder_dropout, options.reduction) == (1.0, "base", 0.0,
                                                                                                   "row")
    assert "--inputs.start.dir=runs/coconut_simcot_gpt2_gsm8k/coconut" in Path(recipe).read_text()


def test_the_codi_simcot_recipe_follows_the_forks_script():
    recipe = str(RECIPES / "codi_simcot_llama3_1b_gsm8k.yaml")
    assert load_methods(recipe) == ["codi", "codi_simcot"]
    script = SIMCOT_CODI
    config = load_stage_config("codi_simcot", recipe)
    options, train = config.codi, config.train
    assert config.model.name_or_path == f"models/{script['model']}" and options.start == "base"
    assert train.batch_size == script["bs"] * script["ga"] and train.micro_batch_size == script["bs"]
    assert (train.epochs, train.lr, train.max_steps, train.seed) == (script["epochs"], script["lr"], None, script["seed"])
    assert (train.schedule, train.warmup_ratio, train.weight_decay, train.grad_clip) == (
        "cosine", script["warmup_ratio"], script["weight_decay"], script["max_grad_norm"])
    assert train.precision == "bf16" and train.zero_stage == 3
    assert (options.latents, options.projection_dim, options.projection_dropout) == (
        script["num_latent"], script["prj_dim"], script["prj_dropout"])
    assert (options.lora_r, options.lora_alpha, options.lora_dropout) == (script["lora_r"], script["lora_alpha"], 0.1)
    assert options.distill_weight == script["distill_loss_factor"] and options.distill_div_std
    assert not options.include_last_step and config.data.max_length == script["max_token_num"]
    # model.py:116, 326-334, 734-748: explain_loss_factor 1.0, a fresh copy of the model, a token mean per slot;
    # the fork's cut of the targets to the first row is an option, off (the paper's intent).
    supervision = config.codi_simcot
    assert (supervision.weight, supervision.decoder_start, supervision.reduction) == (1.0, "base", "token")
    assert not supervision.truncate_to_first_row and "truncate_to_first_row: true" in Path(recipe).read_text()
    # The CODI row beside it: CODI's own script's 32 x 4, the same global batch.
    codi = load_stage_config("codi", recipe)
    assert (codi.train.batch_size, codi.train.micro_batch_size) == (128, 32) and codi.codi == options


def test_the_simcot_cpu_recipe_runs_each_method_beside_its_plain_one():
    recipe = str(RECIPES / "demo_simcot.yaml")
    assert load_methods(recipe) == ["coconut", "coconut_simcot", "codi", "codi_simcot"]
    assert registry.get_method("coconut_simcot").demo == registry.get_method("codi_simcot").demo == "demo_simcot.yaml"
    for plain in ("coconut", "codi"):
        ours, theirs = load_stage_config(f"{plain}_simcot", recipe), load_stage_config(plain, recipe)
        assert getattr(ours, plain) == getattr(theirs, plain) and ours.train == theirs.train
