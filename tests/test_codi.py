"""CODI (continuous thoughts by self-distillation) against the reference code's rules (METHODS.md section 3).

- Sequences: the teacher row (the CoT without its last step) and the student row (`<|bot|>`, the
  thoughts, `<|eot|>`, the answer) equal hand-built ones: tokens, labels, positions, the left padding
  that aligns every `<|bot|>`, and the reference's positions and masks under `reference_masking`.
- The distillation position is the token that predicts the answer's first token, for a GPT-2 byte-level
  BPE and a Llama-family (SentencePiece-style) tokenizer built locally.
- The loss (student CE + distillation over every layer / teacher std + teacher CE) and its gradients
  equal a reference computation written here the reference's way (a cached encoder pass, the thoughts
  one by one through the projection, the decoder pass; the teacher twice), with the correct masks and
  with the reference's; one teacher pass equals two when dropout is off.
- Answers do not depend on the batch: an example alone and in a left-padded batch decode alike (and
  under the reference's masking they would not).
- Runs: a CODI stage on the shared teacher trains, exports a merged model that transformers loads and
  the adapters alone; the adapters on the base give the merged model's answers; `icot eval --mode codi`
  reports both answer rules; SIGTERM and resume give the same losses; ZeRO-3, bf16 and activation
  checkpointing on two ranks; a Llama from scratch.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.register_assert_rewrite("tests.train_fixtures")
pytest_plugins = ["tests.train_fixtures"]

from icot.data.collate import IGNORE_INDEX, collate_generate  # noqa: E402
from icot.data.views import encode_batch  # noqa: E402
from icot.methods.codi import CodiConfig  # noqa: E402
from icot.methods.codi.model import CodiModel, build_projection, with_adapters  # noqa: E402
from icot.methods.codi.modes import CodiModeModel  # noqa: E402
from icot.methods.codi.sequences import add_codi_tokens, collate_codi, inference_batch  # noqa: E402
from icot.methods.codi.stage import codi_loss  # noqa: E402
from icot.models.decoder import build_decoder, decoder_config  # noqa: E402
from tests import tokenizer_fixtures as fixtures  # noqa: E402
from tests.train_fixtures import (icot_env, launch_and_signal, make_workspace, read_scalars, run_train,  # noqa: E402
                                  stage_folder_problems, write_recipe)

LINES = [fixtures.MULTIPLICATION_LINES[0], fixtures.GSM8K_LINES[1], fixtures.GSM8K_LINES[0]]


def encoded(kind: str, lines=LINES):
    tokenizer = fixtures.build(kind, fixtures.line_segments(fixtures.SAMPLE_LINES))
    tokens = add_codi_tokens(tokenizer)
    questions, cots, answers = zip(*map(fixtures.split_line, lines))
    columns = encode_batch(tokenizer, questions, cots, answers)
    features = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return tokenizer, tokens, features, list(zip(questions, cots, answers))


# --------------------------------------------------------------------------------------------------
# Sequences and the distillation position.


@pytest.mark.parametrize("reference_masking", [False, True])
def test_hand_built_teacher_and_student_rows_equal_the_collated_batch(reference_masking):
    tokenizer, tokens, features, texts = encoded("word")
    sep = tokenizer.eos_token
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]   # noqa: E731  (word level)
    options = CodiConfig(latents=3, reference_masking=reference_masking)
    batch = collate_codi(features, tokenizer, options, tokens, tokenizer.eos_token_id)
    teachers, students = [], []
    for question, cot, answer in texts:
        answer_part = encode(f" {sep} #### {answer} {sep}")
        teachers.append((encode(f" {question} {sep}"), encode(" " + " ".join(fixtures.split_steps(cot)[:-1])) + answer_part))
        students.append(encode(f" {question} {sep}") + [tokens.bot] + [tokens.latent] * 3 + [tokens.eot] + answer_part)
    pad = tokenizer.eos_token_id
    width = max(len(p) + len(r) for p, r in teachers)
    for row, (prompt, rest) in enumerate(teachers):
        ids, right = prompt + rest, width - len(prompt) - len(rest)
        assert batch["teacher"]["input_ids"][row].tolist() == ids + [pad] * right
        assert batch["teacher"]["labels"][row].tolist() == [IGNORE_INDEX] * len(prompt) + rest + [IGNORE_INDEX] * right
        assert batch["teacher"]["position_ids"][row].tolist()[:len(ids)] == list(range(len(ids)))
        # The distillation column holds `####`: the token that predicts the answer's first token.
        assert tokenizer.convert_ids_to_tokens(ids[int(batch["teacher"]["distill"][row])]) == "####"
    column = max(ids.index(tokens.bot) for ids in students)
    lefts = [column - ids.index(tokens.bot) for ids in students]
    width = max(left + len(ids) for left, ids in zip(lefts, students))
    student = batch["student"]
    for row, (ids, left) in enumerate(zip(students, lefts)):
        right = width - left - len(ids)
        eot = ids.index(tokens.eot)
        assert student["input_ids"][row].tolist() == [pad] * left + ids + [pad] * right
        assert student["attention_mask"][row].tolist() == [0] * left + [1] * len(ids) + [0] * right
        assert student["labels"][row].tolist() == ([IGNORE_INDEX] * (left + eot + 1) + ids[eot + 1:]
                                                   + [IGNORE_INDEX] * right)
        if reference_masking:   # positions over the padded row; later passes attend to the padding
            assert student["position_ids"][row].tolist()[:left + len(ids)] == list(range(left + len(ids)))
            assert student["later_mask"][row].tolist() == [1] * (left + len(ids)) + [0] * right
        else:
            assert student["position_ids"][row].tolist() == [0] * left + list(range(len(ids))) + [0] * right
            assert "later_mask" not in student
        distill = int(student["distill"][row])
        assert distill == left + eot + 2 and student["input_ids"][row, distill] == tokenizer.convert_tokens_to_ids("####")
    assert len({row.tolist().index(tokens.bot) for row in student["input_ids"]}) == 1
    # include_last_step keeps the whole CoT.
    whole = collate_codi(features, tokenizer, replace(options, include_last_step=True), tokens, pad)["teacher"]
    assert whole["input_ids"][0].tolist()[:len(features[0]["cot_ids"])] == list(features[0]["cot_ids"])


def test_answer_distillation_pulls_every_answer_position_of_both_rows():
    """distill_positions answer: from `####` to the last answer token (each predicting the next), the same
    tokens in the teacher and the student row, masked where a row's answer is shorter."""
    tokenizer, tokens, features, texts = encoded("word")
    options = CodiConfig(latents=2, distill_positions="answer")
    batch = collate_codi(features, tokenizer, options, tokens, tokenizer.eos_token_id)
    lengths = [len(answer.split()) for _, _, answer in texts]
    assert len(set(lengths)) > 1   # the fixture has answers of several lengths: the mask matters
    for part in ("teacher", "student"):
        columns, mask = batch[part]["distill"], batch[part]["distill_mask"]
        assert mask.tolist() == [[1] * (n + 1) + [0] * (max(lengths) - n) for n in lengths]
        for row, (_, _, answer) in enumerate(texts):
            ids = batch[part]["input_ids"][row].tolist()
            picked = [ids[int(c)] for c, m in zip(columns[row], mask[row]) if m]
            assert tokenizer.convert_ids_to_tokens(picked) == ["####", *answer.split()]
    # The loss is the mean over the selected states (masked ones left out), per layer, over the teacher's std.
    from icot.methods.codi.stage import distillation_loss

    torch.manual_seed(0)
    student, teacher = [torch.randn(2, 5, 4)], [torch.randn(2, 6, 4)]
    columns_s, columns_t = torch.tensor([[1, 2, 0], [3, 4, 2]]), torch.tensor([[0, 5, 3], [2, 1, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    picked_s = torch.stack([student[0][0, 1], student[0][0, 2], student[0][1, 3], student[0][1, 4], student[0][1, 2]])
    picked_t = torch.stack([teacher[0][0, 0], teacher[0][0, 5], teacher[0][1, 2], teacher[0][1, 1], teacher[0][1, 0]])
    got = distillation_loss(student, columns_s, teacher, columns_t, "smooth_l1", True, mask)
    assert torch.allclose(got, F.smooth_l1_loss(picked_s, picked_t) / picked_t.std())


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_the_distillation_position_is_the_token_that_predicts_the_answer(kind):
    """GPT-2's ` ####` splits into several tokens and the answer's first token carries its space: the
    last `#` predicts it (the reference's ":"). A Llama-family tokenizer writes the space alone: that
    space token predicts the digits (the reference's +1 for Llama)."""
    tokenizer, tokens, features, texts = encoded(kind)
    batch = collate_codi(features, tokenizer, CodiConfig(latents=2), tokens, tokenizer.eos_token_id)
    for part in ("teacher", "student"):
        for row, (_, _, answer) in enumerate(texts):
            ids = batch[part]["input_ids"][row].tolist()
            column = int(batch[part]["distill"][row])
            predicting, predicted = tokenizer.decode(ids[column:column + 1]), tokenizer.decode(ids[column + 1:column + 2])
            assert predicted.strip() and answer.startswith(predicted.strip()), (part, predicted)
            assert not any(ch.isdigit() for ch in predicting)
            assert tokenizer.decode(ids[:column + 1]).rstrip().endswith("#") or not predicting.strip()
            if kind == "sentencepiece":
                assert predicting.strip() == ""   # the lone space token
            else:
                assert predicting == "#"


# --------------------------------------------------------------------------------------------------
# The loss against a reference computation.


def tiny_codi(vocab: int, family: str = "gpt2", lora: bool = True, seed: int = 0) -> tuple[CodiModel, CodiConfig]:
    torch.manual_seed(seed)
    decoder = build_decoder(decoder_config(family, vocab_size=vocab, layers=2, hidden=16, heads=2, max_positions=96))
    options = CodiConfig(latents=3, projection_dim=24, lora=lora, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    if lora:
        decoder = with_adapters(decoder, options)
        with torch.no_grad():   # adapters that change the output (peft starts them at zero)
            for name, p in decoder.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
    model = CodiModel(decoder, build_projection(16, options)).eval()
    return model, options


def reference_loss(model: CodiModel, batch: dict, tokens, latents: int, fixed_mask: bool) -> torch.Tensor:
    """codi:src/model.py:262-400 on the reference's own tensors: the left-padded encoder `q <|bot|>`, the
    right-padded decoder `<|eot|> answer` and the right-padded teacher row. With `fixed_mask` the
    padding stays masked and positions start at each row's first token; without it, the reference's
    default: no positions, and no mask after the encoder pass."""
    from transformers import DynamicCache

    student, teacher = batch["student"], batch["teacher"]
    bot_column = int((student["input_ids"][0] == tokens.bot).nonzero()[0])
    encoder_ids, encoder_mask = student["input_ids"][:, :bot_column + 1], student["attention_mask"][:, :bot_column + 1]
    decoder_start = bot_column + 1 + latents
    decoder_ids, labels = student["input_ids"][:, decoder_start:], student["labels"][:, decoder_start:]
    decoder, prj = model.decoder, model.projection
    cache = DynamicCache(config=model.config)
    positions = (encoder_mask.cumsum(1) - 1).clamp(min=0) if fixed_mask else None
    out = decoder(input_ids=encoder_ids, attention_mask=encoder_mask, position_ids=positions, cache=cache,
                  use_cache=True, output_hidden_states=True)
    latent = prj(out.hidden_states[-1][:, -1:])
    mask = encoder_mask
    for _ in range(latents):
        if fixed_mask:
            mask, positions = torch.cat((mask, torch.ones_like(mask[:, :1])), 1), positions[:, -1:] + 1
        out = decoder(inputs_embeds=latent, attention_mask=mask if fixed_mask else None, position_ids=positions,
                      cache=cache, use_cache=True, output_hidden_states=True)
        latent = prj(out.hidden_states[-1][:, -1:])
    if fixed_mask:
        mask = torch.cat((mask, torch.ones_like(decoder_ids)), 1)
        positions = positions[:, -1:] + torch.arange(1, decoder_ids.size(1) + 1)
    out = decoder(inputs_embeds=model.get_input_embeddings()(decoder_ids), attention_mask=mask if fixed_mask else None,
                  position_ids=positions, cache=cache, use_cache=True, output_hidden_states=True)
    with torch.no_grad():
        ref = decoder(input_ids=teacher["input_ids"], output_hidden_states=True)
    ref_with_grad = decoder(input_ids=teacher["input_ids"])
    model_position = student["distill"] - decoder_start
    distill = 0
    for hidden, ref_hidden in zip(out.hidden_states, ref.hidden_states):
        ref_selected = ref_hidden.gather(1, teacher["distill"][:, None, None].expand(-1, -1, ref_hidden.size(-1)))
        selected = hidden.gather(1, model_position[:, None, None].expand(-1, -1, hidden.size(-1)))
        distill = distill + F.smooth_l1_loss(selected, ref_selected.detach()) / ref_selected.std()
    distill = distill / len(out.hidden_states)
    vocab = out.logits.size(-1)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref_ce = F.cross_entropy(ref_with_grad.logits[:, :-1].reshape(-1, vocab), teacher["labels"][:, 1:].reshape(-1),
                             ignore_index=-100)
    return ce + distill + ref_ce


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("reference_masking", [False, True])
def test_the_loss_and_its_gradients_equal_the_reference_computation(family, reference_masking):
    tokenizer, tokens, features, _ = encoded("word")
    model, options = tiny_codi(len(tokenizer), family)
    options = replace(options, reference_masking=reference_masking)
    batch = collate_codi(features, tokenizer, options, tokens, tokenizer.eos_token_id)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all("lora_" in n or n.startswith("projection") for n, p in model.named_parameters()
                           if p.requires_grad)   # the base, embeddings and head are frozen
    ours = codi_loss(model, batch, options, tokens.latent)
    ours_grads = torch.autograd.grad(ours["loss"], trained)
    theirs = reference_loss(model, batch, tokens, options.latents, fixed_mask=not reference_masking)
    theirs_grads = torch.autograd.grad(theirs, trained)
    assert torch.allclose(ours["loss"], theirs, atol=1e-5, rtol=1e-5), (ours["loss"], theirs)
    for a, b in zip(ours_grads, theirs_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert ours["distill_loss"] > 0 and ours["teacher_loss"] > 0 and ours["student_loss"] > 0
    # One teacher pass gives the same loss without dropout, with one forward fewer.
    calls = []
    handle = model.base.register_forward_hook(lambda *args: calls.append(1))
    one = codi_loss(model, batch, replace(options, teacher_passes=1), tokens.latent)
    one_calls = len(calls)
    codi_loss(model, batch, options, tokens.latent)
    handle.remove()
    assert torch.allclose(one["loss"], ours["loss"], atol=1e-6)
    assert len(calls) - one_calls == one_calls + 1


@pytest.mark.parametrize("family,targets", [("gpt2", {"c_attn", "c_proj", "c_fc"}),
                                             ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                        "down_proj", "gate_proj"})])
def test_adapters_sit_on_the_reference_modules_of_each_family(family, targets):
    model, _ = tiny_codi(50, family)
    adapted = {name.split(".")[-1] for name, module in model.decoder.named_modules() if hasattr(module, "lora_A")}
    assert adapted == targets
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert any("embed" in name or "wte" in name for name in frozen)


def test_activation_checkpointing_recomputes_the_prefix_and_gives_the_same_loss():
    tokenizer, tokens, features, _ = encoded("word")
    model, options = tiny_codi(len(tokenizer))
    batch = collate_codi(features, tokenizer, options, tokens, tokenizer.eos_token_id)
    cached = codi_loss(model, batch, options, tokens.latent)
    from icot.models.decoder import set_gradient_checkpointing

    set_gradient_checkpointing(model.base, True)
    model.train()   # dropout is 0: only the cache differs
    assert model.is_activation_checkpointing
    recomputed = codi_loss(model, batch, options, tokens.latent)
    for key in ("loss", "student_loss", "distill_loss", "teacher_loss"):
        assert torch.allclose(recomputed[key], cached[key], atol=1e-5), key


def test_l2_divides_by_the_teacher_std_twice():
    from icot.methods.codi.stage import distillation_loss

    torch.manual_seed(0)
    student, teacher = [torch.randn(3, 5, 4)], [torch.randn(3, 6, 4)]
    columns_s, columns_t = torch.tensor([1, 2, 4]), torch.tensor([0, 5, 3])
    picked_t = teacher[0][torch.arange(3), columns_t]
    picked_s = student[0][torch.arange(3), columns_s]
    got = distillation_loss(student, columns_s, teacher, columns_t, "l2", True)
    assert torch.allclose(got, F.mse_loss(picked_s, picked_t) / picked_t.std() ** 2)
    got = distillation_loss(student, columns_s, teacher, columns_t, "smooth_l1", False)
    assert torch.allclose(got, F.smooth_l1_loss(picked_s, picked_t))


# --------------------------------------------------------------------------------------------------
# Inference: the answer does not depend on the batch.


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_example_alone_and_in_a_left_padded_batch_decodes_alike(family):
    tokenizer, tokens, features, _ = encoded("word", fixtures.MULTIPLICATION_LINES + fixtures.GSM8K_LINES)
    model, options = tiny_codi(len(tokenizer), family)
    mode = CodiModeModel("codi", model, tokenizer, options=options)
    short = min(range(len(features)), key=lambda i: int(features[i]["prompt_len"]))
    together = mode.generate(collate_generate(features, tokenizer.eos_token_id), 12)
    alone = mode.generate(collate_generate([features[short]], tokenizer.eos_token_id), 12)
    assert together[short] == alone[0]
    assert all(together[i] == mode.generate(collate_generate([f], tokenizer.eos_token_id), 12)[0]
               for i, f in enumerate(features))

    def last_logits(batch, masking):
        inputs = inference_batch(batch, options.latents, tokens, masking)
        from icot.models.thoughts import thought_forward

        return thought_forward(model, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
                               tokens.latent, use_cache=True, feedback=model.projection,
                               later_mask=inputs.get("later_mask")).logits[:, -1]

    padded, single = collate_generate(features, tokenizer.eos_token_id), collate_generate([features[short]], 0)
    single = collate_generate([features[short]], tokenizer.eos_token_id)
    assert torch.allclose(last_logits(padded, False)[short], last_logits(single, False)[0], atol=1e-5)
    # The reference's masking reads the padding: the same example gets other logits in a batch.
    assert not torch.allclose(last_logits(padded, True)[short], last_logits(single, True)[0], atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Training runs: 3x3 multiplication, the shared teacher, 3 latents, a small projection and LoRA.

CODI = {"start": "teacher", "latents": 3, "projection_dim": 48, "lora_r": 8, "lora_alpha": 16}
TAGS = ("train/loss", "train/grad_norm", "train/distill_loss", "train/teacher_loss", "valid/loss",
        "valid/token_accuracy")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    folder = make_workspace(tmp_path_factory.mktemp("codi"), train=128, valid=8, test=9)
    write_recipe(folder, methods=["codi"], codi=CODI,
                 train={"max_steps": 12, "save_every": 4, "eval_every": 6, "export_best": True})
    run_train(folder, "teacher", folder / "recipe.yaml")
    return folder


@pytest.fixture(scope="module")
def straight(ws) -> dict:
    run_train(ws, "codi", ws / "recipe.yaml", "--run_dir=straight", f"--inputs.start.dir={ws / 'run/teacher'}")
    return read_scalars(ws / "straight/codi/tb")


def test_a_codi_run_exports_a_merged_model_and_the_adapters_that_answer_alike(ws, straight):
    root = ws / "straight/codi"
    assert stage_folder_problems(root, "codi") == []
    assert all(np.isfinite(v) for _, v in straight["train/distill_loss"])
    export = root / "export"
    description = json.loads((export / "icot_component.json").read_text())
    assert description["codi"]["latents"] == 3 and description["codi"]["tokens"] == ["<|bot|>", "<|eot|>",
                                                                                       "<|latent|>"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from icot.data.tokenizer_build import load_tokenizer
    from icot.evaluate import load_eval_set, load_mode_model
    from icot.methods.codi.model import PROJECTION_FILE
    merged = AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
    assert type(merged).__name__ == "GPT2LMHeadModel"
    assert not any("lora" in name for name in merged.state_dict())
    # The adapters alone, loaded as their README says: the base their config names (the teacher's export,
    # absolute), grown to the export's rows, whose new rows come with the adapters.
    tokenizer = load_tokenizer(export / "adapter", "the adapter export")
    base_path = json.loads((export / "adapter/adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base_path) == (ws / "run/teacher/export").resolve()
    rows = merged.get_input_embeddings().weight.shape[0]
    assert f"base.resize_token_embeddings({rows})" in (export / "adapter/README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True)
    base.resize_token_embeddings(rows)
    adapted = PeftModel.from_pretrained(base, export / "adapter")
    assert torch.equal(adapted.get_input_embeddings().weight, merged.get_input_embeddings().weight)
    from safetensors.torch import load_file

    options = CodiConfig(latents=3, projection_dim=48)
    projection = build_projection(32, options)
    projection.load_state_dict(load_file(export / "adapter" / PROJECTION_FILE))
    unmerged = CodiModeModel("codi", CodiModel(adapted, projection).eval(), tokenizer, options=options)
    reloaded = load_mode_model("codi", ws / "straight")
    features = load_eval_set(ws / "data/test.txt", tokenizer)
    batch = collate_generate(features, tokenizer.eos_token_id)
    with torch.no_grad():
        assert reloaded.generate(batch, 16) == unmerged.generate(batch, 16)
        assert torch.allclose(reloaded.model(input_ids=batch["input_ids"]).logits,
                              unmerged.model(input_ids=batch["input_ids"]).logits, atol=1e-4)
    evaluated = subprocess.run([sys.executable, "-m", "icot", "eval", "--mode", "codi", "--run_dir", "straight",
                                "--data", "data/test.txt", "--out", "eval.json"], cwd=ws, env=icot_env(),
                               capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads((ws / "eval.json").read_text())
    assert result["examples"] == 9 and result["mode"] == "codi" and 0 < result["token_accuracy"] <= 1
    assert "accuracy_last_number" in result


def test_a_stop_mid_run_resumes_with_the_same_losses(ws, straight):
    overrides = ["--run_dir=stopped", f"--inputs.start.dir={ws / 'run/teacher'}"]
    code, _ = launch_and_signal(ws, "codi", ws / "recipe.yaml", *overrides, sig=signal.SIGTERM, at_step=5,
                                log_name="stopped")
    assert code == 0
    assert (ws / "stopped/codi/PREEMPTED").exists()
    run_train(ws, "codi", ws / "recipe.yaml", *overrides)
    got = read_scalars(ws / "stopped/codi/tb")
    for tag in TAGS:
        assert got[tag] == straight[tag], tag


def test_zero3_bf16_activation_checkpointing_on_two_ranks(ws):
    overrides = ["--run_dir=zero3", f"--inputs.start.dir={ws / 'run/teacher'}", "--train.zero_stage=3",
                 "--train.precision=bf16", "--model.gradient_checkpointing=true", "--train.max_steps=6"]
    run_train(ws, "codi", ws / "recipe.yaml", *overrides, nproc=2)
    root = ws / "zero3/codi"
    assert stage_folder_problems(root, "codi") == []
    assert json.loads((root / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    got = read_scalars(root / "tb")
    assert all(np.isfinite(value) for _, value in got["train/loss"])
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(root / "export", local_files_only=True)
    assert merged.get_input_embeddings().weight.shape[0] == json.loads((root / "export/config.json").read_text())["vocab_size"]


def test_a_llama_from_scratch_with_the_reference_masking(ws):
    overrides = ["--run_dir=llama", "--codi.start=base", "--model.family=llama", "--train.max_steps=4",
                 "--codi.reference_masking=true", "--codi.teacher_passes=1", "--codi.export_adapter=false"]
    run_train(ws, "codi", ws / "recipe.yaml", *overrides)
    root = ws / "llama/codi"
    assert stage_folder_problems(root, "codi") == []
    assert not (root / "export/adapter").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "export", local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    # With the adapter export asked for, a base built from scratch in the run has no folder to load into: the
    # export says so instead of pointing at nothing.
    run_train(ws, "codi", ws / "recipe.yaml", *[o for o in overrides if "export_adapter" not in o],
              "--run_dir=llama-adapter")
    description = json.loads((ws / "llama-adapter/codi/export/icot_component.json").read_text())
    assert not (ws / "llama-adapter/codi/export/adapter").exists()
    assert description["adapter"] is None and "built from scratch" in description["adapter_note"]
    assert json.loads((root / "export/icot_component.json").read_text())["codi"]["reference_masking"] is True


def test_the_reference_masking_under_activation_checkpointing_is_refused_before_training(ws):
    refused = run_train(ws, "codi", ws / "recipe.yaml", "--run_dir=refused", f"--inputs.start.dir={ws / 'run/teacher'}",
                        "--codi.reference_masking=true", "--model.gradient_checkpointing=true", check=False)
    assert refused.returncode != 0
    assert "codi.reference_masking needs the KV cache" in refused.stderr
    assert not (ws / "refused/codi/ckpt").exists()

