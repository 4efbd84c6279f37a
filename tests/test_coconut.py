"""Coconut (continuous thoughts) against the reference code's rules (METHODS.md section 2).

- Steps: the data layer's step starts split GSM8K-Aug CoTs into `<<...>>` equations and multiplication
  CoTs into partial products through their `+`, for every tokenizer kind.
- A hand-built stage-k sequence (tokens, labels, positions, the left padding that aligns the first
  thoughts) equals the collated batch, at every stage, past max_latent_stage with and without
  pad_latent_to_max.
- The multi-pass forward's logits (with the KV cache, and recomputing the prefix as under activation
  checkpointing) equal a single forward whose input embeddings are set by hand to the fed-back states,
  and so do the gradients (the thoughts are not detached); GPT-2 and Llama.
- Batched decoding with the KV cache gives the answers of the reference's batch-1 decoding without one.
- The curriculum: the stage of each epoch, the optimizer resets (every epoch or every stage), the uniform
  stage draws; a run stopped by SIGTERM across a stage change resumes with the same losses.
- The new tokens' rows copy the init token's (or keep transformers' resize, the historical behaviour).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.register_assert_rewrite("tests.train_fixtures")
pytest_plugins = ["tests.train_fixtures"]

from icot.config import load_stage_config  # noqa: E402
from icot.data.collate import IGNORE_INDEX  # noqa: E402
from icot.errors import UserError  # noqa: E402
from icot.data.steps import step_char_starts  # noqa: E402
from icot.data.views import encode_batch, prefix_token_starts, with_cot_text  # noqa: E402
from icot.methods.coconut import CoconutConfig  # noqa: E402
from icot.methods.coconut.schedule import CoconutSchedule  # noqa: E402
from icot.data.collate import collate_generate  # noqa: E402
from icot.data.collate import collate_thoughts  # noqa: E402
from icot.methods.coconut.sequences import (ThoughtTokens, add_thought_tokens,  # noqa: E402
                                            stage_sequence, with_thoughts)
from icot.models.generation import generate_with_thoughts, reference_thought_decode  # noqa: E402
from icot.models.thoughts import thought_forward  # noqa: E402
from icot.stage import StepContext  # noqa: E402
from tests import tokenizer_fixtures as fixtures  # noqa: E402
from tests.model_helpers import SEP, VOCAB, tiny_gpt2, tiny_llama  # noqa: E402
from tests.train_fixtures import (icot_env, launch_and_signal, make_workspace, read_scalars, run_train,  # noqa: E402
                                  stage_folder_problems, write_recipe)

MULTIPLICATION = fixtures.MULTIPLICATION_LINES[0]   # 4 partial products
GSM8K = fixtures.GSM8K_LINES[1]                     # 3 equations


# --------------------------------------------------------------------------------------------------
# Steps.


def test_step_rules_split_equations_and_partial_products():
    cot = "1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 2 1"
    starts = step_char_starts(cot, "plus")
    assert [cot[a:b].strip() for a, b in zip(starts, starts[1:] + [len(cot)])] == [
        "1 7 4 3 3 +", "0 6 7 8 4 1 ( 1 3 2 2 8 1 ) +", "0 0 2 1"]
    assert step_char_starts(cot) == starts   # auto: no `<<`, so partial products
    equations = "<<12*15=180>> <<180-30=150>>"
    assert step_char_starts(equations) == step_char_starts(equations, "equations") == [0, 14]
    assert step_char_starts("") == [] and step_char_starts("7 4", "plus") == [0]
    columns = "05 051 067 78"   # the columns layout: one column sum a word, no `+`
    assert step_char_starts(columns) == step_char_starts(columns, "words") == [0, 3, 7, 11]


@pytest.mark.parametrize("kind", fixtures.TOKENIZER_KINDS)
def test_step_starts_mark_each_step_in_tokens(kind):
    tokenizer = fixtures.build(kind, fixtures.line_segments(fixtures.SAMPLE_LINES))
    lines = [MULTIPLICATION, GSM8K]
    questions, cots, answers = zip(*map(fixtures.split_line, lines))
    encoded = encode_batch(tokenizer, questions, cots, answers)
    for cot, ids, prompt_len, starts in zip(cots, encoded["cot_ids"], encoded["prompt_len"], encoded["step_starts"]):
        end = ids.index(tokenizer.eos_token_id, prompt_len) - prompt_len
        bounds = starts + [end]
        got = [tokenizer.decode(ids[prompt_len + a:prompt_len + b]).strip() for a, b in zip(bounds, bounds[1:])]
        chars = step_char_starts(cot)
        want = [cot[a:b].strip() for a, b in zip(chars, chars[1:] + [len(cot)])]
        assert [re.sub(r"\s+", "", s) for s in got] == [re.sub(r"\s+", "", s) for s in want]
    # A tokenizer without offsets (a slow one) finds the same starts from the tokens before each step.
    for question, cot, answer, ids, prompt_len, starts in zip(questions, cots, answers, encoded["cot_ids"],
                                                             encoded["prompt_len"], encoded["step_starts"]):
        text = with_cot_text(question, cot, answer, tokenizer.eos_token)
        chars = [len(f" {question} {tokenizer.eos_token} ") + c for c in step_char_starts(cot)]
        end = ids.index(tokenizer.eos_token_id, prompt_len)
        assert prefix_token_starts(tokenizer, ids, text, chars, prompt_len, end) == starts


# --------------------------------------------------------------------------------------------------
# Sequences.


@pytest.fixture(scope="module")
def word():
    tokenizer = fixtures.build("word", fixtures.line_segments(fixtures.SAMPLE_LINES))
    tokens = add_thought_tokens(tokenizer)
    questions, cots, answers = zip(*map(fixtures.split_line, [MULTIPLICATION, GSM8K]))
    encoded = encode_batch(tokenizer, questions, cots, answers)
    features = [dict(zip(encoded, values)) for values in zip(*encoded.values())]
    return tokenizer, tokens, features, [fixtures.split_line(line) for line in (MULTIPLICATION, GSM8K)]


def hand_sequence(tokenizer, tokens: ThoughtTokens, question, steps, answer, skipped, thoughts):
    """The stage sequence written out from text: word-level tokenization is per word."""
    sep = tokenizer.eos_token
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]   # noqa: E731
    head = encode(f" {question} {sep}") + [tokens.start] + [tokens.latent] * thoughts + [tokens.end]
    return head, encode(" " + " ".join(steps[skipped:] + [sep, "####", answer, sep]))


@pytest.mark.parametrize("stage,pad", [(0, True), (1, True), (2, True), (3, True), (4, True), (4, False)])
def test_a_hand_built_stage_sequence_equals_the_collated_batch(word, stage, pad):
    tokenizer, tokens, features, texts = word
    options = CoconutConfig(thoughts_per_step=2, max_latent_stage=3, pad_latent_to_max=pad)
    sequences, label_starts, hands = [], [], []
    for feature, (question, cot, answer) in zip(features, texts):
        steps = fixtures.split_steps(cot)
        if stage > options.max_latent_stage:   # everything removed; max x c thoughts, or as the steps allow
            skipped, thoughts = len(steps), 2 * (3 if pad else min(len(steps), 3))
        else:                                  # k steps skipped, k x c thoughts (even beyond the steps)
            skipped, thoughts = min(stage, len(steps)), 2 * stage
        head, rest = hand_sequence(tokenizer, tokens, question, steps, answer, skipped, thoughts)
        ids, label_start = stage_sequence(feature, stage, options, tokens)
        assert (ids, label_start) == (head + rest, len(head))
        sequences.append(ids)
        label_starts.append(label_start)
        hands.append((head, rest, thoughts))
    batch = collate_thoughts(sequences, label_starts, tokens.latent, SEP)
    firsts = [head.index(tokens.start) + 1 for head, _, _ in hands]
    column = max(firsts)   # rows with thoughts are left-padded so that their first thoughts align
    lefts = [column - first if thoughts else 0 for first, (_, _, thoughts) in zip(firsts, hands)]
    width = max(left + len(head) + len(rest) for left, (head, rest, _) in zip(lefts, hands))
    for row, (left, (head, rest, _)) in enumerate(zip(lefts, hands)):
        right = width - left - len(head) - len(rest)
        assert batch["input_ids"][row].tolist() == [SEP] * left + head + rest + [SEP] * right
        assert batch["attention_mask"][row].tolist() == [0] * left + [1] * (len(head) + len(rest)) + [0] * right
        assert batch["position_ids"][row].tolist() == [0] * left + list(range(len(head) + len(rest))) + [0] * right
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] * (left + len(head)) + rest + [IGNORE_INDEX] * right
    if stage > 0:   # the first thoughts share a column
        assert len({row.tolist().index(tokens.latent) for row in batch["input_ids"]}) == 1


# --------------------------------------------------------------------------------------------------
# The multi-pass forward and decoding.

LATENT = VOCAB - 1


def hand_thought_logits(model, ids, mask, positions):
    """Thought by thought, a full forward without a cache decides the next thought's embedding; the
    logits are those of one forward over the embeddings so set."""
    embeds = model.get_input_embeddings()(ids)
    for column in range(ids.size(1)):
        rows = ids[:, column] == LATENT
        if rows.any():
            hidden = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                           output_hidden_states=True).hidden_states[-1]
            embeds = embeds.clone()
            embeds[rows, column] = hidden[rows, column - 1]
    return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits


def thought_batch():
    # Row 0: left-padded, 3 thoughts; row 1: 2 thoughts, right-padded (a row with fewer thoughts holds
    # ordinary tokens in the third thought column).
    ids = torch.tensor([[SEP, 5, 6, 7, 8, LATENT, LATENT, LATENT, 9, 10, 11, 12],
                        [3, 3, 5, 6, 8, LATENT, LATENT, 9, 10, 11, SEP, SEP]])
    mask = torch.tensor([[0] + [1] * 11, [1] * 10 + [0, 0]])
    positions = torch.tensor([[0] + list(range(11)), list(range(10)) + [0, 0]])
    return ids, mask, positions


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_multi_pass_logits_and_gradients_equal_a_forward_with_hand_set_embeddings(family, use_cache):
    model = (tiny_gpt2 if family == "gpt2" else tiny_llama)()
    ids, mask, positions = thought_batch()
    want = hand_thought_logits(model, ids, mask, positions)
    real = mask.bool()
    for passes in (None, 5):   # 5: more one-column passes than thoughts (what a rank with fewer runs)
        got = thought_forward(model, ids, mask, positions, LATENT, passes=passes, use_cache=use_cache)
        assert (got.logits - want)[real].abs().max() < 1e-5
    # Gradients: the thoughts stay in the graph, so the embedding rows of the tokens before them get the
    # gradient through every thought.
    weight = model.get_input_embeddings().weight
    hand_grad = torch.autograd.grad(want[real].pow(2).sum(), weight)[0]
    got = thought_forward(model, ids, mask, positions, LATENT, use_cache=use_cache).logits
    grad = torch.autograd.grad(got[real].pow(2).sum(), weight)[0]
    assert (grad - hand_grad).abs().max() < 1e-4 * hand_grad.abs().max()


def test_activation_checkpointing_trains_without_the_cache_and_gives_the_same_logits():
    from icot.models.decoder import set_gradient_checkpointing
    from icot.models.thoughts import checkpointing_in_training

    model = tiny_gpt2()
    ids, mask, positions = thought_batch()
    want = hand_thought_logits(model, ids, mask, positions)
    set_gradient_checkpointing(model, True)
    model.train()
    assert checkpointing_in_training(model)
    got = thought_forward(model, ids, mask, positions, LATENT)
    assert got.cache is None and (got.logits - want)[mask.bool()].abs().max() < 1e-5


def test_batched_decoding_with_the_cache_equals_the_reference_batch1_decoding():
    tokens = ThoughtTokens(start=VOCAB - 3, end=VOCAB - 2, latent=LATENT)
    torch.manual_seed(3)
    prompts = [[int(t) for t in torch.randint(1, VOCAB - 3, (length,))] + [SEP] for length in (3, 7, 5, 4)]
    features = [{"nocot_ids": prompt + [5, SEP], "prompt_len": len(prompt)} for prompt in prompts]
    for family in ("gpt2", "llama"):
        model = (tiny_gpt2 if family == "gpt2" else tiny_llama)(seed=4)
        batch = with_thoughts(collate_generate(features, SEP), 4, tokens)
        batched = generate_with_thoughts(model, batch, LATENT, SEP, 2, 12)
        inputs = [prompt + [tokens.start] + [LATENT] * 4 + [tokens.end] for prompt in prompts]
        alone = [reference_thought_decode(model, ids, LATENT, SEP, 2, 12) for ids in inputs]
        assert batched == alone
        assert any(len(row) > 1 for row in batched)


# --------------------------------------------------------------------------------------------------
# The curriculum.


def run_schedule(options: CoconutConfig, epochs: int, steps_per_epoch: int = 3):
    schedule = CoconutSchedule(options, seed=1)
    out = []
    for step in range(epochs * steps_per_epoch):
        update = schedule.advance(StepContext(step, step // steps_per_epoch, steps_per_epoch, np.arange(4)))
        out.append((schedule.stage, update.reset_optimizer))
    return out


def test_stages_follow_epochs_and_the_optimizer_resets_by_the_chosen_rule():
    # The reference's GSM8K run: 3 epochs a stage, resumed at epoch 3 (so stage 1 first).
    got = run_schedule(CoconutConfig(epochs_per_stage=3, epoch_offset=3), 7, 3)
    assert [stage for stage, _ in got[::3]] == [1, 1, 1, 2, 2, 2, 3]
    assert [step for step, (_, reset) in enumerate(got) if reset] == [3, 6, 9, 12, 15, 18]   # every epoch
    by_stage = run_schedule(CoconutConfig(epochs_per_stage=3, epoch_offset=3, reset_optimizer="stage"), 7, 3)
    assert [step for step, (_, reset) in enumerate(by_stage) if reset] == [9, 18]
    assert not any(reset for _, reset in run_schedule(CoconutConfig(reset_optimizer="never"), 4))


def test_steps_per_stage_paces_the_stages_in_steps_and_the_decay_starts_when_every_step_is_latent():
    # From stage 1 (epoch_offset 1 at 1 epoch a stage): 2 steps, then 3, then 1 a stage; epochs of 4 steps
    # play no part. Stage 3 > max_latent_stage 2 starts at step 5; the decay reaches 0 at step 10.
    options = CoconutConfig(epochs_per_stage=1, epoch_offset=1, steps_per_stage=[2, 3, 1], max_latent_stage=2,
                            reset_optimizer="stage", final_decay="linear")
    schedule = CoconutSchedule(options, seed=1)
    updates, stages = [], []
    for step in range(8):
        updates.append(schedule.advance(StepContext(step, step // 4, 4, np.arange(4), total_steps=10)))
        stages.append(schedule.stage)
    assert stages == [1, 1, 2, 2, 2, 3, 4, 5]
    # Logged as the sequences trained on: past max_latent_stage every stage trains on the same.
    assert [int(u.scalars["coconut_stage"]) for u in updates] == [1, 1, 2, 2, 2, 3, 3, 3]
    assert [step for step, u in enumerate(updates) if u.reset_optimizer] == [2, 5, 6, 7]   # at each stage change
    assert [u.lr_scale for u in updates] == pytest.approx([1] * 5 + [1, 0.8, 0.6])
    resumed = CoconutSchedule(options, seed=1)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.advance(StepContext(8, 2, 4, np.arange(4), total_steps=10)).lr_scale == pytest.approx(0.4)
    # Without steps_per_stage the epochs pace it, and the rate stays the schedule's by default.
    plain = run_schedule(CoconutConfig(epochs_per_stage=2), 4, 3)
    assert [stage for stage, _ in plain] == [0] * 6 + [1] * 6
    with pytest.raises(UserError, match="coconut.steps_per_stage: expected optimizer steps of at least 1"):
        load_stage_config("coconut", None, ["--coconut.steps_per_stage=0"])


def test_uniform_stage_draws_are_the_same_for_an_example_wherever_it_is_drawn():
    options = CoconutConfig(uniform_prob=0.5)
    schedule = CoconutSchedule(options, seed=1)
    schedule.advance(StepContext(0, 0, 3, np.arange(4)))
    feature = {"step_starts": [0, 4, 9, 15]}
    draws = [schedule.example_stage(dict(feature, index=i)) for i in range(200)]
    assert 0.3 < np.mean([d != 0 for d in draws]) < 0.5   # p x 4/5: a draw moves off stage 0
    assert set(draws) <= set(range(5))
    again = CoconutSchedule(options, seed=1)
    again.load_state_dict(schedule.state_dict())
    assert [again.example_stage(dict(feature, index=i)) for i in range(200)] == draws
    assert schedule.example_stage(feature) == schedule.stage   # validation: the scheduled stage


# --------------------------------------------------------------------------------------------------
# The new tokens' rows.


def test_new_token_rows_copy_the_init_token_or_keep_the_resize():
    from icot.models.thoughts import grown
    from icot.models.thoughts import copy_token_rows

    for family in ("gpt2", "llama"):   # GPT-2 ties its head to the embedding, this Llama does not
        model = grown((tiny_gpt2 if family == "gpt2" else tiny_llama)(), VOCAB + 3)
        tables = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
        assert all(table.shape[0] == VOCAB + 3 for table in tables)
        resized = [table[VOCAB:].clone() for table in tables]
        assert not torch.equal(resized[0][0], tables[0][7])   # transformers' resize: not a copy of any row
        copy_token_rows(model, [VOCAB, VOCAB + 1, VOCAB + 2], 7)
        for table in tables:
            assert all(torch.equal(table[VOCAB + i], table[7]) for i in range(3))
        assert grown(model, VOCAB).get_input_embeddings().weight.shape[0] == VOCAB + 3   # never shrinks


# --------------------------------------------------------------------------------------------------
# Training runs: 3x3 multiplication (3 steps), one thought a step, one epoch (8 steps) a stage from
# stage 1 (epoch_offset 1): stages 1, 2 and then 3 > max_latent_stage 2, where every step is latent.

CURRICULUM = {"thoughts_per_step": 1, "epochs_per_stage": 1, "max_latent_stage": 2, "epoch_offset": 1,
              "init_token": "+"}
TAGS = ("train/loss", "train/grad_norm", "train/coconut_stage", "valid/loss", "valid/token_accuracy")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    folder = make_workspace(tmp_path_factory.mktemp("coconut"), train=128, valid=8, test=9)
    write_recipe(folder, methods=["coconut"], coconut=CURRICULUM,
                 train={"max_steps": 24, "save_every": 4, "eval_each_epoch": True, "export_best": True})
    run_train(folder, "teacher", folder / "recipe.yaml")
    return folder


@pytest.fixture(scope="module")
def straight(ws) -> dict:
    run_train(ws, "coconut", ws / "recipe.yaml", "--run_dir=straight", f"--inputs.start.dir={ws / 'run/teacher'}")
    return read_scalars(ws / "straight/coconut/tb")


def test_a_coconut_run_walks_its_stages_exports_and_evaluates(ws, straight):
    root = ws / "straight/coconut"
    assert stage_folder_problems(root, "coconut") == []
    stages = dict(straight["train/coconut_stage"])
    assert [stages[s] for s in (1, 8, 9, 16, 17, 24)] == [1, 1, 2, 2, 3, 3]
    index = json.loads((root / "exports.json").read_text())
    best = [entry for entry in index if entry["name"] == "best"]
    assert best and best[0]["step"] == 24   # only once every step is latent
    description = json.loads((root / "export/icot_component.json").read_text())
    assert description["coconut"] == {"thoughts": 2, "stage": 3,
                                      "tokens": ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]}
    from icot.data.tokenizer_build import load_tokenizer

    tokenizer = load_tokenizer(root / "export", "the export")
    assert ThoughtTokens.of(tokenizer).latent == len(tokenizer) - 1
    config = json.loads((root / "export/config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)
    evaluated = subprocess.run([sys.executable, "-m", "icot", "eval", "--mode", "coconut", "--run_dir", "straight",
                                "--data", "data/test.txt", "--out", "eval.json"], cwd=ws, env=icot_env(),
                               capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads((ws / "eval.json").read_text())
    assert result["examples"] == 9 and result["mode"] == "coconut" and 0 < result["token_accuracy"] <= 1
    assert set(result["examples_per_s_by_batch_size"]) == {"1", "32"}


def test_a_stop_across_a_stage_change_resumes_with_the_same_losses(ws, straight):
    overrides = ["--run_dir=stopped", f"--inputs.start.dir={ws / 'run/teacher'}"]
    code, _ = launch_and_signal(ws, "coconut", ws / "recipe.yaml", *overrides, sig=signal.SIGTERM, at_step=5,
                                log_name="stopped")
    assert code == 0
    stopped = int((ws / "stopped/coconut/PREEMPTED").read_text().split()[1])
    assert 5 <= stopped < 17   # the resumed run changes stage at least once (stage 3 from step 17)
    run_train(ws, "coconut", ws / "recipe.yaml", *overrides)
    got = read_scalars(ws / "stopped/coconut/tb")
    for tag in TAGS:
        assert got[tag] == straight[tag], tag


def test_zero3_bf16_activation_checkpointing_on_two_ranks_with_stage_mixing(ws):
    overrides = ["--run_dir=zero3", f"--inputs.start.dir={ws / 'run/teacher'}", "--train.zero_stage=3",
                 "--train.precision=bf16", "--model.gradient_checkpointing=true", "--train.max_steps=10",
                 "--coconut.uniform_prob=0.5"]
    run_train(ws, "coconut", ws / "recipe.yaml", *overrides, nproc=2)
    root = ws / "zero3/coconut"
    assert stage_folder_problems(root, "coconut") == []
    ds_config = json.loads((root / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 3 and ds_config["bf16"] == {"enabled": True}
    got = read_scalars(root / "tb")
    assert [stage for _, stage in got["train/coconut_stage"]] == [1.0] * 8 + [2.0] * 2
    assert all(np.isfinite(value) for _, value in got["train/loss"])
    from safetensors.torch import load_file

    weights = load_file(root / "export/model.safetensors")
    table = weights["transformer.wte.weight"]
    assert table.shape[0] == json.loads((root / "export/config.json").read_text())["vocab_size"]


def test_a_llama_from_scratch_trains_from_stage_0_and_exports_what_transformers_loads(ws):
    overrides = ["--run_dir=llama", "--coconut.start=base", "--model.family=llama", "--coconut.epoch_offset=0",
                 "--train.max_steps=10", "--coconut.reset_optimizer=stage"]
    run_train(ws, "coconut", ws / "recipe.yaml", *overrides)
    root = ws / "llama/coconut"
    assert stage_folder_problems(root, "coconut") == []
    got = read_scalars(root / "tb")
    assert [stage for _, stage in got["train/coconut_stage"]] == [0.0] * 8 + [1.0] * 2   # stage 0: CoT in the run
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "export", local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.get_input_embeddings().weight.shape[0] == json.loads((root / "export/config.json").read_text())["vocab_size"]
