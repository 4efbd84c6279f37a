import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from icot.data.collate import IGNORE_INDEX, collate_generate, collate_train, examples_at
from icot.data.tokenizer_build import EOS_TOKEN
from icot.data.views import encode_example, separator_positions, tokenize_dataset
from tests.tokenizer_fixtures import SAMPLE_LINES, TOKENIZER_KINDS, build, line_segments, read_lines, split_line, squash

SEP = 0
# Hand-written features: question [5, 6], CoT [7], answer [8, 9]; and question [4], CoT [7, 7, 7], answer [9].
HAND_FEATURES = [
    {"cot_ids": [5, 6, SEP, 7, SEP, 8, 9, SEP], "nocot_ids": [5, 6, SEP, 8, 9, SEP], "prompt_len": 3},
    {"cot_ids": [4, SEP, 7, 7, 7, SEP, 9, SEP], "nocot_ids": [4, SEP, 9, SEP], "prompt_len": 2},
]
X = IGNORE_INDEX



def encoded_lines(tokenizer, lines):
    return [encode_example(tokenizer, *split_line(line)) for line in lines]


def test_cot_view_by_hand():
    batch = collate_train(HAND_FEATURES, "cot", pad_id=SEP)
    assert batch["input_ids"].tolist() == [[5, 6, SEP, 7, SEP, 8, 9, SEP], [4, SEP, 7, 7, 7, SEP, 9, SEP]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 8]
    assert batch["labels"].tolist() == [[X, X, X, 7, SEP, 8, 9, SEP], [X, X, 7, 7, 7, SEP, 9, SEP]]
    assert batch["first_sep"].tolist() == [2, 1]
    assert batch["second_sep"].tolist() == [4, 5]


def test_nocot_view_by_hand_is_right_padded_with_eos():
    batch = collate_train(HAND_FEATURES, "nocot", pad_id=SEP)
    assert batch["input_ids"].tolist() == [[5, 6, SEP, 8, 9, SEP], [4, SEP, 9, SEP, SEP, SEP]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[X, X, X, 8, 9, SEP], [X, X, 9, SEP, X, X]]
    assert batch["first_sep"].tolist() == [2, 1]
    assert batch["second_sep"].tolist() == [5, 3]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_prompt_view_by_hand_has_no_labelled_tokens_and_no_second_separator():
    batch = collate_train(HAND_FEATURES, "prompt", pad_id=SEP)
    assert batch["input_ids"].tolist() == [[5, 6, SEP], [4, SEP, SEP]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[X, X, X], [X, X, X]]
    assert batch["first_sep"].tolist() == [2, 1]
    assert "second_sep" not in batch


def test_generation_batch_by_hand_is_left_padded():
    batch = collate_generate(HAND_FEATURES, pad_id=SEP)
    assert batch["input_ids"].tolist() == [[5, 6, SEP], [SEP, 4, SEP]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [1, 0, 1]]
    assert batch["first_sep"].tolist() == [2, 2]


def test_features_may_hold_tensors_and_unknown_views_are_named():
    features = [{key: torch.tensor(value) for key, value in feature.items()} for feature in HAND_FEATURES]
    assert collate_train(features, "cot", SEP)["labels"].equal(collate_train(HAND_FEATURES, "cot", SEP)["labels"])
    assert collate_generate(features, SEP)["input_ids"].equal(collate_generate(HAND_FEATURES, SEP)["input_ids"])
    with pytest.raises(ValueError, match="unknown view 'answer'"):
        collate_train(HAND_FEATURES, "answer", SEP)


def labelled_text(tokenizer, input_ids, labels) -> str:
    return tokenizer.decode(input_ids[labels != IGNORE_INDEX].tolist())


def assert_training_batches_are_right(tokenizer, lines):
    """Labels, separators and padding of all three views, against the text each line should give."""
    eos = tokenizer.eos_token_id
    features = encoded_lines(tokenizer, lines)
    views = {view: collate_train(features, view, pad_id=eos) for view in ("cot", "nocot", "prompt")}
    for row, line in enumerate(lines):
        question, cot, answer = split_line(line)
        expected_labels = {"cot": f"{cot} {EOS_TOKEN} #### {answer} {EOS_TOKEN}",
                           "nocot": f"#### {answer} {EOS_TOKEN}", "prompt": ""}
        for view, batch in views.items():
            ids, mask, labels = batch["input_ids"][row], batch["attention_mask"][row], batch["labels"][row]
            length = int(mask.sum())
            assert mask[:length].all() and not mask[length:].any()
            assert (ids[length:] == eos).all() and (labels[length:] == IGNORE_INDEX).all()
            first = int(batch["first_sep"][row])
            assert ids[first] == eos and (labels[:first + 1] == IGNORE_INDEX).all()
            assert squash(tokenizer.decode(ids[:first].tolist())) == squash(question)
            assert squash(labelled_text(tokenizer, ids, labels)) == squash(expected_labels[view])
            # Counting separators in the padded row finds the same positions: padding with EOS is harmless.
            if view != "prompt":
                second = int(batch["second_sep"][row])
                assert separator_positions(ids, eos, 2) == [first, second]
        cot_ids = views["cot"]["input_ids"][row]
        first, second = int(views["cot"]["first_sep"][row]), int(views["cot"]["second_sep"][row])
        assert squash(tokenizer.decode(cot_ids[first + 1:second].tolist())) == squash(cot)
        assert int(views["nocot"]["second_sep"][row]) == int(views["nocot"]["attention_mask"][row].sum()) - 1


def assert_generation_batch_is_right(tokenizer, lines):
    eos = tokenizer.eos_token_id
    features = encoded_lines(tokenizer, lines)
    batch = collate_generate(features, pad_id=eos)
    width = batch["input_ids"].shape[1]
    assert (batch["input_ids"][:, -1] == eos).all()
    assert batch["first_sep"].tolist() == [width - 1] * len(lines)
    for row, feature in enumerate(features):
        prompt_len = feature["prompt_len"]
        padding = width - prompt_len
        assert batch["input_ids"][row, padding:].tolist() == feature["nocot_ids"][:prompt_len]
        assert batch["input_ids"][row, padding:].tolist() == feature["cot_ids"][:prompt_len]
        assert batch["attention_mask"][row].tolist() == [0] * padding + [1] * prompt_len
        assert batch["position_ids"][row].tolist() == [1] * padding + list(range(prompt_len))


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_training_batches_of_mixed_lengths(tokenizers, kind):
    assert_training_batches_are_right(tokenizers[kind], SAMPLE_LINES)


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_generation_batches_of_mixed_lengths(tokenizers, kind):
    assert_generation_batch_is_right(tokenizers[kind], SAMPLE_LINES)


def test_left_padded_prompts_give_the_unpadded_next_token_logits(tokenizers):
    tokenizer = tokenizers["bpe"]
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=16, n_head=2, n_positions=256)
    model = GPT2LMHeadModel(config).eval()
    features = encoded_lines(tokenizer, SAMPLE_LINES)
    batch = collate_generate(features, pad_id=tokenizer.eos_token_id)
    with torch.no_grad():
        batched = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"]).logits[:, -1]
        for row, feature in enumerate(features):
            alone = model(input_ids=torch.tensor([feature["nocot_ids"][:feature["prompt_len"]]])).logits[0, -1]
            torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=1e-4)


def tokenized_sample(tokenizer):
    """SAMPLE_LINES as the tokenized `datasets.Dataset` the stages train on."""
    import datasets

    questions, cots, answers = zip(*(split_line(line) for line in SAMPLE_LINES))
    dataset = datasets.Dataset.from_dict({"question": questions, "cot": cots, "answer": answers})
    return tokenize_dataset(dataset, tokenizer)


def test_tokenized_dataset_rows_collate_directly(tokenizers):
    tokenized = tokenized_sample(tokenizers["word"])
    eos = tokenizers["word"].eos_token_id
    from_rows = collate_train(list(tokenized), "cot", pad_id=eos)
    torch_rows = tokenized.with_format("torch", columns=["cot_ids", "nocot_ids", "prompt_len"])
    from_tensors = collate_train(list(torch_rows), "cot", pad_id=eos)
    assert all(from_rows[key].equal(from_tensors[key]) for key in from_rows)


def test_examples_at_reads_the_rows_select_reads(tokenizers):
    import numpy as np

    tokenized = tokenized_sample(tokenizers["word"])
    tokenized = tokenized.add_column("row", list(range(len(tokenized))))   # as the state cache attaches it
    indices = np.array([2, 0, 2, 1])   # NumPy integers, any order, repeats: what a batch order holds
    rows = examples_at(tokenized, indices)
    assert rows == list(tokenized.select(indices.tolist()))
    assert [row["row"] for row in rows] == [2, 0, 2, 1]


@pytest.mark.parametrize("relative", ["4_by_4_mult/valid.txt", "gsm8k_aug/valid.txt"])
@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_reference_lines_collate_correctly(kind, relative, reference_data):
    lines = read_lines(reference_data / relative, limit=200)
    tokenizer = build(kind, line_segments(lines))
    batch_lines = sorted(lines[:16], key=len)[::3]  # different lengths in one batch
    assert_training_batches_are_right(tokenizer, batch_lines)
    assert_generation_batch_is_right(tokenizer, batch_lines)


def test_stage_batches_are_built_on_the_strategy_device():
    # Training and validation batches must follow the model onto the accelerator; "meta" stands in for
    # a device other than the CPU the collation runs on.
    from types import SimpleNamespace

    from icot.config import stage_config
    from icot.methods.icot_kd.mind_reading import MindReadingStage

    strategy = SimpleNamespace(device=torch.device("meta"))
    stage = MindReadingStage(stage_config("mind_reading"), strategy, SimpleNamespace(eos_token_id=SEP))
    features = [dict(f, answer="") for f in HAND_FEATURES]
    batch = stage.collate(features)
    assert sorted(batch) == ["cot", "nocot"]
    assert {t.device.type for view in batch.values() for t in view.values()} == {"meta"}
    prompts, _ = stage.generation_batch(features)
    assert {t.device.type for t in prompts.values()} == {"meta"}
