"""The evaluation harness (`icot eval`, `icot.evaluate.evaluate_mode`) against direct reference computations.

A tiny run is built once per module: a word tokenizer and 2x2 + 3x2 multiplication data (the test file
alternates them, so prompts get left padded and answers differ in length); a teacher (with-CoT view), a
no-CoT decoder and a coupled emulator + student, each trained a few dozen AdamW steps by hand and saved
as the stages export them (`<run>/teacher/export`, `<run>/no_cot/export`,
`<run>/coupling/export/{emulator,student}`, tokenizer beside each component).

The reference decodes each example on its own, unpadded, without a KV cache and without `generate`:
the whole sequence is re-run at every step (for implicit: the student fed with the emulator's states of
the prompt), until the mode's number of separators. Answers are compared as text after `####`.
Because a model this small rarely answers right, a second data file replaces some answers by what the
reference decoded, which gives a known non-zero accuracy.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from icot.data.multiply import generate_splits
from icot.data.reader import iter_examples
from icot.data.tokenizer_build import build_tokenizer
from icot.data.views import encode_batch
from icot.errors import UserError
from icot.data.collate import rank_batches
from icot.evaluate import (MAX_NEW_TOKENS_MARGIN, answers_match, evaluate_cli, evaluate_mode, fit_positions,
                           generated_answer)
from icot.models.coupled import CoupledModel
from icot.models.decoder import build_decoder, decoder_config
from icot.models.emulator import Emulator
from icot.models.io import save_component
from icot.models.student import Student

ROOT = Path(__file__).resolve().parent.parent
MODES = ("no_cot", "explicit", "implicit")   # the built-in modes, checked against the registry below
TEST_EXAMPLES = 9  # odd: two ranks get unequal shards
SEPARATORS = {"no_cot": 1, "explicit": 2, "implicit": 1}


# --------------------------------------------------------------------------------------------------
# The tiny run.


def _tiny_decoder(tokenizer, seed):
    torch.manual_seed(seed)
    return build_decoder(decoder_config("gpt2", vocab_size=len(tokenizer), layers=2, hidden=32, heads=2,
                                        max_positions=64, eos_token_id=tokenizer.eos_token_id))


def _train(model, batches, loss_fn, steps, lr=3e-3):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        loss = loss_fn(model, batches[step % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _batches(encoded, view, sep, size=16):
    from icot.data.collate import collate_train

    features = [{"cot_ids": c, "nocot_ids": n, "prompt_len": p}
                for c, n, p in zip(encoded["cot_ids"], encoded["nocot_ids"], encoded["prompt_len"])]
    return [collate_train(features[i:i + size], view, sep) for i in range(0, len(features), size)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is many times faster than two fighting for cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_run")
    # Two operand shapes, so that prompts are left padded and answers differ in length.
    shapes = {"2x2": (2, 2, 5), "3x2": (3, 2, 4)}
    files = {name: generate_splits(root / name, a, b, {"train": 64, "test": n}, seed=3)
             for name, (a, b, n) in shapes.items()}
    train_lines = [line for f in files.values() for line in f["train"].read_text().splitlines()]
    test_lines = [files["2x2"]["test"].read_text().splitlines(), files["3x2"]["test"].read_text().splitlines()]
    interleaved = [line for pair in zip(*test_lines) for line in pair] + test_lines[0][len(test_lines[1]):]
    (root / "train.txt").write_text("\n".join(train_lines) + "\n")
    (root / "test.txt").write_text("\n".join(interleaved) + "\n")
    tokenizer = build_tokenizer([root / "train.txt", root / "test.txt"], kind="word", out=root / "tok")
    sep = tokenizer.eos_token_id
    examples = [e for _, e in iter_examples(root / "train.txt")]
    encoded = encode_batch(tokenizer, [e.question for e in examples], [e.cot for e in examples],
                           [e.answer for e in examples])
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    encoded = {key: [values[i] for i in order] for key, values in encoded.items()}
    cot, nocot = _batches(encoded, "cot", sep), _batches(encoded, "nocot", sep)

    def lm_loss(model, b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    torch.manual_seed(0)
    teacher = _train(_tiny_decoder(tokenizer, 1), cot, lm_loss, 80)
    no_cot = _train(_tiny_decoder(tokenizer, 2), nocot, lm_loss, 80)
    torch.manual_seed(3)
    coupled = CoupledModel(Emulator(copy.deepcopy(teacher)), Student(copy.deepcopy(no_cot)))
    _train(coupled, nocot, lambda m, b: m(b["input_ids"], b["attention_mask"], b["first_sep"],
                                          labels=b["labels"]).loss, 40)

    run = root / "run"
    for folder, module in ((run / "teacher/export", teacher), (run / "no_cot/export", no_cot),
                           (run / "coupling/export/emulator", coupled.emulator),
                           (run / "coupling/export/student", coupled.student)):
        save_component(module, folder)
        tokenizer.save_pretrained(str(folder))
    models = {"no_cot": no_cot, "explicit": teacher, "implicit": coupled}
    return {"root": root, "run": run, "test": root / "test.txt", "tokenizer": tokenizer, "models": models}


# --------------------------------------------------------------------------------------------------
# The reference computation: one example at a time, whole sequence re-run at each step.


VIEW = {"no_cot": "nocot", "explicit": "cot", "implicit": "nocot"}


def _encode(tokenizer, path):
    examples = [e for _, e in iter_examples(path)]
    encoded = encode_batch(tokenizer, [e.question for e in examples], [e.cot for e in examples],
                           [e.answer for e in examples])
    return examples, encoded


@torch.no_grad()
def _logits(mode, model, ids, prompt_len, states=None):
    if mode == "implicit":
        return model.student(ids, torch.ones_like(ids), torch.tensor([prompt_len - 1]), states).logits
    return model(input_ids=ids).logits


@torch.no_grad()
def reference_decode(mode, model, prompt, sep, cap):
    ids = torch.tensor([prompt])
    states = None
    if mode == "implicit":
        states = model.emulator(ids, torch.ones_like(ids), torch.tensor([len(prompt) - 1])).states
    new = []
    for _ in range(cap):
        token = int(_logits(mode, model, ids, len(prompt), states)[0, -1].argmax())
        new.append(token)
        ids = torch.cat((ids, torch.tensor([[token]])), dim=1)
        if new.count(sep) == SEPARATORS[mode]:
            break
    return new


def reference_answer(tokenizer, ids):
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text.split("####", 1)[1].strip().replace(",", "") if "####" in text else None


@torch.no_grad()
def reference_token_accuracy(mode, model, encoded):
    correct = total = 0
    for cot_ids, nocot_ids, prompt_len in zip(encoded["cot_ids"], encoded["nocot_ids"], encoded["prompt_len"]):
        sequence = cot_ids if VIEW[mode] == "cot" else nocot_ids
        ids = torch.tensor([sequence])
        states = None
        if mode == "implicit":
            prompt = ids[:, :prompt_len]
            states = model.emulator(prompt, torch.ones_like(prompt), torch.tensor([prompt_len - 1])).states
        predicted = _logits(mode, model, ids, prompt_len, states)[0].argmax(-1).tolist()
        for t in range(prompt_len - 1, len(sequence) - 1):
            correct += predicted[t] == sequence[t + 1]
            total += 1
    return correct / total


@pytest.fixture(scope="module")
def references(tiny_run):
    """Per mode: the cap, each example's reference answer, the reference accuracy and token accuracy."""
    tokenizer = tiny_run["tokenizer"]
    examples, encoded = _encode(tokenizer, tiny_run["test"])
    out = {}
    for mode in MODES:
        model = tiny_run["models"][mode]
        view_ids = encoded["cot_ids"] if VIEW[mode] == "cot" else encoded["nocot_ids"]
        cap = max(len(ids) - p for ids, p in zip(view_ids, encoded["prompt_len"])) + MAX_NEW_TOKENS_MARGIN
        generated = [reference_decode(mode, model, nocot[:p], tokenizer.eos_token_id, cap)
                     for nocot, p in zip(encoded["nocot_ids"], encoded["prompt_len"])]
        answers = [reference_answer(tokenizer, ids) for ids in generated]
        out[mode] = {"cap": cap, "answers": answers, "lengths": [len(ids) for ids in generated],
                     "accuracy": sum(a == e.answer for a, e in zip(answers, examples)) / len(examples),
                     "token_accuracy": reference_token_accuracy(mode, model, encoded)}
    return out


def mixed_file(tiny_run, references, mode) -> tuple[Path, float]:
    """The test file with every other answer replaced by the reference's answer where that is a number;
    returns the file and the accuracy the reference then has on it."""
    lines = Path(tiny_run["test"]).read_text().splitlines()
    answers = references[mode]["answers"]
    out, correct = [], 0
    for index, (line, answer) in enumerate(zip(lines, answers)):
        if index % 2 == 0 and answer and re.fullmatch(r"\d+( \d+)*", answer):
            line = line.split("####", 1)[0] + "#### " + answer
        correct += answer == line.split("####", 1)[1].strip()
        out.append(line)
    path = tiny_run["root"] / f"mixed_{mode}.txt"
    path.write_text("\n".join(out) + "\n")
    return path, correct / len(lines)


# --------------------------------------------------------------------------------------------------
# Pure pieces.


def test_answers_are_compared_after_the_marker_without_commas(tiny_run):
    tokenizer = tiny_run["tokenizer"]
    ids = tokenizer(" 1 2 <|endoftext|> #### 3 4 <|endoftext|>", add_special_tokens=False)["input_ids"]
    assert generated_answer(tokenizer, ids) == "3 4"
    assert answers_match(tokenizer, ids, "3 4") and answers_match(tokenizer, ids, " 3 4 ")
    assert not answers_match(tokenizer, ids, "3 5")
    assert generated_answer(tokenizer, tokenizer(" 1 2", add_special_tokens=False)["input_ids"]) is None


def test_the_last_number_rule_reads_the_last_number_against_a_numeric_gold_answer():
    from icot.evaluate import last_number_matches

    class Text:   # a tokenizer whose ids are the text itself
        def decode(self, ids, skip_special_tokens=True):
            return ids

    assert last_number_matches(Text(), "<<2*3=6>> so 1,050 #### 1050", "1050") is True
    assert last_number_matches(Text(), "#### 1050 and 7", "1050") is False   # the last number counts
    assert last_number_matches(Text(), "#### 12.0", "12") is True            # compared as floats
    assert last_number_matches(Text(), "no number", "5") is False
    assert last_number_matches(Text(), "#### 8 5 6", "8 5 6") is None        # gold is not one number


@pytest.mark.parametrize("n,batch,world", [(9, 2, 2), (9, 4, 3), (1, 4, 2), (8, 1, 1), (5, 32, 4)])
def test_shards_cover_every_example_once_with_the_same_number_of_batches(n, batch, world):
    shards = [rank_batches(n, batch, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1
    seen = sorted(i for s in shards for rows in s for i in rows)
    assert seen == list(range(n))
    assert all(len(rows) <= batch for s in shards for rows in s)


def test_the_data_derived_cap_is_lowered_to_the_positions_left_and_a_given_one_is_checked():
    from types import SimpleNamespace

    decoder = SimpleNamespace(config=SimpleNamespace(n_positions=20))
    features = [{"prompt_len": 8}, {"prompt_len": 12}]
    assert fit_positions(decoder, features, 8, given=False) == 8
    assert fit_positions(decoder, features, 15, given=False) == 8
    with pytest.raises(UserError, match="exceeds the model's 20 positions"):
        fit_positions(decoder, features, 15, given=True)
    with pytest.raises(UserError, match="exceeds"):
        fit_positions(decoder, [{"prompt_len": 20}], 1, given=False)


# --------------------------------------------------------------------------------------------------
# The harness against the reference.


@pytest.mark.parametrize("mode", MODES)
def test_harness_matches_one_by_one_reference(tiny_run, references, mode):
    ref = references[mode]
    result = evaluate_mode(mode, tiny_run["run"], tiny_run["test"], batch_sizes=(1, 4), return_predictions=True)
    assert result["examples"] == TEST_EXAMPLES
    assert result["max_new_tokens"] == ref["cap"]   # longest reference continuation + margin
    assert result["predictions"] == ref["answers"]
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == pytest.approx(ref["accuracy"])
    assert result["accuracy_by_batch_size"]["1"] == result["accuracy_by_batch_size"]["4"]
    assert result["token_accuracy"] == pytest.approx(ref["token_accuracy"])
    assert result["batch_size"] == 4 and result["examples_per_s_batch1"] > 0 and result["examples_per_s_batched"] > 0
    for key in ("accuracy", "token_accuracy", "examples", "examples_per_s_batch1", "examples_per_s_batched",
                "batch_size", "seconds"):
        assert key in result

    # A known non-zero accuracy: some answers replaced by what the model answers.
    path, expected = mixed_file(tiny_run, references, mode)
    assert expected > 0, ref["answers"]
    for sizes in ((1,), (3,)):
        mixed = evaluate_mode(mode, tiny_run["run"], path, batch_sizes=sizes, max_new_tokens=ref["cap"])
        assert mixed["accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("mode", MODES)
def test_compiled_decoding_gives_the_reference_answers(tiny_run, references, mode):
    """`--decoding compiled` (a static KV cache and a compiled step) answers as the one-by-one reference,
    at batch 1 and batched (the last batch has another shape: it is compiled in the warm-up too)."""
    result = evaluate_mode(mode, tiny_run["run"], tiny_run["test"], batch_sizes=(1, 3), return_predictions=True,
                           decoding="compiled")
    assert result["decoding"] == "compiled"
    assert result["predictions"] == references[mode]["answers"]
    assert result["accuracy_by_batch_size"]["1"] == result["accuracy_by_batch_size"]["3"]


def test_folders_can_be_named_by_run_stage_or_export(tiny_run, references):
    run = tiny_run["run"]
    for folder in (run / "no_cot", run / "no_cot/export"):
        result = evaluate_mode("no_cot", folder, tiny_run["test"], batch_sizes=(4,), max_examples=3,
                               return_predictions=True)
        assert result["examples"] == 3 and result["examples_per_s_batch1"] is None
        assert result["predictions"] == references["no_cot"]["answers"][:3]


def test_a_coconut_list_or_a_dataset_folder_is_evaluated_as_its_text_lines(tiny_run, references, tmp_path):
    import datasets

    records = [{"question": e.question, "steps": e.cot.split(" "), "answer": e.answer}
               for _, e in iter_examples(tiny_run["test"])]
    coconut = tmp_path / "test.json"
    coconut.write_text(json.dumps(records))
    folder = tmp_path / "test_dataset"
    datasets.Dataset.from_list(records).save_to_disk(str(folder))
    for path in (coconut, folder):
        result = evaluate_mode("no_cot", tiny_run["run"], path, batch_sizes=(4,), max_examples=3,
                               return_predictions=True)
        assert result["predictions"] == references["no_cot"]["answers"][:3]


# --------------------------------------------------------------------------------------------------
# Command line.


def test_cli_prints_and_writes_json_and_tensorboard(tiny_run, references, tmp_path, capsys):
    out, tb = tmp_path / "sub/result.json", tmp_path / "tb"
    evaluate_cli(["--mode", "explicit", f"--run_dir={tiny_run['run']}", "--data", str(tiny_run["test"]),
                  "--batch_size", "4", "--out", str(out), "--tb", str(tb)])
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written
    assert written["mode"] == "explicit" and written["examples"] == TEST_EXAMPLES
    assert written["accuracy"] == pytest.approx(references["explicit"]["accuracy"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    tags = events.Tags()["scalars"]
    for key in ("accuracy", "token_accuracy", "examples_per_s_batch1", "examples_per_s_batched"):
        assert f"eval/explicit/{key}" in tags
    assert events.Scalars("eval/explicit/accuracy")[0].value == pytest.approx(written["accuracy"])


@pytest.mark.parametrize("argv,message", [
    (["--mode", "cot"], r"invalid choice: 'cot'"),
    (["--mode", "no_cot", "--run_dir", "nowhere"], r"nowhere/no_cot/export: no no_cot export"),
    (["--mode", "implicit", "--model", "nowhere"], r"nowhere: no such folder"),
    (["--mode", "no_cot"], r"give --run_dir RUN or --model PATH"),
    (["--mode", "no_cot", "--run_dir", "RUN", "--batch_size", "0"], r"--batch_size must be at least 1"),
    (["--mode", "no_cot", "--run_dir", "RUN", "--batch_size", "two"], r"invalid int value"),
])
def test_cli_user_errors_are_one_line(tiny_run, argv, message):
    argv = [a.replace("RUN", str(tiny_run["run"])) for a in argv] + ["--data", str(tiny_run["test"])]
    with pytest.raises(UserError, match=message) as caught:
        evaluate_cli(argv)
    assert "\n" not in str(caught.value)


def test_cli_rejects_a_folder_of_the_wrong_component(tiny_run):
    with pytest.raises(UserError, match="holds a student, expected a decoder"):
        evaluate_cli(["--mode", "no_cot", "--model", str(tiny_run["run"] / "coupling/export/student"),
                      "--data", str(tiny_run["test"])])
    with pytest.raises(UserError, match="no such data file"):
        evaluate_cli(["--mode", "no_cot", "--run_dir", str(tiny_run["run"]), "--data", "missing.txt"])


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    return env


def test_icot_eval_bad_mode_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "icot", "eval", "--mode", "bogus", "--data", "x", "--run_dir", "r"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_clean_env())
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [errors[-1]] and errors[-1].startswith("icot: error: icot eval: argument --mode"), proc.stderr


def test_two_ranks_give_the_same_result_as_one(tiny_run, references, tmp_path):
    """Nine examples over two ranks: shards of 5 (the 2x2 examples) and 4 (the 3x2 ones), so one rank runs
    a padding batch and the ranks stop generating at different steps; decoding is rank-synchronised."""
    assert len(set(references["implicit"]["lengths"])) > 1   # ranks finish at different steps
    path, expected = mixed_file(tiny_run, references, "implicit")
    cap = str(references["implicit"]["cap"])
    one = evaluate_mode("implicit", tiny_run["run"] / "coupling/export", path, batch_sizes=(1, 2),
                        max_new_tokens=int(cap))
    out = tmp_path / "two.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "icot",
               "eval", "--mode", "implicit", "--model", str(tiny_run["run"] / "coupling/export"), "--data", str(path),
               "--batch_size", "2", "--max_new_tokens", cap, "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_clean_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    two = json.loads(out.read_text())
    shown = (one, two, proc.stderr[-2000:])
    assert two["world_size"] == 2 and one["world_size"] == 1, shown
    assert two["examples"] == one["examples"] == TEST_EXAMPLES, shown
    assert two["accuracy"] == pytest.approx(one["accuracy"]) == pytest.approx(expected), shown
    assert two["accuracy_by_batch_size"] == pytest.approx(one["accuracy_by_batch_size"]), shown
    assert two["token_accuracy"] == pytest.approx(one["token_accuracy"]), shown
