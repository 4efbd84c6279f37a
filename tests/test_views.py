import logging
import os
import time

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from icot.data.tokenizer_build import EOS_TOKEN, UNK_TOKEN
from icot.data.views import (SequenceFormatError, encode_example, separator_positions, tokenize_dataset,
                             view_problem)
from icot.errors import UserError
from tests.tokenizer_fixtures import (GSM8K_LINES, MULTIPLICATION_LINES, SAMPLE_IDS, SAMPLE_LINES, TOKENIZER_KINDS, build, squash,
                              line_segments, read_lines, split_line)



def sample_dataset(lines=SAMPLE_LINES) -> datasets.Dataset:
    questions, cots, answers = zip(*(split_line(line) for line in lines))
    return datasets.Dataset.from_dict({"question": list(questions), "cot": list(cots), "answer": list(answers)})


def assert_views_are_well_formed(tokenizer, question, cot, answer):
    encoded = encode_example(tokenizer, question, cot, answer)
    eos = tokenizer.eos_token_id
    cot_ids, nocot_ids, prompt_len = encoded["cot_ids"], encoded["nocot_ids"], encoded["prompt_len"]
    first, second, third = separator_positions(cot_ids, eos, 3)
    assert (first, third) == (prompt_len - 1, len(cot_ids) - 1)
    assert separator_positions(nocot_ids, eos, 2) == [prompt_len - 1, len(nocot_ids) - 1]
    assert cot_ids.count(eos) == 3 and nocot_ids.count(eos) == 2
    assert cot_ids[:prompt_len] == nocot_ids[:prompt_len]
    assert squash(tokenizer.decode(cot_ids[:first])) == squash(question)
    assert squash(tokenizer.decode(cot_ids[first + 1:second])) == squash(cot)
    assert squash(tokenizer.decode(cot_ids[second + 1:third])) == squash(f"#### {answer}")
    assert cot_ids[second + 1:] == nocot_ids[prompt_len:]
    return encoded


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
@pytest.mark.parametrize("line", SAMPLE_LINES, ids=SAMPLE_IDS)
def test_views_hold_question_cot_answer_between_separators(tokenizers, kind, line):
    assert_views_are_well_formed(tokenizers[kind], *split_line(line))


def test_word_level_ids_match_the_hand_written_sequence(tokenizers):
    tokenizer = tokenizers["word"]
    vocab = tokenizer.get_vocab()
    question, cot, answer = split_line(MULTIPLICATION_LINES[1])  # 2 1 * 4 3||8 4 0 + 0 6 3 0 #### 8 0 4 0

    def ids(words):
        return [vocab[word] for word in words.split()]

    encoded = encode_example(tokenizer, question, cot, answer)
    eos = [tokenizer.eos_token_id]
    assert encoded["cot_ids"] == ids("2 1 * 4 3") + eos + ids("8 4 0 + 0 6 3 0") + eos + ids("#### 8 0 4 0") + eos
    assert encoded["nocot_ids"] == ids("2 1 * 4 3") + eos + ids("#### 8 0 4 0") + eos
    assert encoded["prompt_len"] == 6


def test_byte_level_bpe_splits_the_answer_marker_and_it_still_survives(tokenizers):
    tokenizer = tokenizers["bpe"]
    assert len(tokenizer(" ####", add_special_tokens=False)["input_ids"]) > 1
    encoded = assert_views_are_well_formed(tokenizer, *split_line(GSM8K_LINES[0]))
    assert tokenizer.decode(encoded["nocot_ids"]) == f" {split_line(GSM8K_LINES[0])[0]} {EOS_TOKEN} #### 7 {EOS_TOKEN}"


def test_separator_positions_count_occurrences_so_right_padding_is_harmless():
    ids = [5, 6, 0, 7, 0, 8, 0]
    assert separator_positions(ids, 0, 3) == [2, 4, 6]
    assert separator_positions(ids + [0, 0, 0], 0, 3) == [2, 4, 6]
    assert separator_positions(ids, 0, 1) == [2]
    with pytest.raises(ValueError, match="expected 4 separators .id 0., found 3"):
        separator_positions(ids, 0, 4)


def test_separator_positions_accept_tensors():
    torch = pytest.importorskip("torch")
    assert separator_positions(torch.tensor([3, 0, 4, 0, 0]), 0, 2) == [1, 3]


def test_a_separator_inside_the_question_is_reported_with_tokenizer_and_example(tokenizers):
    with pytest.raises(SequenceFormatError, match=r"tokenizer .*Mia reads.*with-CoT view has 4 separators, expected 3"):
        encode_example(tokenizers["bpe"], f"Mia reads {EOS_TOKEN} pages", "<<1+1=2>>", "2")


def test_a_tokenizer_that_loses_the_answer_marker_is_reported():
    vocab = {EOS_TOKEN: 0, UNK_TOKEN: 1, "1": 2, "+": 3, "2": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN)
    with pytest.raises(SequenceFormatError, match=r"'1 \+ 1'.*'####' does not survive tokenization"):
        encode_example(tokenizer, "1 + 1", "2", "2")


def test_a_tokenizer_without_eos_needs_an_explicit_separator():
    backend = Tokenizer(models.WordLevel({UNK_TOKEN: 0, "a": 1}, unk_token=UNK_TOKEN))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK_TOKEN)
    with pytest.raises(UserError, match="no EOS token"):
        encode_example(tokenizer, "a", "a", "a")


@pytest.mark.parametrize(("cot_ids", "nocot_ids", "problem"), [
    ([1, 0, 2, 0, 3, 0], [1, 0, 3, 0], None),
    ([1, 0, 2, 3, 0], [1, 0, 3, 0], "with-CoT view has 2 separators, expected 3"),
    ([1, 0, 2, 0, 3, 0], [1, 0, 3, 0, 0], "without-CoT view has 3 separators, expected 2"),
    ([1, 0, 2, 0, 0, 3], [1, 0, 3, 0], "with-CoT view does not end with the separator"),
    ([9, 0, 2, 0, 3, 0], [1, 0, 3, 0], "do not share the prompt prefix"),
])
def test_view_problems_name_what_is_wrong(cot_ids, nocot_ids, problem):
    found = view_problem(cot_ids, nocot_ids, separator_id=0)
    assert found == problem if problem is None else problem in found


def test_the_separator_can_be_overridden(tokenizers):
    tokenizer = build("word", line_segments(SAMPLE_LINES))
    tokenizer.add_special_tokens({"sep_token": "<sep>"})
    encoded = encode_example(tokenizer, "2 1 * 4 3", "8 4 0 + 0 6 3 0", "8 0 4 0", separator_id=tokenizer.sep_token_id)
    assert encoded["cot_ids"].count(tokenizer.sep_token_id) == 3
    assert tokenizer.eos_token_id not in encoded["cot_ids"]
    assert encoded["prompt_len"] == 6


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_tokenize_dataset_matches_encode_example_and_keeps_the_answer_text(tokenizers, kind):
    tokenizer = tokenizers[kind]
    tokenized = tokenize_dataset(sample_dataset(), tokenizer)
    assert sorted(tokenized.column_names) == ["answer", "cot_ids", "line", "nocot_ids", "prompt_len", "step_starts"]
    assert tokenized.features["answer"].dtype == "string"
    for row, line in zip(tokenized, SAMPLE_LINES):
        question, cot, answer = split_line(line)
        assert row == {**encode_example(tokenizer, question, cot, answer), "answer": answer, "line": None}


def test_tokenize_dataset_in_two_processes_gives_the_same_rows(tokenizers, tmp_path):
    dataset = sample_dataset(SAMPLE_LINES * 4)
    serial = tokenize_dataset(dataset, tokenizers["word"])
    parallel = tokenize_dataset(dataset, tokenizers["word"], num_proc=2, cache_dir=tmp_path)
    assert parallel.to_list() == serial.to_list()


def test_over_length_examples_are_dropped_and_counted(tokenizers, caplog):
    tokenizer = tokenizers["word"]
    lengths = [len(encode_example(tokenizer, *split_line(line))["cot_ids"]) for line in SAMPLE_LINES]
    limit = sorted(lengths)[2]
    with caplog.at_level(logging.WARNING, logger="icot.data.views"):
        tokenized = tokenize_dataset(sample_dataset(), tokenizer, max_length=limit)
    kept = sum(length <= limit for length in lengths)
    assert len(tokenized) == kept
    assert all(len(ids) <= limit for ids in tokenized["cot_ids"])
    expected = f"dropped {len(SAMPLE_LINES) - kept} of {len(SAMPLE_LINES)} examples longer than {limit} tokens"
    assert expected in caplog.text


def test_over_length_examples_can_stop_the_run(tokenizers):
    with pytest.raises(UserError, match=r"^sample\.txt: the with-CoT view has \d+ tokens, more than data\.max_length=5"):
        tokenize_dataset(sample_dataset(), tokenizers["word"], max_length=5, on_overlength="error", source="sample.txt")
    with pytest.raises(UserError, match="on_overlength"):
        tokenize_dataset(sample_dataset(), tokenizers["word"], on_overlength="truncate")


def cache_files(folder) -> dict[str, float]:
    return {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)}


def test_a_second_run_loads_the_cached_tokenization(tokenizers, tmp_path):
    tokenizer = tokenizers["sentencepiece"]
    dataset = sample_dataset(SAMPLE_LINES * 50)
    first = tokenize_dataset(dataset, tokenizer, cache_dir=tmp_path)
    written = cache_files(tmp_path)
    assert len(written) == 1
    tokenizer(["the tokenizer has been used in between"], padding=True)
    started = time.perf_counter()
    second = tokenize_dataset(dataset, tokenizer, cache_dir=tmp_path)
    assert time.perf_counter() - started < 1.0
    assert second._fingerprint == first._fingerprint
    assert [f["filename"] for f in second.cache_files] == [f["filename"] for f in first.cache_files]
    assert cache_files(tmp_path) == written  # nothing new written, nothing rewritten
    assert second.to_list() == first.to_list()


def test_another_tokenizer_or_setting_is_not_served_from_the_cache(tokenizers, tmp_path):
    dataset = sample_dataset()
    fingerprints = {
        tokenize_dataset(dataset, tokenizers["word"], cache_dir=tmp_path)._fingerprint,
        tokenize_dataset(dataset, tokenizers["bpe"], cache_dir=tmp_path)._fingerprint,
        tokenize_dataset(dataset, tokenizers["word"], cache_dir=tmp_path, max_length=1000)._fingerprint,
    }
    assert len(fingerprints) == 3
    assert len(os.listdir(tmp_path)) == 3


def test_a_dataset_on_disk_is_cached_beside_its_files(tokenizers, tmp_path):
    sample_dataset().save_to_disk(str(tmp_path / "raw"))
    dataset = datasets.load_from_disk(str(tmp_path / "raw"))
    first = tokenize_dataset(dataset, tokenizers["word"])
    second = tokenize_dataset(datasets.load_from_disk(str(tmp_path / "raw")), tokenizers["word"])
    assert first.cache_files and first.cache_files == second.cache_files
    assert first.cache_files[0]["filename"].startswith(str(tmp_path / "raw"))


@pytest.mark.parametrize("relative", ["4_by_4_mult/valid.txt", "gsm8k_aug/valid.txt"])
@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_reference_lines_tokenize_into_well_formed_views(kind, relative, reference_data):
    lines = read_lines(reference_data / relative, limit=200)
    tokenizer = build(kind, line_segments(lines))
    for line in lines[:40]:
        assert_views_are_well_formed(tokenizer, *split_line(line))
    tokenized = tokenize_dataset(sample_dataset(lines), tokenizer)
    assert len(tokenized) == len(lines)
    assert tokenized["answer"] == [split_line(line)[2] for line in lines]


def test_a_slow_sentencepiece_tokenizer_gives_the_fast_ids_and_is_cached(tmp_path):
    from transformers import SentencePieceBackend

    from icot.data.tokenizer_build import SENTENCEPIECE_MODEL_FILE, build_from_segments

    fast = build_from_segments(line_segments(SAMPLE_LINES), kind="sentencepiece", out=tmp_path / "spm", vocab_size=400)
    slow = SentencePieceBackend(vocab_file=str(tmp_path / "spm" / SENTENCEPIECE_MODEL_FILE), eos_token=EOS_TOKEN,
                                pad_token=EOS_TOKEN, unk_token=UNK_TOKEN)
    assert not slow.is_fast
    dataset = sample_dataset()
    first = tokenize_dataset(dataset, slow, cache_dir=tmp_path / "cache")
    assert first.to_list() == tokenize_dataset(dataset, fast).to_list()
    second = tokenize_dataset(dataset, slow, cache_dir=tmp_path / "cache")
    assert second.cache_files == first.cache_files
