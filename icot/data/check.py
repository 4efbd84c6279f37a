"""`icot data check`: validate data files before a run spends hours on them.

Every line must parse as `INPUT||COT #### ANSWER`, and every record of a Coconut JSON list or a dataset
folder must be one such line's example (`icot.data.records`). Multiplication lines (input shaped like
`1 3 4 5 * 8 1 9 3`) are also re-derived from their operands and must match exactly; the first
mismatch per file is reported, since one usually means the whole file was made by another rule.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from itertools import zip_longest

from icot.data.multiply import digits_from_inputs, multiplication_shape, render_rows
from icot.data.reader import Example, ExampleStream, format_line, parse_line, place
from icot.errors import UserError

# Multiplication lines are re-rendered this many at a time (vectorised), keeping memory bounded.
CHECK_BATCH_LINES = 1 << 14


@dataclass
class FileReport:
    path: str
    skip_bad: bool = False
    unit: str = "line"  # what a number counts: `line`, or `record` in a JSON list or a dataset folder
    examples: int = 0
    multiplication_lines: int = 0  # re-derived and matching
    malformed_lines: int = 0
    mismatch_found: bool = False  # after the first mismatch, multiplication lines are no longer re-derived
    problems: list[tuple[int | None, str]] = field(default_factory=list)  # (line or record, None for the file; text)

    def add_file_problem(self, error: UserError) -> None:
        self.problems.append((None, str(error).removeprefix(f"{self.path}: ")))

    def problem_lines(self) -> list[str]:
        """`FILE:LINE: problem` (`FILE: record N: problem`) in order, then `FILE: problem` for the file as a
        whole."""
        in_order = sorted(self.problems, key=lambda problem: (problem[0] is None, problem[0] or 0, problem[1]))
        return [f"{place(self.path, number, self.unit)}: {text}" if number is not None else f"{self.path}: {text}"
                for number, text in in_order]

    def summary(self) -> str:
        verdict = f"FAILED ({len(self.problems)} problem(s))" if self.problems else "ok"
        details = f"{self.examples} examples"
        if self.multiplication_lines:
            details += f", {self.multiplication_lines} multiplication {self.unit}s re-derived"
        if self.malformed_lines:
            details += f", {self.malformed_lines} malformed {self.unit}s" + (" skipped" if self.skip_bad else "")
        return f"{verdict}: {self.path}: {details}"


def check_file(path, skip_bad: bool = False) -> FileReport:
    """Check one file. Malformed lines are problems unless skip_bad, which only counts them."""
    report = FileReport(str(path), skip_bad=skip_bad)
    try:
        # The reader always skips here, so every malformed line is seen rather than only the first.
        stream = ExampleStream(path, skip_bad=True, log_skipped=False)
    except UserError as err:
        report.add_file_problem(err)
        return report
    report.unit = stream.unit
    try:
        _check_examples(stream, report)
    except UserError as err:  # a file without examples, or one that is not a JSON list after all
        report.add_file_problem(err)
    _record_malformed(stream, report)
    return report


def _record_malformed(stream: ExampleStream, report: FileReport) -> None:
    report.malformed_lines = stream.skipped
    if report.skip_bad:
        return
    report.problems += stream.bad_lines
    if stream.skipped > len(stream.bad_lines):
        report.problems.append((None, f"{stream.skipped - len(stream.bad_lines)} more malformed {stream.unit}s "
                                      f"after {stream.unit} {stream.bad_lines[-1][0]}"))


def _check_examples(stream: ExampleStream, report: FileReport) -> None:
    """Count examples and re-derive multiplication lines in batches of one layout, in file order."""
    batch: list[tuple[int, Example]] = []
    batch_layout = None
    for line_number, example in stream:
        report.examples += 1
        shape = multiplication_shape(example.question)
        layout = (shape, cot_layout(example.cot))
        if batch and (layout != batch_layout or len(batch) == CHECK_BATCH_LINES):
            _check_multiplication_batch(batch, batch_layout, report)
            batch = []
        if shape is not None and not report.mismatch_found:
            batch.append((line_number, example))
            batch_layout = layout
    if batch:
        _check_multiplication_batch(batch, batch_layout, report)


def cot_layout(cot: str) -> str:
    """The multiplication layout a CoT is written in (see icot/data/multiply.py)."""
    if " + " not in cot:
        return "columns"
    # Only the final-sum layout ends its CoT with a running sum; the papers' ends with a partial product.
    return "final_sum" if cot.endswith(")") else "paper"


def _check_multiplication_batch(batch: list[tuple[int, Example]], layout: tuple[tuple[int, int], str],
                                report: FileReport) -> None:
    shape, layout_name = layout
    a_digits, b_digits = digits_from_inputs([example.question for _, example in batch], *shape)
    expected_lines = render_rows(a_digits, b_digits, layout_name).tobytes().decode("ascii").splitlines()
    for matching, ((line_number, found), expected_line) in enumerate(zip(batch, expected_lines)):
        if expected_line != format_line(found):
            report.problems.append((line_number, describe_mismatch(parse_line(expected_line), found)))
            report.multiplication_lines += matching
            report.mismatch_found = True
            return
    report.multiplication_lines += len(batch)


def describe_mismatch(expected: Example, found: Example) -> str:
    """Which part of a multiplication line differs from its re-derivation, showing the first bad term."""
    if expected.cot != found.cot:
        separator = " " if cot_layout(expected.cot) == "columns" else " + "
        expected_terms, found_terms = expected.cot.split(separator), found.cot.split(separator)
        for number, (want, have) in enumerate(zip_longest(expected_terms, found_terms, fillvalue=""), 1):
            if want != have:
                return (f"CoT does not match the operands at term {number} of {len(expected_terms)} "
                        f"(expected {want!r}, found {have!r})")
    return f"answer does not match the operands (expected {expected.answer!r}, found {found.answer!r})"


def check_files_cli(files, skip_bad: bool = False) -> None:
    """`icot data check FILE...`: one summary line per file; problems as FILE:LINE: problem (FILE: record N:
    problem) on stderr."""
    skip_bad, files = skip_bad_and_files(skip_bad, [str(path) for path in files])
    if not files:
        raise UserError("give at least one data file to check")
    failed = False
    for path in files:
        report = check_file(path, skip_bad=skip_bad)
        for line in report.problem_lines():
            print(line, file=sys.stderr)
        print(report.summary())
        failed = failed or bool(report.problems)
    if failed:
        raise SystemExit(1)


def skip_bad_and_files(skip_bad, files: list[str]) -> tuple[bool, list[str]]:
    """Fire reads `--skip_bad FILE ...` as skip_bad=FILE and `--skip_bad=true` as a string: undo both."""
    if isinstance(skip_bad, bool):
        return skip_bad, files
    if str(skip_bad).lower() in ("true", "false"):
        return str(skip_bad).lower() == "true", files
    return True, [str(skip_bad), *files]
