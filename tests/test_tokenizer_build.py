import json
import logging
import time

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from icot.cli import main as icot_main
from icot.data.tokenizer_build import (ANSWER_MARKER, EOS_TOKEN, UNK_TOKEN, SENTENCEPIECE_MODEL_FILE,
                                       build_tokenizer, check_sentencepiece_conversion, sentencepiece_minimum_vocab,
                                       word_vocabulary)
from icot.data.views import encode_example
from icot.errors import UserError
from tests.tokenizer_fixtures import GSM8K_LINES, MULTIPLICATION_LINES, SAMPLE_LINES, line_segments, split_line


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(SAMPLE_LINES) + "\n", encoding="utf-8")
    return path


def assert_loads_with_eos(folder):
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == EOS_TOKEN
    assert tokenizer.unk_token == UNK_TOKEN
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == EOS_TOKEN
    assert tokenizer(" 1 2", add_special_tokens=True)["input_ids"] == tokenizer(" 1 2", add_special_tokens=False)[
        "input_ids"], "no BOS/EOS may be added implicitly"
    return tokenizer


def test_word_level_tokenizer_is_saved_and_loaded_by_auto_tokenizer(data_file, tmp_path):
    built = build_tokenizer([data_file], kind="word", out=tmp_path / "word")
    loaded = assert_loads_with_eos(tmp_path / "word")
    assert loaded.get_vocab() == built.get_vocab()
    assert loaded.convert_tokens_to_ids([EOS_TOKEN, UNK_TOKEN, ANSWER_MARKER]) == [0, 1, 2]
    words = set(" ".join(line_segments(SAMPLE_LINES)).split())
    assert words <= set(loaded.get_vocab()) and len(loaded) == len(words) + 3
    ids = loaded("#### 7 zebra", add_special_tokens=False)["input_ids"]
    assert loaded.convert_ids_to_tokens(ids) == [ANSWER_MARKER, "7", UNK_TOKEN]
    assert loaded.decode(loaded(" 2 1 * 4 3 ", add_special_tokens=False)["input_ids"]) == "2 1 * 4 3"


def test_word_vocabulary_is_ordered_by_frequency_then_alphabetically_and_capped(caplog):
    segments = ["b a c", "a b", "a", f"{EOS_TOKEN} {ANSWER_MARKER}"]
    assert word_vocabulary(segments, 100) == {EOS_TOKEN: 0, UNK_TOKEN: 1, ANSWER_MARKER: 2, "a": 3, "b": 4, "c": 5}
    assert word_vocabulary(reversed(segments), 100) == word_vocabulary(segments, 100)
    with caplog.at_level(logging.WARNING, logger="icot.data.tokenizer_build"):
        assert list(word_vocabulary(segments, 4)) == [EOS_TOKEN, UNK_TOKEN, ANSWER_MARKER, "a"]
    assert "2 rare words will map to <unk>" in caplog.text


def test_sentencepiece_tokenizer_is_a_real_sentencepiece_model(data_file, tmp_path):
    folder = tmp_path / "spm"
    build_tokenizer([data_file], kind="sentencepiece", out=folder, vocab_size=400)
    tokenizer = assert_loads_with_eos(folder)
    processor = spm.SentencePieceProcessor(model_file=str(folder / SENTENCEPIECE_MODEL_FILE))
    assert processor.is_control(processor.piece_to_id(EOS_TOKEN))
    assert processor.piece_to_id(EOS_TOKEN) == tokenizer.eos_token_id
    assert processor.piece_to_id(ANSWER_MARKER) == tokenizer.convert_tokens_to_ids(ANSWER_MARKER)
    assert tokenizer.tokenize(f"{ANSWER_MARKER} 42")[:2] == ["\u2581", ANSWER_MARKER]
    for segment in line_segments(SAMPLE_LINES) + ["unseen characters: é ✓ 1,234"]:
        ids = tokenizer(segment, add_special_tokens=False)["input_ids"]
        assert ids == processor.encode(segment)
        assert tokenizer.decode(ids) == processor.decode(ids) == segment


def test_the_cli_builds_a_loadable_tokenizer(data_file, tmp_path, capsys):
    out = tmp_path / "cli"
    icot_main(["tokenizer", "build", str(data_file), "--kind", "word", "--out", str(out), "--vocab_size", "1000"])
    assert "built word tokenizer" in capsys.readouterr().out
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == EOS_TOKEN
    tokenizer = assert_loads_with_eos(out)
    question, cot, answer = split_line(MULTIPLICATION_LINES[0])
    assert encode_example(tokenizer, question, cot, answer)["prompt_len"] == len(question.split()) + 1


def test_a_built_tokenizer_is_returned_without_saving_when_out_is_not_given(data_file):
    tokenizer = build_tokenizer([data_file], kind="word")
    assert tokenizer.eos_token == EOS_TOKEN and ANSWER_MARKER in tokenizer.get_vocab()


def test_answers_are_read_as_the_reader_normalises_them(tmp_path):
    path = tmp_path / "commas.txt"
    path.write_text("How many?||<<1000+234=1234>> #### 1,234\n", encoding="utf-8")
    vocab = build_tokenizer([path], kind="word").get_vocab()
    assert "1234" in vocab and "1,234" not in vocab


@pytest.mark.parametrize(("files", "kind", "vocab_size", "message"), [
    ([], "word", 100, "no data files"),
    (["missing.txt"], "word", 100, "missing.txt: no such data file"),
    (None, "bpe", 100, "unknown tokenizer kind 'bpe'"),
    (None, "word", 3, "vocab_size must be at least"),
    (None, "sentencepiece", 100, "vocab_size 100 is too small for a sentencepiece model"),
])
def test_bad_requests_are_user_errors(data_file, files, kind, vocab_size, message):
    with pytest.raises(UserError, match=message):
        build_tokenizer([data_file] if files is None else files, kind=kind, vocab_size=vocab_size)


def test_the_sentencepiece_minimum_counts_characters_bytes_and_specials():
    assert sentencepiece_minimum_vocab(["ab a", "b"]) == len({"a", "b", "\u2581"}) + 256 + 3


@pytest.mark.parametrize("kind", ["word", "sentencepiece"])
def test_gsm8k_aug_valid_builds_in_seconds_and_round_trips(kind, reference_data, tmp_path):
    path = reference_data / "gsm8k_aug" / "valid.txt"
    started = time.perf_counter()
    build_tokenizer([path], kind=kind, out=tmp_path / kind)
    assert time.perf_counter() - started < 10
    tokenizer = assert_loads_with_eos(tmp_path / kind)
    lines = path.read_text(encoding="utf-8").splitlines()
    for question, cot, answer in map(split_line, lines):
        for segment in (question, cot, answer):
            decoded = tokenizer.decode(tokenizer(segment, add_special_tokens=False)["input_ids"])
            assert " ".join(decoded.split()) == " ".join(segment.split())
        encode_example(tokenizer, question, cot, answer)


def test_gsm8k_style_lines_need_no_unknown_words(data_file):
    tokenizer = build_tokenizer([data_file], kind="word")
    for line in GSM8K_LINES:
        encoded = encode_example(tokenizer, *split_line(line))
        assert tokenizer.unk_token_id not in encoded["cot_ids"]


def test_rebuilding_into_a_folder_replaces_the_previous_tokenizer(data_file, tmp_path):
    folder = tmp_path / "tokenizer"
    build_tokenizer([data_file], kind="word", out=folder)
    build_tokenizer([data_file], kind="sentencepiece", out=folder, vocab_size=400)
    assert (folder / SENTENCEPIECE_MODEL_FILE).is_file()
    assert AutoTokenizer.from_pretrained(str(folder)).tokenize("12")[:2] == ["\u2581", "1"]
    build_tokenizer([data_file], kind="word", out=folder)
    assert not (folder / SENTENCEPIECE_MODEL_FILE).exists()
    word_level = AutoTokenizer.from_pretrained(str(folder))
    assert word_level("zebra", add_special_tokens=False)["input_ids"] == [word_level.unk_token_id]


def test_a_conversion_that_disagrees_with_sentencepiece_is_caught(data_file, tmp_path):
    build_tokenizer([data_file], kind="sentencepiece", out=tmp_path / "spm", vocab_size=400)
    word_level = build_tokenizer([data_file], kind="word")
    with pytest.raises(RuntimeError, match="disagrees with sentencepiece on '2 1 \\* 4 3'"):
        check_sentencepiece_conversion(word_level, tmp_path / "spm" / SENTENCEPIECE_MODEL_FILE, ["2 1 * 4 3"])


def test_cover_adds_the_words_of_other_splits_after_the_training_words(tmp_path):
    from icot.data.tokenizer_build import build_tokenizer

    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("1 2 * 3||05 13 #### 5 3\n1 1 * 2||02 #### 2\n")
    valid.write_text("9 9 * 9||081 #### 1 8\n")
    plain = build_tokenizer([train], kind="word")
    covered = build_tokenizer([train], kind="word", cover=[valid], out=tmp_path / "tok")
    vocab, base = covered.get_vocab(), plain.get_vocab()
    assert {word: vocab[word] for word in base} == base   # the training words keep their ids
    assert sorted(set(vocab) - set(base)) == ["081", "8", "9"] and min(vocab[w] for w in ("081", "8", "9")) == len(base)
    assert covered.unk_token_id not in covered(" 9 9 * 9 081 1 8", add_special_tokens=False)["input_ids"]
    with pytest.raises(UserError, match="only a word-level tokenizer"):
        build_tokenizer([train], kind="sentencepiece", cover=[valid])
