"""The one reader for `INPUT||COT #### ANSWER` files (multiplication and GSM8K-Aug alike).

Files are streamed line by line, never held as a list: GSM8K-Aug has about 385k lines and generated
multiplication 808k. A malformed line stops reading with an error naming file, line and problem, or,
with skip_bad, is skipped and counted. `load_examples` streams the same rows into a cached Arrow
`datasets.Dataset`; `load_hf_dataset` takes a dataset that already exists (on disk or by name).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from icot.errors import UserError

QUESTION_SEPARATOR = "||"
ANSWER_MARKER = "####"   # before the answer, in data lines and in every sequence view
COLUMNS = ("question", "cot", "answer")   # and `line`, the file line of each example
# Bad lines kept with their problem for reporting; beyond this only the count grows.
MAX_RECORDED_BAD_LINES = 100
# Part of the cache fingerprint: bump when parsing changes, so cached datasets are rebuilt.
READER_VERSION = 2

_log = logging.getLogger(__name__)


class DataFormatError(UserError):
    """A malformed line: `FILE:LINE: problem` (`FILE: problem` where the line is not known)."""

    def __init__(self, path, line_number: int | None, problem: str):
        self.path, self.line_number, self.problem = str(path), line_number, problem
        super().__init__(f"{path}:{line_number}: {problem}" if line_number is not None else f"{path}: {problem}")

    def __reduce__(self):  # picklable, so it survives datasets' worker processes
        return type(self), (self.path, self.line_number, self.problem)


class LineFormatError(ValueError):
    """A malformed line, before the reader adds where it is."""


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
    bad = _CONTROL.search(text)
    if bad:
        what = ("a byte-order mark (U+FEFF) inside the file: were files with one concatenated?"
                if bad.group() == "\ufeff" else "a NUL byte" if bad.group() == "\x00"
                else f"the control character U+{ord(bad.group()):04X}")
        raise LineFormatError(f"{what} at column {bad.start() + 1}")
    return text


class ExampleStream:
    """Iterator over (line_number, Example) of one file; blank lines are skipped.

    Without skip_bad the first malformed line raises DataFormatError. With skip_bad, malformed lines
    are skipped: `skipped` counts them, `bad_lines` keeps the first MAX_RECORDED_BAD_LINES as
    (line_number, problem), and the count is logged when the file ends (unless log_skipped is False).
    A file with no example raises UserError when the iteration ends.
    """

    def __init__(self, path, skip_bad: bool = False, log_skipped: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{path}: no such data file")
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
                self.examples += 1
                yield line_number, example
        self._finish()

    def _bad_line(self, line_number: int, problem: str) -> None:
        if not self.skip_bad:
            raise DataFormatError(self.path, line_number, problem)
        self.skipped += 1
        if len(self.bad_lines) < MAX_RECORDED_BAD_LINES:
            self.bad_lines.append((line_number, problem))

    def _finish(self) -> None:
        if self.skipped and self.log_skipped:
            line_number, problem = self.bad_lines[0]
            _log.warning("%s: skipped %d malformed line(s); the first, line %d: %s",
                         self.path, self.skipped, line_number, problem)
        if not self.examples:
            why = f"all {self.skipped} non-blank lines are malformed" if self.skipped else "the file is empty"
            raise UserError(f"{self.path}: no examples ({why})")


def iter_examples(path, skip_bad: bool = False) -> ExampleStream:
    """Stream (line_number, Example) from a data file; see ExampleStream for errors and skip counts."""
    return ExampleStream(path, skip_bad=skip_bad)


def _example_rows(path: str, skip_bad: bool):
    for line, example in iter_examples(path, skip_bad=skip_bad):
        yield {"question": example.question, "cot": example.cot, "answer": example.answer, "line": line}


def _file_fingerprint(path: Path, skip_bad: bool) -> str:
    """Names the cache entry: a changed file (size or modification time) gets a fresh one."""
    stat = path.stat()
    key = f"{READER_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{skip_bad}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def load_examples(path, skip_bad: bool = False, cache_dir=None):
    """A `datasets.Dataset` (question, cot, answer, line) streamed from a data file into cached Arrow."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    path = Path(path)
    if not path.is_file():
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
