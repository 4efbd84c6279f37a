"""Stepwise internalization (ICoT-SI) against the reference code's rules (METHODS.md section 1.2).

- The schedule, step by step, equals a hand derivation of train.py:242-270 for given steps per epoch
  and settings: the count rises by one every round(steps per epoch / remove_per_epoch) steps, not
  during pretrain epochs, becomes "everything" beyond the threshold; the optimizer is reset at each
  increment unless the previous batch had no CoT left.
- The offset distribution is P(k) = (1 - e^-lambda) e^(-lambda k) (P(0) = .9817, P(1) = .0180 at
  lambda 4, the rest on k = 99); offsets are the same for an example whatever the batch it is in.
- Removed-CoT batches equal hand-built sequences (ids, labels, separators), left and right.
- A run stopped in the middle of the removal resumes bitwise, on one rank; two ranks remove what one
  removes, step by step.
- `icot compare` on a tiny config lists the stepwise and Coconut modes beside ICoT-KD's and the baselines.
"""

from __future__ import annotations

import json
import math
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

from icot.config import load_stage_config, stage_config  # noqa: E402
from icot.errors import UserError  # noqa: E402
from icot.data.collate import IGNORE_INDEX  # noqa: E402
from icot.methods.stepwise import StepwiseConfig  # noqa: E402
from icot.methods.stepwise.schedule import RemovalSchedule, offset_distribution, remove_cot  # noqa: E402
from icot.stage import StepContext  # noqa: E402
from tests.train_fixtures import (icot_env, launch_and_signal, make_workspace, read_scalars, run_train,  # noqa: E402
                                  stage_folder_problems, write_recipe)

SEP = 0


def run_schedule(options: StepwiseConfig, steps: int, steps_per_epoch: int, cot_lengths: dict[int, int] | None = None):
    """(scheduled count, reset) at every step, over batches of examples 0..3."""
    schedule = RemovalSchedule(options, seed=1)
    lengths = np.array([10**6] * 4) if cot_lengths is None else np.array([cot_lengths[i] for i in range(4)])
    out = []
    for step in range(steps):
        update, _ = schedule.advance(StepContext(step, step // steps_per_epoch, steps_per_epoch, np.arange(4)),
                                     lengths)
        out.append((schedule.scheduled, update.reset_optimizer))
    return out


def test_the_schedule_rises_linearly_within_epochs():
    # 10 steps an epoch, 4 tokens an epoch: one every round(2.5) = 2 steps (Python rounds half to even,
    # as the reference does). The counter reaches 2 at step 2, 4, 6, ...
    got = run_schedule(StepwiseConfig(remove_per_epoch=4, smoothing_lambda=math.inf), 12, 10)
    assert [s for s, _ in got] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [r for _, r in got] == [s in (2, 4, 6, 8, 10) for s in range(12)]   # a reset at each increment
    # 9 tokens an epoch of 10 steps: one every step (round(1.1) = 1) from step 1 on.
    assert [s for s, _ in run_schedule(StepwiseConfig(remove_per_epoch=9, smoothing_lambda=math.inf), 5, 10)] == \
        [0, 1, 2, 3, 4]


def test_steps_per_token_paces_each_removal_level_and_the_last_repeats():
    # 2 steps with nothing removed, 3 with one token, then 1 a token: epochs play no part.
    options = StepwiseConfig(steps_per_token=[2, 3, 1], smoothing_lambda=math.inf, reset_optimizer=False)
    got = [s for s, _ in run_schedule(options, 9, 4)]
    assert got == [0, 0, 1, 1, 1, 2, 3, 4, 5]
    # One number is the reference's pace without the rounding: 89 steps a token whatever the epoch.
    single = [s for s, _ in run_schedule(StepwiseConfig(steps_per_token=[89], smoothing_lambda=math.inf), 270, 1250)]
    assert [single.index(k) for k in (1, 2, 3)] == [89, 178, 267]
    with pytest.raises(UserError, match=r"command line: --stepwise.steps_per_token: expected optimizer steps of at least 1"):
        load_stage_config("stepwise", None, ["--stepwise.steps_per_token=300,0"])


def test_advance_at_loss_removes_as_soon_as_the_level_recovers_and_the_pace_caps_the_wait():
    # Window 3, threshold 0.5, at most 6 steps a level. Losses (the step's, seen after it): level 0 recovers
    # at once, so its first removal comes after the fewest steps (3); level 1 never recovers, so the cap
    # (6 steps) removes the next; level 2 recovers after 4 steps (1.0 then three at 0.3, 0.3, 0.3).
    options = StepwiseConfig(steps_per_token=[6], advance_at_loss=0.5, advance_window=3, smoothing_lambda=math.inf)
    schedule = RemovalSchedule(options, seed=1)
    losses = [0.4] * 3 + [2.0] * 6 + [1.0, 0.3, 0.3, 0.3] + [9.0] * 3
    levels = []
    for step, loss in enumerate(losses):
        schedule.advance(StepContext(step, 0, 100, np.arange(4), total_steps=len(losses)), np.array([50] * 4))
        levels.append(schedule.scheduled)
        schedule.observe(loss)
        if step == 11:   # a checkpoint here resumes with the window it had
            resumed = RemovalSchedule(options, seed=1)
            resumed.load_state_dict(schedule.state_dict())
            assert resumed.recent_losses == schedule.recent_losses == [1.0, 0.3, 0.3]
    assert levels == [0, 0, 0] + [1] * 6 + [2] * 4 + [3] * 3
    # Without the threshold the losses change nothing.
    fixed = RemovalSchedule(StepwiseConfig(steps_per_token=[6], smoothing_lambda=math.inf), seed=1)
    seen = []
    for step, loss in enumerate(losses):
        fixed.advance(StepContext(step, 0, 100, np.arange(4)), np.array([50] * 4))
        seen.append(fixed.scheduled)
        fixed.observe(loss)
    assert seen == [0] * 6 + [1] * 6 + [2] * 4


def test_final_decay_starts_at_the_last_removal_and_reaches_zero_at_the_end():
    # CoTs of 3 tokens, one removed every 2 steps: the third removal (the longest CoT) comes at step 6.
    options = StepwiseConfig(steps_per_token=[2], smoothing_lambda=math.inf, final_decay="linear")
    schedule = RemovalSchedule(options, seed=1)
    scales = [schedule.advance(StepContext(step, 0, 100, np.arange(4), total_steps=10), np.array([3, 2, 3, 1]))[0].lr_scale
              for step in range(10)]
    assert scales == pytest.approx([1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    assert schedule.state_dict()["ended_at"] == 6
    resumed = RemovalSchedule(options, seed=1)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.ended_at == 6
    cosine = RemovalSchedule(StepwiseConfig(steps_per_token=[2], smoothing_lambda=math.inf, final_decay="cosine"), 1)
    scales = [cosine.advance(StepContext(step, 0, 100, np.arange(4), total_steps=10), np.array([3] * 4))[0].lr_scale
              for step in range(10)]
    assert scales[:7] == [1.0] * 7 and scales[8] == pytest.approx(0.5) and scales[7] > 0.5 > scales[9] > 0
    # The default keeps the reference's constant rate.
    plain = RemovalSchedule(StepwiseConfig(steps_per_token=[2], smoothing_lambda=math.inf), 1)
    assert {plain.advance(StepContext(step, 0, 100, np.arange(4), total_steps=10), np.array([3] * 4))[0].lr_scale
            for step in range(10)} == {1.0}


def test_pretrain_epochs_hold_the_count_and_the_threshold_removes_everything():
    options = StepwiseConfig(remove_per_epoch=5, smoothing_lambda=math.inf, pretrain_epochs=1, remove_start_from=1,
                             remove_all_beyond=3, reset_optimizer=False)
    got = [s for s, _ in run_schedule(options, 20, 10)]
    # Epoch 0 (steps 0-9): the counter does not advance, 1 token. Epoch 1: +1 every 2 steps from step 12,
    # and from 3 on everything.
    assert got[:10] == [1] * 10
    assert got[10:] == [1, 1, 2, 2, math.inf, math.inf, math.inf, math.inf, math.inf, math.inf]
    assert not any(r for _, r in run_schedule(options, 20, 10))   # reset_optimizer off


def test_no_reset_when_the_previous_batch_had_no_cot_left():
    # CoTs of 2 tokens: from 2 scheduled tokens on, a batch has no CoT left, so the increment to 3 resets
    # nothing (train.py:262-268).
    got = run_schedule(StepwiseConfig(remove_per_epoch=5, smoothing_lambda=math.inf), 8, 10,
                       cot_lengths={i: 2 for i in range(4)})
    assert [s for s, _ in got] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r for _, r in got] == [False, False, True, False, True, False, False, False]


def test_the_offset_distribution_and_per_example_offsets():
    p = offset_distribution(4.0)
    assert p[0] == pytest.approx(0.9817, abs=1e-4) and p[1] == pytest.approx(0.0180, abs=1e-4)
    assert p[2] == pytest.approx(0.00033, abs=1e-5) and p.sum() == pytest.approx(1.0)
    assert p[-1] == pytest.approx(1 - (1 - math.exp(-4)) * sum(math.exp(-4 * k) for k in range(99)), abs=1e-12)
    assert offset_distribution(math.inf).tolist() == [1.0] + [0.0] * 99
    schedule = RemovalSchedule(StepwiseConfig(smoothing_lambda=0.5), seed=3)
    offsets = [schedule.offset(7, index) for index in range(2000)]
    assert offsets == [schedule.offset(7, index) for index in range(2000)]   # per (seed, step, example)
    assert abs(np.mean([o == 0 for o in offsets]) - (1 - math.exp(-0.5))) < 0.04
    _, alone = schedule.advance(StepContext(0, 0, 10, np.array([5])), np.array([100] * 10))
    schedule = RemovalSchedule(StepwiseConfig(smoothing_lambda=0.5), seed=3)
    _, together = schedule.advance(StepContext(0, 0, 10, np.array([9, 5, 1])), np.array([100] * 10))
    assert alone[5] == together[5]   # whatever batch (or rank) the example is in


def test_removed_cot_batches_equal_hand_built_sequences():
    from types import SimpleNamespace

    from icot.methods.stepwise.stage import StepwiseStage

    # ` q q <sep> c1 c2 c3 c4 <sep> #### a <sep>` as ids: q = 5, 6; c = 11..14; #### = 2; a = 9.
    ids = [5, 6, SEP, 11, 12, 13, 14, SEP, 2, 9, SEP]
    assert remove_cot(ids, 3, 7, 2, "left") == [5, 6, SEP, 13, 14, SEP, 2, 9, SEP]
    assert remove_cot(ids, 3, 7, 2, "right") == [5, 6, SEP, 11, 12, SEP, 2, 9, SEP]
    assert remove_cot(ids, 3, 7, 9, "left") == remove_cot(ids, 3, 7, math.inf, "left") == [5, 6, SEP, SEP, 2, 9, SEP]
    assert remove_cot(ids, 3, 7, 0, "left") == ids

    config = stage_config("stepwise", stepwise=StepwiseConfig(smoothing_lambda=math.inf))
    stage = StepwiseStage(config, SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(eos_token_id=SEP))
    short = {"cot_ids": [7, SEP, 11, 12, SEP, 2, 9, SEP], "nocot_ids": [7, SEP, 2, 9, SEP], "prompt_len": 2}
    stage.removals = {0: 3, 1: 1}
    batch = stage.collate([dict(short, index=1), {"cot_ids": ids, "nocot_ids": [5, 6, SEP, 2, 9, SEP],
                                                  "prompt_len": 3, "index": 0}])["cot"]
    pad = SEP
    want_ids = [[7, SEP, 12, SEP, 2, 9, SEP, pad], [5, 6, SEP, 14, SEP, 2, 9, SEP]]
    want_labels = [[IGNORE_INDEX, IGNORE_INDEX, 12, SEP, 2, 9, SEP, IGNORE_INDEX],
                   [IGNORE_INDEX] * 3 + [14, SEP, 2, 9, SEP]]
    assert batch["input_ids"].tolist() == want_ids and batch["labels"].tolist() == want_labels
    assert batch["attention_mask"].tolist() == [[1] * 7 + [0], [1] * 8]
    assert batch["first_sep"].tolist() == [1, 2] and batch["second_sep"].tolist() == [3, 4]
    # Validation: the schedule's count, no offset; `_all_removed`: no CoT at all.
    stage.schedule.scheduled = 1
    with stage.validation_settings()["_all_removed"]:
        assert stage.collate([short])["cot"]["input_ids"].tolist() == [[7, SEP, SEP, 2, 9, SEP]]
    assert stage.collate([short])["cot"]["input_ids"].tolist() == [[7, SEP, 12, SEP, 2, 9, SEP]]


def reference_kept_positions(length: int, first_sep: int, removed: int, new_length: int) -> list[int]:
    """train.py:287-320 with --keep_position: arange, += removed from the first separator on, truncated."""
    positions = list(range(length))
    for i in range(first_sep, length):   # removal_from - 1 = first_sep for the left side
        positions[i] += removed
    return positions[:new_length]


def test_kept_positions_equal_the_references_position_ids():
    from icot.models.positions import shifted_positions
    from tests.model_helpers import tiny_gpt2

    model = tiny_gpt2().eval()
    examples = [[5, 6, SEP, 14, 15, 16, SEP, 2, 9, SEP], [7, SEP, 12, 13, SEP, 2, 9, SEP]]
    first_seps, removed = [2, 1], [2, 1]
    rows = [ids[:f + 1] + ids[f + 1 + r:] for ids, f, r in zip(examples, first_seps, removed)]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [SEP] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    positions = torch.tensor([reference_kept_positions(len(ids), f, r, len(row)) + [0] * (width - len(row))
                              for ids, f, r, row in zip(examples, first_seps, removed, rows)])
    assert positions[0, :len(rows[0])].tolist() == [0, 1, 4, 5, 6, 7, 8, 9]   # 14 15 gone: the separator sits at 4
    want = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
    with shifted_positions(model, torch.tensor(first_seps), torch.tensor(removed)):
        got = model(input_ids=input_ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.equal(got[real], want[real])
    plain = model(input_ids=input_ids, attention_mask=mask).logits
    assert not torch.allclose(plain[real], want[real])   # the shift changes the logits: it is applied


def test_kept_positions_in_decoding_continue_from_the_shifted_separator():
    from icot.data.collate import collate_generate
    from icot.models.generation import generate_explicit
    from icot.models.positions import shifted_positions
    from tests.model_helpers import tiny_gpt2

    model = tiny_gpt2(hidden=32).eval()
    prompts = [[5, 6, 8, SEP], [7, SEP]]
    batch = collate_generate([{"nocot_ids": p + [3, SEP], "prompt_len": len(p)} for p in prompts], SEP)
    shift = 3
    with shifted_positions(model, batch["position_ids"][:, -1], torch.full((2,), shift)):
        got = generate_explicit(model, batch, separator_id=SEP, max_new_tokens=6)
    for prompt, row in zip(prompts, got):   # one prompt at a time, positions written out by hand
        ids = list(prompt)
        positions = list(range(len(prompt) - 1)) + [len(prompt) - 1 + shift]
        want = []
        while len(want) < 6 and want.count(SEP) < 2:
            logits = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions])).logits[0, -1]
            token = int(logits.argmax())
            want.append(token)
            ids.append(token)
            positions.append(positions[-1] + 1)
        assert row == want


def test_decoding_ends_where_the_positions_end_kept_positions_included():
    """A model that never writes its separators (here: its logit masked) decodes until the positions are
    full, and no further: with kept positions every new token sits `shift` further (the stepwise mode; the
    stage's validation decodes through the same bound)."""
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel

    from icot.data.collate import collate_generate
    from icot.methods.stepwise.modes import StepwiseModel
    from icot.models.generation import generate_explicit
    from tests.model_helpers import VOCAB

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=1, n_embd=16, n_head=2, n_positions=12)).eval()
    model.lm_head.register_forward_hook(lambda module, args, logits: logits.index_fill(-1, torch.tensor([SEP]), -1e9))
    prompts = [[5, 6, 8, SEP], [7, SEP]]
    batch = collate_generate([{"nocot_ids": p + [3, SEP], "prompt_len": len(p)} for p in prompts], SEP)
    plain = generate_explicit(model, batch, separator_id=SEP, max_new_tokens=50)
    assert [len(row) for row in plain] == [12 - 4] * 2   # the longest prompt (4 positions) bounds the batch

    class Shifted(StepwiseModel):
        position_shift = 3

    shifted = Shifted("stepwise", model, SimpleNamespace(eos_token_id=SEP)).generate(batch, max_new_tokens=50)
    assert [len(row) for row in shifted] == [12 - 4 - 3] * 2


def test_keep_position_refuses_decoders_without_learned_positions():
    from icot.errors import UserError
    from icot.models.positions import shifted_positions
    from tests.model_helpers import tiny_llama

    with pytest.raises(UserError, match="learned absolute position embeddings"):
        with shifted_positions(tiny_llama(), torch.tensor([1]), torch.tensor([1])):
            pass


# --------------------------------------------------------------------------------------------------
# Training runs.

SCHEDULE = {"remove_per_epoch": 8, "smoothing_lambda": 4, "start": "teacher"}
TAGS = ("train/loss", "train/grad_norm", "train/removed_tokens", "valid/loss", "valid/loss_all_removed")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    folder = make_workspace(tmp_path_factory.mktemp("stepwise"), train=128, valid=8, test=9)
    # 128 examples in batches of 16: 8 steps an epoch, one more token every step.
    write_recipe(folder, methods=["stepwise"], stepwise=SCHEDULE, coconut={"init_token": "+", "epochs_per_stage": 1},
                 codi={"start": "teacher", "latents": 3, "projection_dim": 32, "lora_r": 8},
                 train={"max_steps": 24, "save_every": 4, "eval_each_epoch": True, "export_best": True})
    run_train(folder, "teacher", folder / "recipe.yaml")
    return folder


@pytest.fixture(scope="module")
def straight(ws) -> dict:
    run_train(ws, "stepwise", ws / "recipe.yaml", "--run_dir=straight", f"--inputs.start.dir={ws / 'run/teacher'}",
              "--model.dropout=0.1")
    return read_scalars(ws / "straight/stepwise/tb")


def test_a_stepwise_run_removes_its_cot_and_keeps_the_best_export(ws, straight):
    root = ws / "straight/stepwise"
    assert stage_folder_problems(root, "stepwise") == []
    removed = dict(straight["train/removed_tokens"])
    assert [removed[s] for s in (1, 2, 8, 9)] == [0.0, 1.0, 7.0, 8.0]   # one token a step, from the left
    assert math.isinf(removed[24]) is False and removed[24] == 23.0
    # The 3x3 CoT has 24 tokens: after step 24 nothing is left of it in most examples.
    assert {tag for tag in straight if tag.startswith("valid/")} >= {"valid/loss", "valid/loss_all_removed",
                                                                     "valid/token_accuracy_all_removed",
                                                                     "valid/accuracy"}
    assert [s for s, _ in straight["valid/loss"]] == [8, 16, 24]   # every epoch
    index = json.loads((root / "exports.json").read_text())
    assert index[-1]["name"] == "last"


def test_a_stop_in_the_middle_of_the_removal_resumes_bitwise(ws, straight):
    overrides = ["--run_dir=stopped", f"--inputs.start.dir={ws / 'run/teacher'}", "--model.dropout=0.1"]
    code, _ = launch_and_signal(ws, "stepwise", ws / "recipe.yaml", *overrides, sig=signal.SIGTERM, at_step=9,
                                log_name="stopped")
    assert code == 0
    stopped = int((ws / "stopped/stepwise/PREEMPTED").read_text().split()[1])
    assert 0 < dict(straight["train/removed_tokens"])[stopped] < 23
    run_train(ws, "stepwise", ws / "recipe.yaml", *overrides)
    got = read_scalars(ws / "stopped/stepwise/tb")
    for tag in TAGS:
        assert got[tag] == straight[tag], tag


def test_two_ranks_remove_what_one_removes(ws):
    overrides = [f"--inputs.start.dir={ws / 'run/teacher'}", "--stepwise.smoothing_lambda=1"]
    run_train(ws, "stepwise", ws / "recipe.yaml", "--run_dir=one", *overrides)
    run_train(ws, "stepwise", ws / "recipe.yaml", "--run_dir=two", *overrides, nproc=2)
    one, two = (read_scalars(ws / name / "stepwise/tb") for name in ("one", "two"))
    assert two["train/removed_tokens"] == one["train/removed_tokens"]
    for (step, a), (_, b) in zip(one["train/loss"], two["train/loss"], strict=True):
        assert a == pytest.approx(b, rel=1e-5), step   # the same examples with the same offsets


def test_keep_position_trains_exports_its_shift_and_evaluates_with_it(ws, straight):
    overrides = ["--run_dir=kept", f"--inputs.start.dir={ws / 'run/teacher'}", "--model.dropout=0.1",
                 "--stepwise.keep_position=true"]
    run_train(ws, "stepwise", ws / "recipe.yaml", *overrides)
    root = ws / "kept/stepwise"
    got = read_scalars(root / "tb")
    assert got["train/removed_tokens"] == straight["train/removed_tokens"]
    # Step 1 removes nothing (the same loss); once tokens are removed the kept positions change it.
    assert got["train/loss"][0] == straight["train/loss"][0] and got["train/loss"][-1] != straight["train/loss"][-1]
    description = json.loads((root / "export/icot_component.json").read_text())
    assert description["keep_position"] is True and description["position_shift"] == 23   # 23 scheduled, CoT 24
    evaluated = subprocess.run([sys.executable, "-m", "icot", "eval", "--mode", "stepwise", "--run_dir", "kept",
                                "--data", "data/test.txt"], cwd=ws, env=icot_env(), capture_output=True, text=True)
    assert evaluated.returncode == 0 and re.search(r'"examples": 9', evaluated.stdout), evaluated.stderr[-2000:]
    refused = run_train(ws, "stepwise", ws / "recipe.yaml", "--run_dir=kept_right", *overrides[1:],
                        "--stepwise.side=right", check=False)
    assert refused.returncode != 0 and "supported with stepwise.side left only" in refused.stderr


def test_a_llama_from_scratch_on_zero3_with_bf16_and_activation_checkpointing(ws, straight):
    overrides = ["--run_dir=llama", "--stepwise.start=base", "--model.family=llama", "--train.zero_stage=3",
                 "--train.precision=bf16", "--model.gradient_checkpointing=true", "--train.max_steps=6"]
    run_train(ws, "stepwise", ws / "recipe.yaml", *overrides, nproc=2)
    root = ws / "llama/stepwise"
    assert stage_folder_problems(root, "stepwise") == []
    ds_config = json.loads((root / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 3 and ds_config["bf16"] == {"enabled": True}
    got = read_scalars(root / "tb")
    # The schedule depends on the data and the seed only: the same removals as the GPT-2 run's.
    assert got["train/removed_tokens"] == straight["train/removed_tokens"][:6]
    assert all(math.isfinite(value) for _, value in got["train/loss"])
    config = json.loads((root / "export/config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_compare_lists_every_method_beside_the_baselines(ws):
    result = subprocess.run([sys.executable, "-m", "icot", "compare", "--config", "recipe.yaml",
                             "--methods", "icot_kd,stepwise,coconut,codi", "--eval_batch_size", "4", "--run_dir=compared"],
                            cwd=ws, env=icot_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    comparison = json.loads((ws / "compared/compare.json").read_text())
    assert [(row["method"], row["mode"]) for row in comparison["rows"]] == [
        ("shared", "no_cot"), ("shared", "explicit"), ("icot_kd", "implicit"), ("stepwise", "stepwise"),
        ("coconut", "coconut"), ("codi", "codi")]
    stepwise, coconut, codi = comparison["rows"][-3:]
    assert codi["stages"] == ["codi"] and "teacher" in codi["reads_seconds"]
    assert coconut["stages"] == ["coconut"] and "teacher" in coconut["reads_seconds"]
    assert stepwise["stages"] == ["stepwise"] and "teacher" in stepwise["reads_seconds"]
    table = (ws / "compared/compare.md").read_text()
    assert "| stepwise | Stepwise internalization (ICoT-SI) |" in table and "| icot_kd | Implicit CoT" in table
    assert "| coconut | Coconut (continuous thoughts) |" in table
    assert "| codi | CODI (continuous thoughts) |" in table
    print(table)
    assert (ws / "compared/compare.png").stat().st_size > 10_000
    evaluated = subprocess.run([sys.executable, "-m", "icot", "eval", "--mode", "stepwise", "--run_dir", "compared",
                                "--data", "data/test.txt"], cwd=ws, env=icot_env(), capture_output=True, text=True)
    assert evaluated.returncode == 0 and re.search(r'"examples": 9', evaluated.stdout), evaluated.stderr[-2000:]
