"""Checks that an output can be written, made before the work whose results it would hold."""

from __future__ import annotations

import os
from pathlib import Path

from icot.errors import UserError


def writable_folder(folder: Path, what: str) -> None:
    """Create `folder` and check that a file can be written in it: a one-line error otherwise, before the
    work that would be lost."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what}: {folder} is a file; name a folder")
    probe = folder / f".icot-write-test.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{what}: cannot write {folder} ({err.strerror})") from None


def check_output_file(path: Path, what: str) -> None:
    """`path` can be written as a file: not a folder, its folder creatable and writable."""
    if path.is_dir():
        raise UserError(f"{what}: {path} is a folder; name a file, e.g. {path / 'eval.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            open(path, "a").close()   # writable, left as it is
        else:
            # One probe per process: every rank of a multi-rank eval checks the same --out at once.
            probe = path.with_name(f".{path.name}.icot-write-test.{os.getpid()}")
            probe.write_text("")
            probe.unlink()
    except OSError as err:
        raise UserError(f"{what}: cannot write {path} ({err.strerror})") from None
