"""The reference repositories' formats read directly: Coconut's JSON list and CODI's dataset folder give the
examples their text lines give, a bad record is named by index and key, and `icot data convert` writes
any of them as text lines."""

import json
import logging
import pickle
import subprocess
import sys

import datasets
import pytest

from icot.config import load_stage_config
from icot.data.check import check_file
from icot.data.convert import convert_file
from icot.data.reader import (DataFormatError, count_examples, data_format, format_line, iter_examples,
                              load_examples)
from icot.data.multiply import excluded_pairs
from icot.errors import UserError
from icot.pipeline import check_before_training, planned_steps, view_tokens
from icot.stage import check_steps, load_split
from tests.tokenizer_fixtures import SAMPLE_LINES

EMPTY_COT_LINE = "What is 2 + 2?|| #### 4"
COMMA_LINE = "Tom has 1,000 apples and buys 234 more.||<<1000+234=1234>> #### 1,234"
LINES = SAMPLE_LINES + [EMPTY_COT_LINE, COMMA_LINE]


def icot(*args):
    return subprocess.run([sys.executable, "-m", "icot", *args], capture_output=True, text=True, timeout=120)


def coconut_record(line: str, index: int) -> dict:
    """A line as Coconut's GSM8K preprocessing writes it: the CoT split on single spaces into steps, the
    answer after the last `##`, an `idx` beside them."""
    question, target = line.split("||")
    return {"question": question, "steps": target.split("##")[0].strip().split(" "),
            "answer": line.split("##")[-1].strip(), "idx": index}


def codi_row(line: str) -> dict:
    """A line as a row of CODI's GSM8k-Aug: the CoT as one string, the answer as written."""
    question, target = line.split("||")
    cot, answer = target.split("####")
    return {"question": question, "cot": cot.strip(), "answer": answer.strip()}


def write_text(folder, lines=LINES, name="data.txt"):
    path = folder / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_json(folder, records, name="data.json", indent=None):
    path = folder / name
    path.write_text(json.dumps(records, indent=indent))
    return path


def coconut_file(folder, lines=LINES, name="data.json", indent=None):
    return write_json(folder, [coconut_record(line, index) for index, line in enumerate(lines)], name, indent)


def rows(records: list[dict]) -> dict[str, list]:
    return {key: [record[key] for record in records] for key in records[0]}


def examples(path, **kwargs):
    return [example for _, example in iter_examples(path, **kwargs)]


# ------------------------------------------------------------------------------ reading

@pytest.mark.parametrize("indent", [None, 2])   # Coconut writes one line; a person may pretty-print
def test_a_coconut_json_list_reads_as_its_text_lines(tmp_path, indent):
    path = coconut_file(tmp_path, indent=indent)
    assert data_format(path) == "json"
    assert examples(path) == examples(write_text(tmp_path))
    assert [number for number, _ in iter_examples(path)] == list(range(len(LINES)))   # record indices
    assert examples(path)[len(SAMPLE_LINES)].cot == ""   # Coconut's [""] steps of an empty CoT


def test_load_examples_of_a_coconut_list_numbers_rows_by_record(tmp_path):
    loaded = load_examples(coconut_file(tmp_path), cache_dir=tmp_path / "cache")
    from_text = load_examples(write_text(tmp_path), cache_dir=tmp_path / "cache")
    assert loaded.remove_columns("line").to_list() == from_text.remove_columns("line").to_list()
    assert loaded["line"] == list(range(len(LINES)))


def save_dataset(folder, columns: dict[str, list]):
    datasets.Dataset.from_dict(columns).save_to_disk(str(folder))
    return folder


def dataset_folder(tmp_path, kind: str):
    """CODI-style data in each folder layout a user may hold it in; the path to give icot."""
    codi = rows([codi_row(line) for line in LINES])
    folder = tmp_path / kind
    if kind == "saved_dataset":
        return save_dataset(folder, codi)
    if kind == "saved_dict_of_one_split":
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(codi)}).save_to_disk(str(folder))
        return folder
    if kind == "split_folder_of_a_saved_dict":
        other = rows([codi_row(SAMPLE_LINES[0])])
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(codi),
                              "test": datasets.Dataset.from_dict(other)}).save_to_disk(str(folder))
        return folder / "train"
    if kind == "parquet_files":
        folder.mkdir()
        datasets.Dataset.from_dict(codi).to_parquet(str(folder / "train.parquet"))
        return folder
    if kind == "steps_column":
        return save_dataset(folder, rows([coconut_record(line, index) for index, line in enumerate(LINES)]))
    if kind == "cot_as_a_list":
        return save_dataset(folder, {**codi, "cot": [cot.split(" ") if cot else [] for cot in codi["cot"]]})
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["saved_dataset", "saved_dict_of_one_split", "split_folder_of_a_saved_dict",
                                  "parquet_files", "steps_column", "cot_as_a_list"])
def test_a_dataset_folder_reads_as_its_text_lines(tmp_path, kind):
    path = dataset_folder(tmp_path, kind)
    assert data_format(path) == "dataset"
    assert examples(path) == examples(write_text(tmp_path))
    assert [number for number, _ in iter_examples(path)] == list(range(len(LINES)))
    assert count_examples(path) == len(LINES)


def test_a_dataset_of_several_splits_asks_for_one(tmp_path):
    folder = tmp_path / "splits"
    one = datasets.Dataset.from_dict(rows([codi_row(LINES[0])]))
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(folder))
    with pytest.raises(UserError, match=f"{folder}: holds the splits \\['test', 'train'\\]; a data path is one "
                                        f"split: name one split's folder, e.g. {folder / 'train'}"):
        examples(folder)


@pytest.mark.parametrize("columns, missing", [
    ({"input": ["q"], "cot": [""], "answer": ["1"]}, "question"),
    ({"question": ["q"], "answer": ["1"]}, "one of 'cot' and 'steps'"),
    ({"question": ["q"], "cot": [""], "steps": [[]], "answer": ["1"]}, "only one of 'cot' and 'steps'"),
])
def test_a_dataset_without_its_columns_names_them(tmp_path, columns, missing):
    folder = save_dataset(tmp_path / "bad", columns)
    with pytest.raises(UserError, match=f"{folder}: needs the columns {missing}; its columns are "):
        examples(folder)


def test_a_folder_that_is_no_dataset_is_a_user_error(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(UserError, match="notes: cannot read this folder as a `datasets` dataset"):
        examples(tmp_path / "notes")


GOOD = {"question": "q", "steps": ["<<1+1=2>>"], "answer": "2"}


@pytest.mark.parametrize("record, problem", [
    (["q", ["<<1+1=2>>"], "2"], "expected an object with question, steps (or cot) and answer, found a list"),
    ({"steps": [], "answer": "2"}, "no key 'question' (the record's keys: steps, answer)"),
    ({**GOOD, "question": 7}, "key 'question': expected a string, found the number 7"),
    ({**GOOD, "question": "  "}, "key 'question': empty"),
    ({**GOOD, "question": "a||b"}, "key 'question': holds '||', which ends the question of a text line"),
    ({**GOOD, "question": "two\nlines"}, "key 'question': a line break (U+000A) at column 4"),
    ({"question": "q", "answer": "2"}, "neither of the keys 'cot' and 'steps': a record holds its CoT in one "
                                       "(the record's keys: question, answer)"),
    ({**GOOD, "cot": "<<1+1=2>>"}, "both of the keys 'cot' and 'steps': a record holds its CoT in one "
                                   "(the record's keys: question, steps, answer, cot)"),
    ({**GOOD, "steps": "<<1+1=2>>"}, "key 'steps': expected a list of strings, found a string"),
    ({**GOOD, "steps": ["<<1+1=2>>", 7]}, "key 'steps', step 1: expected a string, found the number 7"),
    ({**GOOD, "steps": ["<<1+1=2>>", "#### 2"]}, "key 'steps': holds '####', which ends the CoT of a text line"),
    ({**GOOD, "steps": ["a\x00"]}, "key 'steps', step 0: a NUL byte at column 2"),
    ({"question": "q", "cot": 5, "answer": "2"}, "key 'cot': expected a string or a list of strings, found the "
                                                 "number 5"),
    ({**GOOD, "answer": None}, "key 'answer': expected a string, found null"),
    ({**GOOD, "answer": 2}, "key 'answer': expected a string, found the number 2"),
    ({**GOOD, "answer": "#### "}, "key 'answer': empty"),
])
def test_each_malformed_record_is_named_by_index_and_key(tmp_path, record, problem):
    path = write_json(tmp_path, [GOOD, record, GOOD])
    with pytest.raises(DataFormatError) as raised:
        examples(path)
    error = raised.value
    assert (error.path, error.line_number, error.problem) == (str(path), 1, problem)
    assert str(error) == f"{path}: record 1: {problem}"


def test_a_malformed_dataset_row_is_named_by_index_and_key(tmp_path):
    folder = save_dataset(tmp_path / "nl", {"question": ["q1", "q2"], "cot": ["a. b.", "c."],
                                            "answer": ["1", None]})   # the NL variant has null answers
    with pytest.raises(DataFormatError, match=f"^{folder}: record 1: key 'answer': expected a string, found null$"):
        examples(folder)
    assert examples(folder, skip_bad=True) == examples(write_text(tmp_path, ["q1||a. b. #### 1"]))


def test_skip_bad_skips_and_counts_records(tmp_path, caplog):
    path = write_json(tmp_path, [GOOD, {"question": "q"}, GOOD, 5])
    stream = iter_examples(path, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="icot.data.reader"):
        numbers = [number for number, _ in stream]
    assert numbers == [0, 2]
    assert stream.skipped == 2
    assert [number for number, _ in stream.bad_lines] == [1, 3]
    assert f"{path}: skipped 2 malformed record(s); the first, record 1: neither of the keys" in caplog.text


@pytest.mark.parametrize("content, problem", [
    ('[{"question": "q", "steps": [], "answer": "1"},\n {"question": "q" "steps": []}]',
     "not a JSON list: Expecting ',' delimiter at line 2, column 19 (record 1)"),
    ('[{"question": "q", "steps": [], "answer": "1"} {}]',
     "not a JSON list: expected ',' or ']' after a record at line 1, column 48 (record 1)"),
    ('[{"question": "q", "steps": [], "answer": "1"}] []',
     "not a JSON list: expected nothing after the list at line 1, column 49 (record 1)"),
    ("[]", "no examples (it holds no record)"),
    ("[1, 2]", "no examples (all 2 records are malformed)"),
])
def test_a_file_that_is_not_a_json_list_of_records_is_a_user_error(tmp_path, content, problem):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(UserError) as raised:
        examples(path, skip_bad=True)
    assert str(raised.value) == f"{path}: {problem}"


@pytest.mark.parametrize("content, kind", [
    ("[draft] What is 2 + 2?|| #### 4\n", "lines"),   # a text line may open with [
    ("\ufeff  \n [\n", "json"),
    ("1 2 * 3 4||3 6 0 + 0 4 8 0 #### 3 0 4 0\n", "lines"),
    ("", "lines"),
])
def test_the_format_is_read_from_the_file(tmp_path, content, kind):
    path = tmp_path / "data"
    path.write_text(content, encoding="utf-8")
    assert data_format(path) == kind


def test_a_text_line_that_opens_with_a_bracket_reads_as_a_line(tmp_path):
    path = write_text(tmp_path, ["[draft] What is 2 + 2?|| #### 4"])
    assert examples(path)[0].question == "[draft] What is 2 + 2?"


def test_later_errors_name_the_record_of_a_record_source(tmp_path):
    """Tokenization and length errors carry the `line` column; for a JSON list or a dataset that is a record."""
    json_path, text_path = coconut_file(tmp_path), write_text(tmp_path)
    assert str(DataFormatError(json_path, 3, "too long")) == f"{json_path}: record 3: too long"
    assert str(DataFormatError(text_path, 3, "too long")) == f"{text_path}:3: too long"
    assert str(DataFormatError(tmp_path, 0, "too long")) == f"{tmp_path}: record 0: too long"
    copy = pickle.loads(pickle.dumps(DataFormatError(json_path, 3, "too long")))
    assert (str(copy), copy.unit) == (f"{json_path}: record 3: too long", "record")


def test_an_exclude_file_names_its_record(tmp_path):
    path = coconut_file(tmp_path, SAMPLE_LINES[1:2] + SAMPLE_LINES[3:4])
    assert len(excluded_pairs([coconut_file(tmp_path, SAMPLE_LINES[1:2], "one.json")], 2, 2)) == 1
    with pytest.raises(DataFormatError, match=f"^{path}: record 1: --exclude: not a 2x2-digit multiplication"):
        excluded_pairs([path], 2, 2)


# ------------------------------------------------------------------------------ configs

def test_data_paths_of_a_config_take_every_format(tmp_path, tokenizers):
    """data.train / data.valid read a Coconut list and a dataset folder into the tokenized rows their text
    lines give; an unknown word is named by its record."""
    tokenizer = tokenizers["word"]
    text = write_text(tmp_path, SAMPLE_LINES)
    folder = save_dataset(tmp_path / "codi", rows([codi_row(line) for line in SAMPLE_LINES]))
    json_path = coconut_file(tmp_path, SAMPLE_LINES)

    def split(train, valid, name):
        config = load_stage_config("teacher", None, [f"--data.train={train}", f"--data.valid={valid}",
                                                     f"--data.cache_dir={tmp_path / 'cache'}"])
        return config, load_split(config, tokenizer, name).remove_columns("line").to_list()

    _, expected = split(text, text, "train")
    config, from_json = split(json_path, folder, "train")
    assert from_json == expected
    assert split(json_path, folder, "valid")[1] == expected
    assert planned_steps(config) == max(1, len(SAMPLE_LINES) // config.train.batch_size)
    assert view_tokens(str(json_path)) == view_tokens(str(folder)) == view_tokens(str(text))
    multiplication = save_dataset(tmp_path / "multiplication",
                                  rows([coconut_record(line, index) for index, line in enumerate(SAMPLE_LINES[:3])]))
    equations = load_stage_config("coconut", None, [f"--data.train={multiplication}", "--data.steps=equations"])
    with pytest.raises(UserError, match=f"data.steps: equations does not fit {multiplication}"):
        check_steps(equations, None, print)   # the rule is checked on the CoTs read from the file
    unknown = write_json(tmp_path, [coconut_record(SAMPLE_LINES[0], 0), {**GOOD, "question": "zebra"}],
                         "unknown.json")
    with pytest.raises(DataFormatError, match=f"^{unknown}: record 1: 'zebra' is not in the vocabulary"):
        split(unknown, folder, "train")


def test_the_pipeline_takes_a_dataset_folder_as_its_test_data(tmp_path):
    folder = dataset_folder(tmp_path, "saved_dataset")
    overrides = [f"--data.test={folder}", f"--run_dir={tmp_path / 'run'}"]
    config = load_stage_config("teacher", None, overrides)
    check_before_training(config, None, overrides, [], evaluates=True, eval_batch_size=4, eval_max_examples=None)


# ------------------------------------------------------------------------------ icot data check

def test_data_check_names_the_bad_record_of_a_coconut_file(tmp_path):
    records = [coconut_record(line, index) for index, line in enumerate(SAMPLE_LINES)]
    records[4]["steps"][1] = 7
    bad = write_json(tmp_path, records, "bad.json")
    checked = icot("data", "check", str(bad))
    assert checked.returncode == 1
    assert checked.stderr.splitlines() == [f"{bad}: record 4: key 'steps', step 1: expected a string, "
                                           f"found the number 7"]
    assert f"FAILED (1 problem(s)): {bad}: 5 examples, 3 multiplication records re-derived, 1 malformed records" \
        in checked.stdout


def test_data_check_reads_a_dataset_folder(tmp_path):
    folder = dataset_folder(tmp_path, "saved_dataset")
    report = check_file(folder)
    assert report.problems == [] and report.examples == len(LINES)
    assert report.summary() == f"ok: {folder}: {len(LINES)} examples, 3 multiplication records re-derived"


def test_data_check_names_more_bad_records_as_records(tmp_path, monkeypatch):
    monkeypatch.setattr("icot.data.reader.MAX_RECORDED_BAD_LINES", 1)
    bad = write_json(tmp_path, [GOOD, 1, 2, 3], "bad.json")
    assert check_file(bad).problem_lines() == [
        f"{bad}: record 1: expected an object with question, steps (or cot) and answer, found the number 1",
        f"{bad}: 2 more malformed records after record 1"]


# ------------------------------------------------------------------------------ icot data convert

def test_convert_writes_the_text_lines_and_round_trips(tmp_path):
    source = coconut_file(tmp_path)
    out = tmp_path / "out" / "data.txt"
    stream = convert_file(source, out)
    assert (stream.examples, stream.format) == (len(LINES), "json")
    assert out.read_text().splitlines() == [format_line(example) for example in examples(write_text(tmp_path))]
    assert examples(out) == examples(source)
    again = tmp_path / "again.txt"
    convert_file(out, again)   # text lines convert to themselves
    assert again.read_bytes() == out.read_bytes()


def test_convert_writes_a_dataset_folder(tmp_path):
    out = tmp_path / "codi.txt"
    convert_file(dataset_folder(tmp_path, "parquet_files"), out)
    assert examples(out) == examples(write_text(tmp_path))


def test_convert_refuses_to_overwrite_its_source(tmp_path):
    source = coconut_file(tmp_path)
    before = source.read_bytes()
    for out in (source, tmp_path / "sub" / ".." / "data.json"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(UserError, match="is the data being converted; name another file"):
            convert_file(source, out)
    folder = dataset_folder(tmp_path, "saved_dataset")
    with pytest.raises(UserError, match="is inside the dataset folder"):
        convert_file(folder, folder / "train.txt")
    assert source.read_bytes() == before and not (folder / "train.txt").exists()


def test_convert_keeps_an_existing_output_when_a_record_is_bad(tmp_path):
    source = write_json(tmp_path, [GOOD, {"question": "q", "steps": [], "answer": ""}])
    out = tmp_path / "kept.txt"
    out.write_text("earlier output\n")
    with pytest.raises(DataFormatError, match="record 1: key 'answer': empty"):
        convert_file(source, out)
    assert out.read_text() == "earlier output\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data.json", "kept.txt"]   # no partial file
    stream = convert_file(source, out, skip_bad=True)
    assert (stream.examples, stream.skipped) == (1, 1)
    assert out.read_text() == "q||<<1+1=2>> #### 2\n"


def test_convert_on_the_command_line(tmp_path):
    source = coconut_file(tmp_path)
    out = tmp_path / "data.txt"
    converted = icot("data", "convert", str(source), "--out", str(out))
    assert converted.returncode == 0, converted.stderr
    assert converted.stdout.strip() == f"wrote {len(LINES)} examples of {source} (json) to {out}"
    refused = icot("data", "convert", str(source), "--out", str(source))
    assert refused.returncode == 2 and "is the data being converted" in refused.stderr
    missing = icot("data", "convert", str(source))
    assert missing.returncode == 2 and "--out: name the text file to write" in missing.stderr
    helped = icot("data", "convert", "--help")
    for option in ("--source", "--out", "--skip_bad", "the text file to write, never SOURCE",
                   "skip malformed lines or records"):
        assert option in helped.stdout + helped.stderr   # Fire writes its help to stderr


# ------------------------------------------------------------------------------ reference data

def test_reference_gsm8k_reads_alike_in_every_format(reference_data, tmp_path):
    """GSM8K-Aug as Coconut's preprocessing and CODI's dataset hold it reads as the released text lines."""
    for name in ("valid.txt", "test.txt"):
        text = reference_data / "gsm8k_aug" / name
        lines = [line for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
        expected = examples(text)
        coconut = coconut_file(tmp_path, lines, name=f"{name}.json")
        folder = save_dataset(tmp_path / f"{name}.codi", rows([codi_row(line) for line in lines]))
        assert examples(coconut) == expected
        assert examples(folder) == expected
        out = tmp_path / f"{name}.converted"
        convert_file(coconut, out)
        assert examples(out) == expected
    assert sum(example.cot == "" for example in expected) == 18   # test.txt's empty CoTs survive


def test_sentence_steps_of_coconut_json_are_found_again_after_joining():
    """ProsQA's steps are sentences with spaces inside: joined into one CoT, `sentences` (auto's choice
    for such a CoT) splits them where each sentence ends, as the JSON listed them."""
    from icot.data.steps import step_char_starts

    steps = ["Every wumpus is a yumpus.", "Every yumpus is a rempus.", "Alex is a rempus."]
    cot = " ".join(steps)
    starts = step_char_starts(cot)
    assert starts == step_char_starts(cot, "sentences")
    assert [cot[a:b].strip() for a, b in zip(starts, starts[1:] + [len(cot)])] == steps
    # A decimal point is no sentence end; text after the last full stop is a step of its own.
    assert step_char_starts("Pay 2.5 dollars. Then 3 more", "sentences") == [0, 17]
    assert step_char_starts("05 051 067 78") == [0, 3, 7, 11]   # the columns layout: still words
