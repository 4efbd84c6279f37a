"""The `INPUT||COT #### ANSWER` reader: parsing, errors with file and line, skipping, datasets loaders."""

import logging
import pickle

import datasets
import pytest

from icot.data.reader import (DataFormatError, Example, ExampleStream, iter_examples, load_examples,
                              load_hf_dataset, normalize_answer, parse_line)
from icot.errors import UserError

MULTIPLICATION_LINE = "1 2 * 3 4||3 6 0 + 0 4 8 0 #### 3 0 4 0"
GSM8K_LINE = "Tom has 1,000 apples and buys 234 more.||<<1000+234=1234>> #### 1,234"


def write(tmp_path, content: bytes | str, name="data.txt"):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_parse_line_splits_question_cot_and_answer():
    assert parse_line(MULTIPLICATION_LINE) == Example("1 2 * 3 4", "3 6 0 + 0 4 8 0", "3 0 4 0")
    assert parse_line(GSM8K_LINE) == Example("Tom has 1,000 apples and buys 234 more.",
                                             "<<1000+234=1234>>", "1234")


def test_an_empty_cot_is_allowed():
    assert parse_line("2 + 2?|| #### 4") == Example("2 + 2?", "", "4")


@pytest.mark.parametrize("text, answer", [
    ("1,234", "1234"), ("  72 ", "72"), ("#### 1,000", "1000"), ("The answer is #### -3", "-3"),
    ("3 0 4 0", "3 0 4 0"),
])
def test_normalize_answer(text, answer):
    assert normalize_answer(text) == answer


def test_iter_examples_numbers_lines_and_skips_blank_ones(tmp_path):
    path = write(tmp_path, f"{MULTIPLICATION_LINE}\n\n   \n{GSM8K_LINE}\n")
    assert [(number, example.answer) for number, example in iter_examples(path)] == [(1, "3 0 4 0"),
                                                                                      (4, "1234")]


def test_windows_line_ends_and_a_byte_order_mark_are_harmless(tmp_path):
    path = write(tmp_path, ("\ufeff" + MULTIPLICATION_LINE + "\r\n" + GSM8K_LINE + "\r\n").encode())
    examples = [example for _, example in iter_examples(path)]
    assert examples[0].question == "1 2 * 3 4"
    assert examples[1].answer == "1234"


def test_iter_examples_streams(tmp_path):
    path = write(tmp_path, f"{MULTIPLICATION_LINE}\nbroken line\n")
    stream = iter_examples(path)
    assert next(stream)[0] == 1  # the bad line 2 has not been read yet
    with pytest.raises(DataFormatError):
        next(stream)


@pytest.mark.parametrize("bad_line, problem", [
    (b"no separator here #### 5", "no '||' between the question and the CoT"),
    (b"1 2 * 3 4||3 6 0 + 0 4 8 0 3 0 4 0", "no '####' before the answer"),
    (b"1 2 * 3 4||3 6 0 + 0 4 8 0 ####   ", "empty answer after '####'"),
    (b"caf\xe9 prices||<<2*3=6>> #### 6", "invalid UTF-8 (byte 0xe9 at offset 3)"),
    (b"   ||<<2*3=6>> #### 6", "empty question"),
])
def test_each_malformed_line_names_file_line_and_problem(tmp_path, bad_line, problem):
    path = write(tmp_path, MULTIPLICATION_LINE.encode() + b"\n\n" + bad_line + b"\n")
    with pytest.raises(DataFormatError) as raised:
        list(iter_examples(path))
    error = raised.value
    assert isinstance(error, UserError)
    assert (error.path, error.line_number, error.problem) == (str(path), 3, problem)
    assert str(error) == f"{path}:3: {problem}"


def test_data_format_error_survives_pickling():
    error = pickle.loads(pickle.dumps(DataFormatError("f.txt", 7, "empty question")))
    assert (str(error), error.line_number) == ("f.txt:7: empty question", 7)


def test_skip_bad_skips_counts_and_logs(tmp_path, caplog):
    path = write(tmp_path, "\n".join([MULTIPLICATION_LINE, "bad one", GSM8K_LINE, "q|| ####", GSM8K_LINE]))
    stream = iter_examples(path, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="icot.data.reader"):
        numbers = [number for number, _ in stream]
    assert numbers == [1, 3, 5]
    assert stream.skipped == 2
    assert stream.examples == 3
    assert stream.bad_lines == [(2, "no '||' between the question and the CoT"),
                                (4, "empty answer after '####'")]
    assert f"{path}: skipped 2 malformed line(s); the first, line 2" in caplog.text


def test_skip_bad_keeps_only_the_first_bad_lines(tmp_path, monkeypatch):
    monkeypatch.setattr("icot.data.reader.MAX_RECORDED_BAD_LINES", 2)
    path = write(tmp_path, "\n".join([GSM8K_LINE] + ["bad"] * 5))
    stream = ExampleStream(path, skip_bad=True, log_skipped=False)
    list(stream)
    assert stream.skipped == 5 and [number for number, _ in stream.bad_lines] == [2, 3]


@pytest.mark.parametrize("content, why", [
    (b"", "the file is empty"),
    (b"\n  \n\n", "the file is empty"),
])
def test_a_file_without_examples_is_a_user_error(tmp_path, content, why):
    path = write(tmp_path, content)
    with pytest.raises(UserError, match=f"{path}: no examples \\({why}\\)"):
        list(iter_examples(path))


def test_a_file_of_only_bad_lines_is_a_user_error_even_when_skipping(tmp_path):
    path = write(tmp_path, "bad\nworse\n")
    with pytest.raises(UserError, match="no examples \\(all 2 non-blank lines are malformed\\)"):
        list(iter_examples(path, skip_bad=True))


def test_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="missing.txt: no such data file"):
        iter_examples(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="no such data file"):
        load_examples(tmp_path / "missing.txt")


# --------------------------------------------------------------------------------- datasets

def test_load_examples_builds_a_dataset(tmp_path):
    path = write(tmp_path, "\n".join([MULTIPLICATION_LINE, GSM8K_LINE, "", MULTIPLICATION_LINE]) + "\n")
    dataset = load_examples(path, cache_dir=tmp_path / "cache")
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.column_names == ["question", "cot", "answer", "line"]
    assert dataset.num_rows == 3
    assert dataset[1] == {"question": "Tom has 1,000 apples and buys 234 more.",
                          "cot": "<<1000+234=1234>>", "answer": "1234", "line": 2}
    assert dataset["line"] == [1, 2, 4]   # the file lines, blank ones skipped


def test_load_examples_rebuilds_when_the_file_changes(tmp_path):
    path = write(tmp_path, MULTIPLICATION_LINE + "\n")
    assert load_examples(path, cache_dir=tmp_path / "cache").num_rows == 1
    assert load_examples(path, cache_dir=tmp_path / "cache").num_rows == 1  # from the cache
    write(tmp_path, (MULTIPLICATION_LINE + "\n") * 4)
    assert load_examples(path, cache_dir=tmp_path / "cache").num_rows == 4


def test_load_examples_reports_a_bad_line_as_such(tmp_path):
    path = write(tmp_path, f"{MULTIPLICATION_LINE}\nbroken\n")
    with pytest.raises(DataFormatError, match=f"{path}:2: no '\\|\\|'"):
        load_examples(path, cache_dir=tmp_path / "cache")
    assert load_examples(path, skip_bad=True, cache_dir=tmp_path / "cache").num_rows == 1


def test_load_examples_of_an_empty_file_is_a_user_error(tmp_path):
    path = write(tmp_path, b"")
    with pytest.raises(UserError, match="no examples"):
        load_examples(path, cache_dir=tmp_path / "cache")


def test_reference_gsm8k_files_load(reference_data, tmp_path):
    for name, rows in (("valid.txt", 500), ("test.txt", 1319)):
        dataset = load_examples(reference_data / "gsm8k_aug" / name, cache_dir=tmp_path / "cache")
        assert dataset.num_rows == rows
        assert not any("," in answer for answer in dataset["answer"])
    first = dataset[0]
    assert first["cot"] == "<<16-3-4=9>> <<9*2=18>>" and first["answer"] == "18"


def saved_dataset(tmp_path, as_dict=False):
    rows = {"input": ["q1", "q2"], "rationale": ["<<1+1=2>>", "<<2*500=1000>>"],
            "target": ["2", "#### 1,000"], "source": ["a", "b"]}
    folder = tmp_path / "saved"
    dataset = datasets.Dataset.from_dict(rows)
    (datasets.DatasetDict({"train": dataset}) if as_dict else dataset).save_to_disk(str(folder))
    return folder


COLUMN_MAP = dict(question_column="input", cot_column="rationale", answer_column="target")


@pytest.mark.parametrize("as_dict", [False, True])
def test_load_hf_dataset_maps_columns_and_normalizes_answers(tmp_path, as_dict):
    dataset = load_hf_dataset(saved_dataset(tmp_path, as_dict), "train", **COLUMN_MAP)
    assert dataset.column_names == ["question", "cot", "answer"]
    assert dataset["answer"] == ["2", "1000"]
    assert dataset[1]["question"] == "q2"


def test_load_hf_dataset_names_a_missing_split(tmp_path):
    with pytest.raises(UserError, match="has no split 'test'; it has \\['train'\\]"):
        load_hf_dataset(saved_dataset(tmp_path, as_dict=True), "test", **COLUMN_MAP)


def test_load_hf_dataset_names_missing_columns(tmp_path):
    with pytest.raises(UserError, match="missing question_column='question', cot_column='cot'.*"
                                        "its columns are \\['input', 'rationale', 'target', 'source'\\]"):
        load_hf_dataset(saved_dataset(tmp_path), "train", answer_column="target")


def test_load_hf_dataset_rejects_one_column_for_two_roles(tmp_path):
    with pytest.raises(UserError, match="must differ"):
        load_hf_dataset(saved_dataset(tmp_path), "train", question_column="input", cot_column="input",
                        answer_column="target")


def test_load_hf_dataset_rejects_non_text_columns(tmp_path):
    folder = tmp_path / "numbers"
    datasets.Dataset.from_dict({"question": ["q"], "cot": [""], "answer": [7]}).save_to_disk(str(folder))
    with pytest.raises(UserError, match="columns \\['answer'\\] do not hold strings"):
        load_hf_dataset(folder, "train")


def test_load_hf_dataset_by_name_goes_through_load_dataset(tmp_path):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"question": "q", "cot": "<<1+2=3>>", "answer": "3"}\n')
    dataset = load_hf_dataset(str(folder), "train")
    assert dataset.num_rows == 1 and dataset[0]["cot"] == "<<1+2=3>>"


def test_load_hf_dataset_that_cannot_be_found_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load dataset"):
        load_hf_dataset(str(tmp_path / "nowhere" / "x"), "train")
