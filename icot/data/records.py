"""The reference repositories' data formats, read as the examples their text lines would be.

- Coconut: a JSON file holding a list of `{"question": str, "steps": [str, ...], "answer": str}` records
  (its GSM8K, ProntoQA and ProsQA files); other keys (`idx`, ProsQA's graph) are ignored.
- CODI: a `datasets` folder with the columns `question`, `cot` and `answer` (GSM8k-Aug and its
  natural-language variant), or `steps` instead of `cot`. The folder is one split: a `Dataset` saved with
  `save_to_disk`; a saved `DatasetDict` of one split, or one split's folder of any saved `DatasetDict`
  (`FOLDER/SPLIT`); or a folder of data files (parquet, JSON lines, csv, arrow) that
  `datasets.load_dataset` reads as one split.

A record is the example of the line `question||cot #### answer`. The CoT is `cot`, or the steps joined
by single spaces: the inverse of Coconut's `cot.split(" ")`, so GSM8K-Aug's `<<...>>` equations come back
as the line's CoT, and `data.steps` splits them again (`icot.data.steps`). A `cot` may also be a list
of steps. The answer loses a `####` before it and its commas, as a line's does. A record no line could
hold is malformed, named by its index and key: a field that is missing, not text, empty (question,
answer), or that holds a line break, a control character, `||` (question) or `####` (CoT).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from icot.data.reader import (ANSWER_MARKER, QUESTION_SEPARATOR, Example, LineFormatError, control_problem,
                              normalize_answer)
from icot.errors import UserError

STEP_JOINER = " "   # Coconut splits a GSM8K-Aug CoT on single spaces; joining on one gives it back
COT_KEYS = ("cot", "steps")   # a record holds one of them
# What a line cannot hold: a line break ends it; other control characters are refused in lines too.
_FIELD_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ufeff]")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
ROWS_PER_BATCH = 1024   # dataset rows converted to Python at a time


def iter_record_examples(path: Path, kind: str, bad: Callable[[int, str], None]) -> Iterator[tuple[int, Example]]:
    """(index, Example) of every well-formed record of a JSON list (`kind` json) or a dataset folder
    (`dataset`); each malformed one goes to `bad(index, problem)`, which raises or counts it."""
    for index, record in (json_records(path) if kind == "json" else dataset_records(path)):
        try:
            example = record_example(record)
        except LineFormatError as err:
            bad(index, str(err))
            continue
        yield index, example


def count_records(path: Path, kind: str) -> int:
    if kind == "json":
        return sum(1 for _ in json_records(path))
    return len(open_dataset(path))


# ------------------------------------------------------------------------------------------ records

def record_example(record) -> Example:
    """The Example of one record; LineFormatError names the key at fault."""
    if not isinstance(record, Mapping):
        raise LineFormatError(f"expected an object with question, steps (or cot) and answer, found "
                              f"{describe_value(record)}")
    question = text_field(record, "question").strip()
    if not question:
        raise LineFormatError("key 'question': empty")
    if QUESTION_SEPARATOR in question:
        raise LineFormatError(f"key 'question': holds '{QUESTION_SEPARATOR}', which ends the question of a "
                              f"text line")
    key, cot = cot_field(record)
    if ANSWER_MARKER in cot:
        raise LineFormatError(f"key {key!r}: holds '{ANSWER_MARKER}', which ends the CoT of a text line")
    answer = normalize_answer(text_field(record, "answer"))
    if not answer:
        raise LineFormatError("key 'answer': empty")
    return Example(question, cot, answer)


def text_field(record: Mapping, key: str) -> str:
    if key not in record:
        raise LineFormatError(f"no key {key!r} (the record's keys: {', '.join(map(str, record)) or 'none'})")
    value = record[key]
    if not isinstance(value, str):
        raise LineFormatError(f"key {key!r}: expected a string, found {describe_value(value)}")
    problem = control_problem(value, _FIELD_CONTROL)
    if problem:
        raise LineFormatError(f"key {key!r}: {problem}")
    return value


def cot_field(record: Mapping) -> tuple[str, str]:
    """(the key that holds the CoT, the CoT as a line's): `cot` as it is or `steps` joined."""
    present = [key for key in COT_KEYS if key in record]
    if len(present) != 1:
        found = "both" if present else "neither"
        raise LineFormatError(f"{found} of the keys 'cot' and 'steps': a record holds its CoT in one "
                              f"(the record's keys: {', '.join(map(str, record)) or 'none'})")
    key = present[0]
    value = record[key]
    if key == "cot" and isinstance(value, str):
        steps = [value]
    elif isinstance(value, (list, tuple)):
        steps = list(value)
    else:
        expected = "a string or a list of strings" if key == "cot" else "a list of strings"
        raise LineFormatError(f"key {key!r}: expected {expected}, found {describe_value(value)}")
    for number, step in enumerate(steps):
        where = f"key {key!r}" if isinstance(value, str) else f"key {key!r}, step {number}"
        if not isinstance(step, str):
            raise LineFormatError(f"{where}: expected a string, found {describe_value(step)}")
        problem = control_problem(step, _FIELD_CONTROL)
        if problem:
            raise LineFormatError(f"{where}: {problem}")
    return key, STEP_JOINER.join(steps).strip()


def describe_value(value) -> str:
    """A value as a JSON user would name it: `a list`, `null`, `the number 18`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


# ------------------------------------------------------------------------------------------ JSON

def json_records(path: Path) -> Iterator[tuple[int, object]]:
    """(index, value) of each item of the JSON list in `path`, decoded one at a time (not all held as
    objects at once); a file that is not a JSON list is a UserError naming line and column."""
    raw = read_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: invalid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start})") from None
    del raw   # the text alone is held while records are decoded (GSM8K-Aug's training list: ~385k records)
    decoder = json.JSONDecoder()
    position = _JSON_SPACE.match(text).end()
    if not text.startswith("[", position):
        raise json_error(path, json.JSONDecodeError("expected a list, '['", text, position), 0)
    position = _JSON_SPACE.match(text, position + 1).end()
    index = 0
    if text.startswith("]", position):
        position += 1
    else:
        while True:
            try:
                record, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as err:
                raise json_error(path, err, index) from None
            yield index, record
            index += 1
            position = _JSON_SPACE.match(text, position).end()
            if text.startswith("]", position):
                position += 1
                break
            if not text.startswith(",", position):
                raise json_error(path, json.JSONDecodeError("expected ',' or ']' after a record", text, position),
                                 index)
            position = _JSON_SPACE.match(text, position + 1).end()
    position = _JSON_SPACE.match(text, position).end()
    if position < len(text):
        raise json_error(path, json.JSONDecodeError("expected nothing after the list", text, position), index)


def json_error(path: Path, err: json.JSONDecodeError, index: int) -> UserError:
    return UserError(f"{path}: not a JSON list: {err.msg} at line {err.lineno}, column {err.colno} "
                     f"(record {index})")


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None


# ------------------------------------------------------------------------------------------ datasets

def dataset_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(index, row) of a dataset folder's split, with the question, CoT and answer columns only."""
    dataset = open_dataset(path)
    columns = dataset.column_names
    cot_columns = [key for key in COT_KEYS if key in columns]
    missing = [key for key in ("question", "answer") if key not in columns]
    if missing or len(cot_columns) != 1:
        if len(cot_columns) != 1:
            missing.append("one of 'cot' and 'steps'" if not cot_columns else "only one of 'cot' and 'steps'")
        raise UserError(f"{path}: needs the columns {', '.join(missing)}; its columns are {columns}")
    dataset = dataset.select_columns(["question", cot_columns[0], "answer"])
    index = 0
    for batch in dataset.iter(batch_size=ROWS_PER_BATCH):
        for row in zip(*batch.values()):
            yield index, dict(zip(batch.keys(), row))
            index += 1


def open_dataset(path: Path):
    """The one split a dataset folder holds: saved with `save_to_disk`, or data files `load_dataset` reads."""
    import datasets

    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    try:
        loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetsError) as err:   # no or unreadable data
        raise UserError(f"{path}: cannot read this folder as a `datasets` dataset ({err})") from None
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if len(loaded) != 1:
        where = (f"name one split's folder, e.g. {path / next(iter(loaded))}" if saved
                 else "keep one split's data files in the folder")
        raise UserError(f"{path}: holds the splits {sorted(loaded)}; a data path is one split: {where}")
    return next(iter(loaded.values()))
