"""`icot data convert`: any data icot reads (text lines, a Coconut JSON list, a dataset folder), written as
icot's `INPUT||COT #### ANSWER` lines, so that every other tool (and the reference code of ICoT) can read it.

The output is written beside itself under a temporary name and renamed over `--out` only once every
example is written: a malformed record stops the conversion and leaves an existing output as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

from icot.data.check import skip_bad_and_files
from icot.data.reader import ExampleStream, format_line, place
from icot.errors import UserError
from icot.files import check_output_file


def convert_file(source, out, skip_bad: bool = False) -> ExampleStream:
    """Write the examples of `source` to the text file `out`; the stream that read them (its counts)."""
    source, out = Path(source), Path(out)
    refuse_overwriting_source(source, out)
    check_output_file(out, "--out")
    stream = ExampleStream(source, skip_bad=skip_bad, log_skipped=False)
    partial = out.with_name(f".{out.name}.icot-convert.{os.getpid()}")
    try:
        with partial.open("w", encoding="utf-8", newline="\n") as handle:
            for _, example in stream:
                handle.write(format_line(example) + "\n")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return stream


def refuse_overwriting_source(source: Path, out: Path) -> None:
    """`out` must be neither `source` (however spelled) nor inside a dataset folder `source`, where
    `datasets` would read it as data."""
    if not source.exists():
        return   # the reader says so
    if out.exists() and os.path.samefile(out, source):
        raise UserError(f"--out: {out} is the data being converted; name another file")
    if source.is_dir() and out.resolve().is_relative_to(source.resolve()):
        raise UserError(f"--out: {out} is inside the dataset folder {source}; name a file outside it")


def convert_cli(source=None, out=None, skip_bad=False) -> None:
    """`icot data convert SOURCE --out FILE [--skip_bad]`: convert, print one summary line."""
    skip_bad, sources = skip_bad_and_files(skip_bad, [] if source is None else [str(source)])
    if len(sources) != 1:
        raise UserError("give the data to convert: icot data convert SOURCE --out FILE.txt")
    if out is None or isinstance(out, bool):
        raise UserError("--out: name the text file to write, e.g. --out train.txt")
    stream = convert_file(sources[0], str(out), skip_bad=skip_bad)
    skipped = ""
    if stream.skipped:
        number, problem = stream.bad_lines[0]
        skipped = (f"; skipped {stream.skipped} malformed {stream.unit}(s), the first "
                   f"{place(stream.path, number, stream.unit)}: {problem}")
    print(f"wrote {stream.examples} examples of {stream.path} ({stream.format}) to {out}{skipped}")
