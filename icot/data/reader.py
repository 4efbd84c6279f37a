"""The one reader of task data: `INPUT||COT #### ANSWER` text files (multiplication and GSM8K-Aug
alike), and the reference repositories' formats, which `data_format` tells apart by reading the path:
a folder is a `datasets` dataset (CODI's), a file that opens with a JSON list is Coconut's, anything
else is text lines. The records of the other two become the examples their text lines would
(`icot.data.records`).

Files are streamed line by line (or record by record), never held as a list: GSM8K-Aug has about 385k
lines and generated multiplication 808k. A malformed line stops reading with an error naming file, line
and problem (a record: file, record index, key and problem), or, with skip_bad, is skipped and counted.
`load_examples` streams the same rows into a cached Arrow `datasets.Dataset`; `load_hf_dataset` takes a
dataset that already exists (on disk or by name) with columns named by the caller.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from icot.errors import UserError

QUESTION_SEPARATOR = "||"
ANSWER_MARKER = "####"   # before the answer, in data lines and in every sequence view
COLUMNS = ("question", "cot", "answer")   # and `line`, the file line (or record index) of each example
# Bad lines kept with their problem for reporting; beyond this only the count grows.
MAX_RECORDED_BAD_LINES = 100
# Part of the cache fingerprint: bump when parsing changes, so cached datasets are rebuilt.
READER_VERSION = 3
FORMATS = ("lines", "json", "dataset")   # what `data_format` answers
# The first bytes of a file are enough to tell a JSON list from text lines.
FORMAT_PROBE_BYTES = 4096

_log = logging.getLogger(__name__)


class DataFormatError(UserError):
    """A malformed example: `FILE:LINE: problem` in a text file, `FILE: record N: problem` in a JSON list
    or a dataset (N: the record's index, from 0), `FILE: problem` where the place is not known.

    `line_number` is the line or the record index (the `line` column of `load_examples`); which one is the
    path's (`place_unit`), unless `unit` says.
    """

    def __init__(self, path, line_number: int | None, problem: str, unit: str | None = None):
        self.path, self.line_number, self.problem = str(path), line_number, problem
        self.unit = unit or place_unit(path)
        where = place(path, line_number, self.unit) if line_number is not None else str(path)
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # picklable, so it survives datasets' worker processes
        return type(self), (self.path, self.line_number, self.problem, self.unit)


class LineFormatError(ValueError):
    """A malformed line or record, before the reader adds where it is."""


def data_format(path) -> str:
    """How `path` is read: `dataset` for a folder (a `datasets` dataset), `json` for a file whose first
    non-blank character is `[` (a JSON list: Coconut's format) unless its first line is an
    `INPUT||COT #### ANSWER` line, else `lines`. A path that cannot be read is `lines`, whose reader
    says why."""
    path = Path(path)
    if path.is_dir():
        return "dataset"
    try:
        with path.open("rb") as handle:
            head = handle.read(FORMAT_PROBE_BYTES)
    except OSError:
        return "lines"
    head = head.removeprefix(b"\xef\xbb\xbf")   # a UTF-8 byte-order mark
    if not head.lstrip().startswith(b"["):
        return "lines"
    first_line = head.split(b"\n", 1)[0]
    _, separator, target = first_line.partition(QUESTION_SEPARATOR.encode())
    return "lines" if separator and ANSWER_MARKER.encode() in target else "json"


def place_unit(path) -> str:
    """What a place in `path` counts: `line` in a text file, `record` in a JSON list or a dataset."""
    return "line" if data_format(path) == "lines" else "record"


def place(path, number: int, unit: str) -> str:
    """`FILE:LINE` for a line, `FILE: record N` for a record."""
    return f"{path}:{number}" if unit == "line" else f"{path}: record {number}"


@dataclass(frozen=True)
class Example:
    question: str
    cot: str
    answer: str  # the text after `####`, as normalize_answer leaves it


def normalize_answer(text: str) -> str:
    """The answer as compared for exact match: after the first `####` if there is one, stripped, and
    without commas (GSM8K writes 1,000 as often as 1000)."""
    if ANSWER_MARKER in text:
        text = text.split(ANSWER_MARKER, 1)[1]
    return _clean_answer(text)


def _clean_answer(text: str) -> str:
    return text.strip().replace(",", "")


def format_line(example: Example) -> str:
    """The `INPUT||COT #### ANSWER` line (no newline) that parse_line reads back as `example`."""
    return f"{example.question}{QUESTION_SEPARATOR}{example.cot} {ANSWER_MARKER} {example.answer}"


def parse_line(text: str) -> Example:
    """One `INPUT||COT #### ANSWER` line (no newline) as an Example; LineFormatError says what is wrong."""
    if QUESTION_SEPARATOR not in text:
        raise LineFormatError(f"no '{QUESTION_SEPARATOR}' between the question and the CoT")
    question, target = text.split(QUESTION_SEPARATOR, 1)
    if ANSWER_MARKER not in target:
        raise LineFormatError(f"no '{ANSWER_MARKER}' before the answer")
    cot, answer = target.split(ANSWER_MARKER, 1)
    question, answer = question.strip(), _clean_answer(answer)
    if not question:
        raise LineFormatError("empty question")
    if not answer:
        raise LineFormatError(f"empty answer after '{ANSWER_MARKER}'")
    return Example(question, cot.strip(), answer)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufeff]")


def _decode(raw: bytes, first_line: bool) -> str:
    try:
        # A byte-order mark can only start the file; utf-8-sig drops it.
        text = raw.decode("utf-8-sig" if first_line else "utf-8")
    except UnicodeDecodeError as err:
        raise LineFormatError(f"invalid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start})") from None
    text = text.rstrip("\r\n")
    problem = control_problem(text, _CONTROL)
    if problem:
        raise LineFormatError(problem)
    return text


def control_problem(text: str, pattern: re.Pattern) -> str | None:
    """The first character of `text` that `pattern` (control characters) finds, named with its column."""
    bad = pattern.search(text)
    if not bad:
        return None
    what = ("a byte-order mark (U+FEFF) inside the file: were files with one concatenated?"
            if bad.group() == "\ufeff" else "a NUL byte" if bad.group() == "\x00"
            else "a line break (U+000A)" if bad.group() == "\n"
            else f"the control character U+{ord(bad.group()):04X}")
    return f"{what} at column {bad.start() + 1}"


class ExampleStream:
    """Iterator over (line_number, Example) of one data path, in any of the `FORMATS`; blank lines are
    skipped. For a JSON list or a dataset the number is the record's index (`unit` is then `record`).

    Without skip_bad the first malformed line or record raises DataFormatError. With skip_bad, they are
    skipped: `skipped` counts them, `bad_lines` keeps the first MAX_RECORDED_BAD_LINES as
    (line_number, problem), and the count is logged when the data ends (unless log_skipped is False).
    A source with no example raises UserError when the iteration ends.
    """

    def __init__(self, path, skip_bad: bool = False, log_skipped: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{path}: no such data file")
        self.format = data_format(self.path)
        self.unit = "line" if self.format == "lines" else "record"
        self.skip_bad, self.log_skipped = skip_bad, log_skipped
        self.examples = 0
        self.skipped = 0
        self.bad_lines: list[tuple[int, str]] = []
        self._rows = self._read()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, Example]:
        return next(self._rows)

    def _read(self):
        if self.format == "lines":
            entries = self._lines()
        else:
            from icot.data import records   # imported here: it builds on this module's Example

            entries = records.iter_record_examples(self.path, self.format, self._bad_line)
        for number, example in entries:
            self.examples += 1
            yield number, example
        self._finish()

    def _lines(self):
        try:
            handle = self.path.open("rb")
        except OSError as err:
            raise UserError(f"{self.path}: cannot read ({err.strerror})") from None
        with handle:
            for line_number, raw in enumerate(handle, start=1):
                try:
                    text = _decode(raw, first_line=line_number == 1)
                    if not text.strip():
                        continue
                    example = parse_line(text)
                except LineFormatError as err:
                    self._bad_line(line_number, str(err))
                    continue
                yield line_number, example

    def _bad_line(self, line_number: int, problem: str) -> None:
        if not self.skip_bad:
            raise DataFormatError(self.path, line_number, problem, self.unit)
        self.skipped += 1
        if len(self.bad_lines) < MAX_RECORDED_BAD_LINES:
            self.bad_lines.append((line_number, problem))

    def _finish(self) -> None:
        if self.skipped and self.log_skipped:
            line_number, problem = self.bad_lines[0]
            _log.warning("%s: skipped %d malformed %s(s); the first, %s %d: %s",
                         self.path, self.skipped, self.unit, self.unit, line_number, problem)
        if not self.examples:
            if self.unit == "line":
                why = f"all {self.skipped} non-blank lines are malformed" if self.skipped else "the file is empty"
            else:
                why = f"all {self.skipped} records are malformed" if self.skipped else "it holds no record"
            raise UserError(f"{self.path}: no examples ({why})")


def iter_examples(path, skip_bad: bool = False) -> ExampleStream:
    """Stream (line_number, Example) from a data file or dataset folder; see ExampleStream for errors and
    skip counts."""
    return ExampleStream(path, skip_bad=skip_bad)


def count_examples(path) -> int:
    """How many examples `path` holds, malformed ones included, for estimates: its non-blank lines, or
    its records."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such data file")
    stat = path.stat()
    return _count_examples(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)   # a pipeline asks once per stage; a JSON list is counted by parsing it
def _count_examples(path: str, size: int, modified_ns: int) -> int:
    kind = data_format(path)
    if kind != "lines":
        from icot.data import records

        return records.count_records(Path(path), kind)
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def _example_rows(path: str, skip_bad: bool):
    for line, example in iter_examples(path, skip_bad=skip_bad):
        yield {"question": example.question, "cot": example.cot, "answer": example.answer, "line": line}


def _file_fingerprint(path: Path, skip_bad: bool) -> str:
    """Names the cache entry: a changed file (size or modification time) gets a fresh one; so does a
    dataset folder any of whose files changed."""
    files = sorted(file for file in path.rglob("*") if file.is_file()) if path.is_dir() else [path]
    key = f"{READER_VERSION}|{data_format(path)}|{path.resolve()}|{skip_bad}"
    for file in files:
        stat = file.stat()
        key += f"|{file.relative_to(path) if path.is_dir() else ''}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def load_examples(path, skip_bad: bool = False, cache_dir=None):
    """A `datasets.Dataset` (question, cot, answer, line) streamed from a data file or dataset folder into
    cached Arrow; `line` is the file line, or the record's index."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such data file")
    features = datasets.Features({**{column: datasets.Value("string") for column in COLUMNS},
                                  "line": datasets.Value("int32")})
    try:
        return datasets.Dataset.from_generator(
            _example_rows, features=features, cache_dir=None if cache_dir is None else str(cache_dir),
            gen_kwargs={"path": str(path), "skip_bad": skip_bad},
            fingerprint=_file_fingerprint(path, skip_bad))
    except DatasetGenerationError as err:
        # datasets wraps whatever the generator raised; a user's bad file should read as one line.
        cause = err.__cause__ or err.__context__
        if isinstance(cause, UserError):
            raise cause from None
        raise


def load_hf_dataset(path_or_name, split, question_column="question", cot_column="cot",
                    answer_column="answer"):
    """One split of a `datasets` dataset, saved with save_to_disk or loadable by name, as columns
    question / cot / answer (answers normalized as by normalize_answer)."""
    dataset = _load_split(str(path_or_name), split)
    sources = {"question": question_column, "cot": cot_column, "answer": answer_column}
    if len(set(sources.values())) < len(sources):
        raise UserError(f"question, cot and answer columns must differ, got {sources}")
    missing = [f"{role}_column={column!r}" for role, column in sources.items()
               if column not in dataset.column_names]
    if missing:
        raise UserError(f"{path_or_name} ({split}): missing {', '.join(missing)}; "
                        f"its columns are {dataset.column_names}")
    not_text = [column for column in sources.values() if not _is_string_column(dataset, column)]
    if not_text:
        raise UserError(f"{path_or_name} ({split}): columns {not_text} do not hold strings")
    dataset = dataset.select_columns(list(sources.values()))
    dataset = dataset.rename_columns({source: role for role, source in sources.items() if source != role})
    return dataset.map(_normalize_answers, batched=True, desc="normalizing answers")


def _normalize_answers(batch: dict) -> dict:
    return {"answer": [normalize_answer(answer) for answer in batch["answer"]]}


def _is_string_column(dataset, column: str) -> bool:
    feature = dataset.features[column]
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _load_split(path_or_name: str, split: str):
    import datasets

    folder = Path(path_or_name)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        saved = datasets.load_from_disk(str(folder))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise UserError(f"{folder} has no split {split!r}; it has {list(saved)}")
            return saved[split]
        return saved  # a single saved Dataset is the split
    try:
        return datasets.load_dataset(path_or_name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise UserError(f"cannot load dataset {path_or_name!r}, split {split!r}: {err}") from None
