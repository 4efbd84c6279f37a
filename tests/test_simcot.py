"""SIM-CoT step supervision over Coconut and CODI against the reference's rules (METHODS.md section 4).

- Targets: what each thought must decode, written out from the lines' text (Coconut: the latent steps, the
  last thought every latent step from its own on, the answer where the steps run out; CODI: the teacher
  row's steps over latents + 1 slots, nothing where they run out), equals the collated step batch: ids,
  labels, mask, positions and the thought columns each row reads. CODI's `truncate_to_first_row` equals a
  replay of the reference's padding helpers called in its loop.
- The loss of a tiny model equals the reference's computation written here its way: Coconut thought by
  thought (the fed-back states by full forwards, summed cross-entropy over the rows, divided by the rows
  and the thoughts), CODI slot by slot (the cached latent passes, a token mean per slot over the slots
  that hold a target); and so do the gradients.
- Runs (tiny GPT-2, 3x3 multiplication): a Coconut + SIM-CoT run logs the step loss and exports Coconut's
  model alone; with weight 0 each SIM-CoT method trains, exports and decodes exactly as its plain method;
  SIGTERM mid-run resumes with the same losses; ZeRO-3, bf16 and activation checkpointing on two ranks;
  the reference's two-stage procedure (Coconut first, then SIM-CoT from its export) runs; `icot compare`
  with the CPU recipe lists Coconut, Coconut + SIM-CoT, CODI and CODI + SIM-CoT.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.register_assert_rewrite("tests.train_fixtures")
pytest_plugins = ["tests.train_fixtures"]

from icot.config import load_stage_config  # noqa: E402
from icot.data.collate import IGNORE_INDEX  # noqa: E402
from icot.data.views import encode_batch  # noqa: E402
from icot.demo import RECIPES  # noqa: E402
from icot.engine import Strategy  # noqa: E402
from icot.methods.codi.model import CodiModel, build_projection, with_adapters  # noqa: E402
from icot.methods.codi.stage import codi_loss  # noqa: E402
from icot.methods.coconut_simcot.stage import CoconutSimCotStage  # noqa: E402
from icot.methods.codi_simcot.stage import CodiSimCotStage  # noqa: E402
from icot.models.decoder import build_decoder, decoder_config  # noqa: E402
from icot.models.step_decoder import StepSupervised  # noqa: E402
from tests import tokenizer_fixtures as fixtures  # noqa: E402
from tests.train_fixtures import (icot_env, launch_and_signal, make_workspace, read_scalars, run_train,  # noqa: E402
                                  stage_folder_problems, write_recipe)

# 4 partial products, 3 equations, 2 equations.
LINES = [fixtures.MULTIPLICATION_LINES[0], fixtures.GSM8K_LINES[1], fixtures.GSM8K_LINES[2]]


def word_stage(cls, stage: str, *overrides: str, lines=LINES):
    """A SIM-CoT stage on the word-level test tokenizer, and the lines' features and texts."""
    tokenizer = fixtures.build("word", fixtures.line_segments(fixtures.SAMPLE_LINES))
    config = load_stage_config(stage, None, ["--coconut.init_token=+", *overrides])
    built = cls(config, Strategy(config.train), tokenizer)
    texts = [fixtures.split_line(line) for line in lines]
    columns = encode_batch(tokenizer, *zip(*texts))
    return built, [dict(zip(columns, values)) for values in zip(*columns.values())], texts


def encode(tokenizer, text: str) -> list[int]:
    """Word-level tokenization is per word: a step's ids are those of its text."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_batch(targets: list[list[list[int] | None]], columns: list[list[int]], prefix: int, pad: int,
                   first_position: int) -> dict[str, list]:
    """The step batch written out: one row per (example, slot) with a target, in that order."""
    rows = [(b, k, ids) for b, slots in enumerate(targets) for k, ids in enumerate(slots) if ids]
    width = max(len(ids) for _, _, ids in rows)
    return {"rows": [b for b, _, _ in rows], "slots": [k for _, k, _ in rows],
            "columns": [columns[b][k * prefix:(k + 1) * prefix] for b, k, _ in rows],
            "input_ids": [ids + [pad] * (width - len(ids)) for _, _, ids in rows],
            "labels": [[IGNORE_INDEX] * prefix + ids + [IGNORE_INDEX] * (width - len(ids)) for _, _, ids in rows],
            "attention_mask": [[1] * (prefix + len(ids)) + [0] * (width - len(ids)) for _, _, ids in rows],
            "position_ids": [list(range(first_position, first_position + prefix + width))] * len(rows)}


# --------------------------------------------------------------------------------------------------
# Targets.


def coconut_targets(tokenizer, texts, stage: int, c: int, top: int, pad: bool) -> list[list[list[int]]]:
    """Thought t decodes latent step t, the last thought the latent steps from its own on, and a thought
    without a step the answer text (the reference's pseudo thought), each with the separator after it."""
    sep = tokenizer.eos_token_id
    out = []
    for _, cot, answer in texts:
        steps = fixtures.split_steps(cot)
        if stage > top:
            latent, thoughts = steps, (top if pad else min(len(steps), top))
        else:
            latent, thoughts = steps[:stage], stage
        slots = [latent[t:t + 1] if t < thoughts - 1 else latent[t:] for t in range(thoughts)]
        out.append([encode(tokenizer, " " + (" ".join(s) if s else f"#### {answer}")) + [sep] for s in slots])
    return out


@pytest.mark.parametrize("stage,pad", [(1, True), (2, True), (3, True), (4, True), (4, False)])
def test_coconut_thoughts_decode_the_steps_they_replace(stage, pad):
    built, features, texts = word_stage(CoconutSimCotStage, "coconut_simcot", "--coconut.thoughts_per_step=2",
                                        "--coconut.max_latent_stage=3", f"--coconut.pad_latent_to_max={pad}")
    built.schedule.stage = stage
    batch = built.collate(features)
    tokenizer = built.tokenizer
    targets = coconut_targets(tokenizer, texts, stage, 2, 3, pad)
    # Every row's thoughts start in one column, the one after the longest prompt's start token.
    first = max(int(f["prompt_len"]) for f in features) + 1
    columns = [list(range(first, first + 2 * len(slots))) for slots in targets]
    ids = batch["cot"]["input_ids"]
    assert all(ids[row, c] == built.tokens.latent for row, cols in enumerate(columns) for c in cols)
    want = expected_batch(targets, columns, 2, tokenizer.eos_token_id, first_position=1)
    assert {key: batch["steps"][key].tolist() for key in want} == want
    if stage == 4 and pad:   # the merged last thought and the answer of a row out of steps are in it
        assert encode(tokenizer, " #### 30") + [tokenizer.eos_token_id] in targets[2]
        assert len(targets[0][2]) > len(targets[0][1]) + 1


def codi_targets(tokenizer, texts, latents: int, include_last: bool) -> list[list[list[int]]]:
    """latents + 1 slots over the teacher row's steps (its last dropped unless `include_last`): slot k the
    k-th, the last slot the steps from its own on, nothing where the steps run out."""
    sep = tokenizer.eos_token_id
    out = []
    for _, cot, _ in texts:
        steps = fixtures.split_steps(cot) if include_last else fixtures.split_steps(cot)[:-1]
        slots = [steps[k:k + 1] if k < latents else steps[k:] for k in range(latents + 1)]
        out.append([encode(tokenizer, " " + " ".join(s)) + [sep] if s else [] for s in slots])
    return out


def replayed_reference_targets(targets: list[list[list[int]]], pad: int) -> list[list[list[int]]]:
    """simcot:CODI/src/model.py:147-260, 488-508 replayed: each row's slots padded to the longest step of the
    batch (`pad_steps`, a slot without a step all padding), then per slot `dedup_trailing_pads` called after
    every row appended, and the labels the non-padding ids."""
    longest = max(len(ids) for slots in targets for ids in slots)
    padded = [[ids + [pad] * (longest - len(ids)) for ids in slots] for slots in targets]

    def dedup_trailing_pads(rows):
        size = len(rows[0])
        while size > 1 and all(row[size - 2] == pad for row in rows):
            size -= 1
        return [row[:size] for row in rows]

    out = [[] for _ in targets]
    for slot in range(len(targets[0])):
        listed = []
        for row in padded:
            listed.append(row[slot])
            listed = dedup_trailing_pads(listed)
        for index, ids in enumerate(listed):
            out[index].append([token for token in ids if token != pad])
    return out


@pytest.mark.parametrize("latents,include_last", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("truncate", [False, True])
def test_codi_thoughts_decode_the_teacher_rows_steps(latents, include_last, truncate):
    # The first row holds the shortest steps: the reference's cut shortens the others' targets.
    built, features, texts = word_stage(CodiSimCotStage, "codi_simcot", f"--codi.latents={latents}",
                                        f"--codi.include_last_step={include_last}",
                                        f"--codi_simcot.truncate_to_first_row={truncate}", lines=LINES[::-1])
    batch = built.collate(features)
    tokenizer = built.tokenizer
    pad = -1   # the reference pads with its own [PAD] id, never a target
    targets = codi_targets(tokenizer, texts, latents, include_last)
    if truncate:
        targets = replayed_reference_targets(targets, pad)
        assert any(0 < len(ids) < len(full) for slots, fulls in zip(targets, codi_targets(tokenizer, texts, latents,
                                                                                            include_last))
                   for ids, full in zip(slots, fulls))   # the cut is in this batch
    student = batch["student"]["input_ids"]
    width = student.size(1)
    first = int((student[0] == built.tokens.latent).nonzero()[0])
    # The thoughts as fed, then the projection of the last one's output (an extra column).
    columns = [list(range(first, first + latents)) + [width]] * len(features)
    want = expected_batch(targets, columns, 1, tokenizer.eos_token_id, first_position=0)
    assert {key: batch["steps"][key].tolist() for key in want} == want
    if latents == 1 and not truncate:   # the multiplication's two teacher steps after its first, merged
        assert targets[2][1] == encode(tokenizer, " " + " ".join(fixtures.split_steps(texts[2][1])[1:3])) + [
            tokenizer.eos_token_id]


def test_a_batch_without_any_target_still_calls_the_decoder_once_for_nothing():
    built, features, _ = word_stage(CoconutSimCotStage, "coconut_simcot")
    built.schedule.stage = 0   # stage 0: no thought
    steps = built.collate(features)["steps"]
    assert steps["rows"].tolist() == [0] and (steps["labels"] == IGNORE_INDEX).all()
    model = supervised_coconut(len(built.tokenizer))
    loss = built.loss(model, built.collate(features))
    assert loss["step_loss"] == 0
    loss["loss"].backward()
    assert all(p.grad is not None for p in model.step_decoder.parameters())


# --------------------------------------------------------------------------------------------------
# The loss against the reference's computation.


def tiny(vocab: int, seed: int):
    torch.manual_seed(seed)
    return build_decoder(decoder_config("gpt2", vocab_size=vocab, layers=2, hidden=16, heads=2, max_positions=96))


def supervised_coconut(vocab: int) -> StepSupervised:
    return StepSupervised(tiny(vocab, 0), tiny(vocab, 1)).eval()


def coconut_reference_loss(model: StepSupervised, cot: dict, targets, latent_id: int, c: int, eos: int):
    """simcot:Coconut/coconut.py:515-785 on its own terms: the thoughts (each the last hidden state of the
    position before it, by full forwards), then per thought the decoder input `[z_2t, z_2t+1, step, EOS,
    EOS...]` (positions 1..L, mask through the first EOS), the summed cross-entropy over the step and the
    first EOS divided by the rows with a label; loss = CE + 1.0 x sum / c_thought_num."""
    base, ids, mask, positions = model.model, cot["input_ids"], cot["attention_mask"], cot["position_ids"]
    embeds = base.get_input_embeddings()(ids)
    for column in range(ids.size(1)):
        rows = ids[:, column] == latent_id
        if rows.any():
            hidden = base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                          output_hidden_states=True).hidden_states[-1]
            embeds = torch.where(rows[:, None, None] & (torch.arange(ids.size(1)) == column)[None, :, None],
                                 hidden.roll(1, dims=1), embeds)
    logits = base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    vocab = logits.size(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), cot["labels"][:, 1:].reshape(-1), ignore_index=-100)
    c_thought_num = len(targets[0])
    explain = 0.0
    for t in range(c_thought_num):
        groups = [slots[t][:-1] for slots in targets]   # the step without its EOS
        width = max(len(g) for g in groups) + 1 + 1     # + EOS, + one EOS of padding (coconut.py:620-632)
        inputs, masks, labels = [], [], []
        for row, group in enumerate(groups):
            latents = (ids[row] == latent_id).nonzero().flatten()[t * c:(t + 1) * c]
            tokens = group + [eos] * (width - len(group))
            inputs.append(torch.cat((embeds[row, latents], base.get_input_embeddings()(torch.tensor(tokens)))))
            masks.append([1] * (c + len(group) + 1) + [0] * (width - len(group) - 1))
            labels.append([-100] * c + group + [eos] + [-100] * (width - len(group) - 1))
        out = model.step_decoder(inputs_embeds=torch.stack(inputs), attention_mask=torch.tensor(masks),
                                 position_ids=torch.arange(1, c + width + 1).expand(len(groups), -1)).logits
        labels = torch.tensor(labels)
        summed = F.cross_entropy(out[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100,
                                 reduction="sum")
        explain = explain + summed / float((labels != -100).sum(dim=1).bool().sum())
    return loss + 1.0 * explain / c_thought_num


@pytest.mark.parametrize("stage", [1, 4])
def test_the_coconut_step_loss_and_its_gradients_equal_the_reference_computation(stage):
    built, features, texts = word_stage(CoconutSimCotStage, "coconut_simcot", "--coconut.thoughts_per_step=2",
                                        "--coconut.max_latent_stage=3")
    built.schedule.stage = stage
    tokenizer = built.tokenizer
    model = supervised_coconut(len(tokenizer))
    batch = built.collate(features)
    ours = built.loss(model, batch)
    targets = coconut_targets(tokenizer, texts, stage, 2, 3, True)
    theirs = coconut_reference_loss(model, batch["cot"], targets, built.tokens.latent, 2, tokenizer.eos_token_id)
    assert torch.allclose(ours["loss"], theirs, atol=1e-5, rtol=1e-5), (ours["loss"], theirs)
    assert ours["step_loss"] > 1.0   # a sum over a step's tokens
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(ours["loss"], params), torch.autograd.grad(theirs, params)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def supervised_codi(vocab: int, options) -> StepSupervised:
    decoder = with_adapters(tiny(vocab, 0), options)
    with torch.no_grad():   # adapters that change the output (peft starts them at zero)
        for name, p in decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return StepSupervised(CodiModel(decoder, build_projection(16, options)), tiny(vocab, 1)).eval()


def codi_reference_step_loss(model: StepSupervised, student: dict, targets, tokens, latents: int):
    """simcot:CODI/src/model.py:455-748 on its own terms, with the padding masked (icot's masking): the
    cached encoder pass over the left-padded `q <|bot|>`, z_0 the projection of its last state, then per
    latent pass the next z; slot k's decoder input `[z_k, step, pad...]` (mask on all but the padding,
    default positions), its token-mean cross-entropy; the sum over the slots with a label divided by
    their number."""
    from transformers import DynamicCache

    codi, prj, decoder = model.model.decoder, model.model.projection, model.step_decoder
    bot = int((student["input_ids"][0] == tokens.bot).nonzero()[0])
    mask = student["attention_mask"][:, :bot + 1]
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = codi(input_ids=student["input_ids"][:, :bot + 1], attention_mask=mask, position_ids=positions, cache=cache,
               use_cache=True, output_hidden_states=True)
    latent = prj(out.hidden_states[-1][:, -1:])
    thoughts = [latent]
    for _ in range(latents):
        mask, positions = torch.cat((mask, torch.ones_like(mask[:, :1])), 1), positions[:, -1:] + 1
        out = codi(inputs_embeds=latent, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   output_hidden_states=True)
        latent = prj(out.hidden_states[-1][:, -1:])
        thoughts.append(latent)
    total, counted = 0.0, 0
    for slot, z in enumerate(thoughts):
        steps = [slots[slot] for slots in targets]
        width = max(len(s) for s in steps)
        if width == 0:
            continue
        ids = torch.tensor([s + [0] * (width - len(s)) for s in steps])
        attention = torch.tensor([[1] * (1 + len(s)) + [0] * (width - len(s)) for s in steps])
        labels = torch.tensor([[-100] + s + [-100] * (width - len(s)) for s in steps])
        logits = decoder(inputs_embeds=torch.cat((z, model.get_input_embeddings()(ids)), 1),
                         attention_mask=attention).logits
        total = total + F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                        ignore_index=-100)
        counted += 1
    return total / max(1, counted)


@pytest.mark.parametrize("truncate", [False, True])
def test_the_codi_step_loss_and_its_gradients_equal_the_reference_computation(truncate):
    built, features, texts = word_stage(CodiSimCotStage, "codi_simcot", "--codi.latents=3", "--codi.lora_r=4",
                                        "--codi.lora_alpha=8", "--codi.lora_dropout=0", "--codi.projection_dim=24",
                                        f"--codi_simcot.truncate_to_first_row={truncate}", lines=LINES[::-1])
    tokenizer, options = built.tokenizer, built.options
    model = supervised_codi(len(tokenizer), options)
    batch = built.collate(features)
    ours = built.loss(model, batch)
    targets = codi_targets(tokenizer, texts, 3, False)
    if truncate:
        targets = replayed_reference_targets(targets, -1)
    step = codi_reference_step_loss(model, batch["student"], targets, built.tokens, 3)
    theirs = codi_loss(model.model, batch, options, built.tokens.latent)["loss"] + 1.0 * step
    assert torch.allclose(ours["step_loss"], step, atol=1e-5, rtol=1e-5), (ours["step_loss"], step)
    assert torch.allclose(ours["loss"], theirs, atol=1e-5, rtol=1e-5)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.requires_grad for p in model.step_decoder.parameters())   # the whole decoder trains
    for a, b in zip(torch.autograd.grad(ours["loss"], trained), torch.autograd.grad(theirs, trained)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Training runs: 3x3 multiplication (3 steps), Coconut one thought a step from stage 1, one epoch (8 steps)
# a stage; CODI with 3 thoughts; no dropout anywhere (a weightless step loss then changes nothing).

CURRICULUM = {"thoughts_per_step": 1, "epochs_per_stage": 1, "max_latent_stage": 2, "epoch_offset": 1,
              "init_token": "+"}
CODI = {"start": "teacher", "latents": 3, "projection_dim": 32, "lora_r": 8, "lora_dropout": 0.0, "teacher_passes": 1}
TAGS = ("train/loss", "train/step_loss", "train/grad_norm", "train/coconut_stage", "valid/loss", "valid/accuracy")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    folder = make_workspace(tmp_path_factory.mktemp("simcot"), train=128, valid=8, test=9)
    write_recipe(folder, methods=["coconut", "coconut_simcot", "codi", "codi_simcot"], coconut=CURRICULUM, codi=CODI,
                 codi_simcot={"decoder_dropout": 0.0}, train={"max_steps": 12, "save_every": 4, "eval_every": 6})
    run_train(folder, "teacher", folder / "recipe.yaml")
    return folder


def from_teacher(ws: Path) -> str:
    return f"--inputs.start.dir={ws / 'run/teacher'}"


@pytest.fixture(scope="module")
def straight(ws) -> dict:
    run_train(ws, "coconut_simcot", ws / "recipe.yaml", "--run_dir=straight", from_teacher(ws))
    return read_scalars(ws / "straight/coconut_simcot/tb")


def export_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_a_coconut_simcot_run_trains_the_step_decoder_and_exports_coconut_alone(ws, straight):
    root = ws / "straight/coconut_simcot"
    assert stage_folder_problems(root, "coconut_simcot") == []
    stages = dict(straight["train/coconut_stage"])
    assert [stages[s] for s in (1, 8, 9, 12)] == [1, 1, 2, 2]
    step_losses, losses = dict(straight["train/step_loss"]), dict(straight["train/loss"])
    assert all(0 < step_losses[s] < losses[s] for s in losses)   # the step loss joins Coconut's
    # The checkpoint holds the step decoder (a resumed run continues it); the export does not.
    states = torch.load(next((root / "ckpt").glob("step*/mp_rank_00_model_states.pt")), weights_only=False)
    assert any(key.startswith("step_decoder.") for key in states["module"])
    weights = export_weights(root / "export")
    assert not any("step_decoder" in key for key in weights) and "transformer.wte.weight" in weights
    description = json.loads((root / "export/icot_component.json").read_text())
    assert description["stage"] == "coconut_simcot" and description["coconut"]["thoughts"] == 2
    evaluated = subprocess.run([sys.executable, "-m", "icot", "eval", "--mode", "coconut_simcot", "--run_dir",
                                "straight", "--data", "data/test.txt", "--out", "eval.json"], cwd=ws, env=icot_env(),
                               capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads((ws / "eval.json").read_text())
    assert result["examples"] == 9 and result["mode"] == "coconut_simcot" and 0 < result["token_accuracy"] <= 1


@pytest.mark.parametrize("method", ["coconut", "codi"])
def test_with_weight_zero_it_trains_exports_and_decodes_exactly_as_the_plain_method(ws, method):
    from icot.data.tokenizer_build import load_tokenizer
    from icot.data.collate import collate_generate
    from icot.evaluate import load_eval_set, load_mode_model

    steps = "--train.max_steps=10"   # Coconut: across its stage change at step 9
    run_train(ws, method, ws / "recipe.yaml", "--run_dir=plain", from_teacher(ws), steps)
    run_train(ws, f"{method}_simcot", ws / "recipe.yaml", "--run_dir=weightless", from_teacher(ws), steps,
              f"--{method}_simcot.weight=0")
    plain, weightless = ws / "plain" / method, ws / "weightless" / f"{method}_simcot"
    assert read_scalars(weightless / "tb")["train/loss"] == read_scalars(plain / "tb")["train/loss"]
    assert all(value > 0 for _, value in read_scalars(weightless / "tb")["train/step_loss"])
    ours, theirs = export_weights(weightless / "export"), export_weights(plain / "export")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in theirs)
    files = {path.relative_to(plain / "export") for path in (plain / "export").rglob("*")}
    assert {path.relative_to(weightless / "export") for path in (weightless / "export").rglob("*")} == files
    tokenizer = load_tokenizer(plain / "export", "the export")
    batch = collate_generate(load_eval_set(ws / "data/test.txt", tokenizer), tokenizer.eos_token_id)
    with torch.no_grad():
        assert (load_mode_model(f"{method}_simcot", ws / "weightless").generate(batch, 24)
                == load_mode_model(method, ws / "plain").generate(batch, 24))


def test_a_stop_mid_run_resumes_with_the_same_losses(ws, straight):
    overrides = ["--run_dir=stopped", from_teacher(ws)]
    code, _ = launch_and_signal(ws, "coconut_simcot", ws / "recipe.yaml", *overrides, sig=signal.SIGTERM, at_step=5,
                                log_name="stopped")
    assert code == 0
    stopped = int((ws / "stopped/coconut_simcot/PREEMPTED").read_text().split()[1])
    assert 5 <= stopped < 9   # the resumed run changes stage (stage 2 from step 9)
    run_train(ws, "coconut_simcot", ws / "recipe.yaml", *overrides)
    got = read_scalars(ws / "stopped/coconut_simcot/tb")
    for tag in TAGS:
        assert got[tag] == straight[tag], tag


@pytest.mark.parametrize("stage,extra", [("coconut_simcot", "--coconut.uniform_prob=0.5"),
                                         ("codi_simcot", "--codi_simcot.truncate_to_first_row=true")])
def test_zero3_bf16_activation_checkpointing_on_two_ranks(ws, stage, extra):
    overrides = ["--run_dir=zero3", from_teacher(ws), "--train.zero_stage=3", "--train.precision=bf16",
                 "--model.gradient_checkpointing=true", "--train.max_steps=6", extra]
    run_train(ws, stage, ws / "recipe.yaml", *overrides, nproc=2)
    root = ws / "zero3" / stage
    assert stage_folder_problems(root, stage) == []
    ds_config = json.loads((root / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 3 and ds_config["bf16"] == {"enabled": True}
    got = read_scalars(root / "tb")
    assert all(np.isfinite(value) for _, value in got["train/loss"])
    assert all(np.isfinite(value) and value > 0 for _, value in got["train/step_loss"])
    weights = export_weights(root / "export")
    assert not any("step_decoder" in key for key in weights)
    assert weights["transformer.wte.weight"].shape[0] == json.loads((root / "export/config.json").read_text())["vocab_size"]


def test_the_references_two_stages_coconut_then_simcot_from_its_export(ws):
    """The reference trains Coconut, then SIM-CoT from its checkpoint (METHODS.md 4.3): the Coconut export as
    the start, with its tokenizer and its rows for the thought tokens. With lr 0 the export is the start's."""
    run_train(ws, "coconut", ws / "recipe.yaml", "--run_dir=two", from_teacher(ws), "--train.max_steps=4")
    coconut = ws / "two/coconut"
    run_train(ws, "coconut_simcot", ws / "recipe.yaml", "--run_dir=two", f"--inputs.start.dir={coconut}",
              f"--model.tokenizer={coconut / 'export'}", "--coconut.token_init=resize", "--train.max_steps=2",
              "--train.lr=0")
    root = ws / "two/coconut_simcot"
    manifest = json.loads((root / "manifest.json").read_text())
    assert Path(manifest["input_exports"]["teacher"]["path"]) == (coconut / "export").resolve()
    ours, theirs = export_weights(root / "export"), export_weights(coconut / "export")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_compare_lists_coconut_and_codi_with_and_without_simcot(ws):
    """`icot compare` with the CPU recipe (icot/recipes/demo_simcot.yaml), shortened, on this workspace."""
    tiny = ["--run_dir=compared", "--data.train=data/train.txt", "--data.valid=data/valid.txt",
            "--data.test=data/test.txt", "--model.tokenizer=tok", "--model.layers=2", "--model.hidden=32",
            "--model.heads=2", "--model.max_positions=128", "--data.max_length=128", "--train.max_steps=4",
            "--train.eval_examples=4", "--train.log_every=2", "--coconut.steps_per_stage=1",
            "--coconut.max_latent_stage=2", "--codi.lora_r=8", "--codi.projection_dim=32"]
    result = subprocess.run([sys.executable, "-m", "icot", "compare", "--config", str(RECIPES / "demo_simcot.yaml"),
                             "--eval_batch_size", "4", *tiny], cwd=ws, env=icot_env(), capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    comparison = json.loads((ws / "compared/compare.json").read_text())
    assert [(row["method"], row["mode"], row["title"]) for row in comparison["rows"]] == [
        ("shared", "no_cot", "No CoT"), ("shared", "explicit", "Explicit CoT (teacher)"),
        ("coconut", "coconut", "Coconut (continuous thoughts)"),
        ("coconut_simcot", "coconut_simcot", "Coconut + SIM-CoT"),
        ("codi", "codi", "CODI (continuous thoughts)"), ("codi_simcot", "codi_simcot", "CODI + SIM-CoT")]
    for row in comparison["rows"][2:]:
        assert row["stages"] == [row["mode"]] and "teacher" in row["reads_seconds"] and row["train_seconds"] > 0
    table = (ws / "compared/compare.md").read_text()
    assert "| coconut_simcot | Coconut + SIM-CoT |" in table and "| codi_simcot | CODI + SIM-CoT |" in table
    print(table)


def test_the_step_decoder_counts_its_own_rows_in_the_model_flops():
    """Tokens/s counts the method's rows; the FLOPs add the step decoder's work over its own rows
    (thought vectors + step), not the method's (icot.flops)."""
    from icot.flops import DecoderFlops

    built, features, _ = word_stage(CoconutSimCotStage, "coconut_simcot", "--coconut.thoughts_per_step=2",
                                    "--coconut.max_latent_stage=3")
    built.schedule.stage = 2
    model = supervised_coconut(len(built.tokenizer))
    batch = built.collate(features)
    counts = DecoderFlops.of_config(model.model.config)   # both are the same tiny GPT-2
    method_rows = batch["cot"]["attention_mask"].sum(dim=1).tolist()
    step_rows = batch["steps"]["attention_mask"].sum(dim=1).tolist()
    assert built.trained_tokens(batch) == (sum(method_rows), sum(t * t for t in method_rows))
    by_hand = sum(6 * counts.matmul_parameters * t + 12 * counts.layers * counts.attention_width * t * t
                  for t in method_rows + step_rows)
    assert built.batch_flops(model, batch) == by_hand
