"""A stage's exports and which one a later stage reads.

Every stage writes its final export into `<stage>/export/`. With `train.export_each_epoch` (or
`train.export_every` steps) it also keeps intermediate ones in `<stage>/exports/epoch<N>/` (or
`step<N>/`). `<stage>/exports.json` lists them all, the final one included, with the step, the epoch
and the validation result at that point. A stage that reads an earlier stage picks one with
`inputs.<role>.export`: `last` (the final export, the default), `best` (the best validation: highest
accuracy where the stage decodes, else lowest loss; a stage may say otherwise, `Stage.selection_score`),
`epoch N` or `step N`. With `train.export_best` a stage also keeps `exports/best`, which follows its best
validation.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from icot.errors import UserError

INDEX_FILE = "exports.json"
FINAL_FOLDER = "export"          # Paths.export
INTERMEDIATE_FOLDER = "exports"


class ExportChoice:
    """`last`, `best`, `epoch N` or `step N` (N >= 1): the value of `inputs.<role>.export`."""

    DESCRIPTION = "last, best, 'epoch N' or 'step N'"
    PATTERN = re.compile(r"(last|best)|(epoch|step)\s*(\d+)")

    def __init__(self, kind: str, number: int | None = None):
        self.kind, self.number = kind, number

    @classmethod
    def from_text(cls, text: str) -> "ExportChoice":
        match = cls.PATTERN.fullmatch(text.strip().lower())
        if not match or (match.group(3) is not None and int(match.group(3)) < 1):
            raise ValueError("expected last, best, 'epoch N' or 'step N' (N >= 1)")
        if match.group(1):
            return cls(match.group(1))
        return cls(match.group(2), int(match.group(3)))

    def __str__(self) -> str:
        return self.kind if self.number is None else f"{self.kind} {self.number}"

    def __repr__(self) -> str:
        return f"ExportChoice({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ExportChoice) and (self.kind, self.number) == (other.kind, other.number)

    def __hash__(self) -> int:
        return hash((self.kind, self.number))


LAST = ExportChoice("last")


def intermediate_name(step: int, epoch: int | None) -> str:
    """`epoch3` at an epoch boundary, else `step1500`."""
    return f"epoch{epoch}" if epoch is not None else f"step{step}"


def read_index(stage_folder: Path) -> list[dict]:
    path = Path(stage_folder) / INDEX_FILE
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(entries, list):
        raise UserError(f"{path}: expected a list of exports")
    return entries


def record_export(stage_folder: Path, entry: dict) -> None:
    """Add (or replace, by name) one entry of the index; written under a temporary name, then renamed."""
    stage_folder = Path(stage_folder)
    entries = [e for e in read_index(stage_folder) if e.get("name") != entry["name"]] + [entry]
    entries.sort(key=lambda e: (e["name"] == "last", e["step"]))
    partial = stage_folder / f"{INDEX_FILE}.partial"
    partial.write_text(json.dumps(entries, indent=2) + "\n")
    os.replace(partial, stage_folder / INDEX_FILE)


def _score(entry: dict) -> float | None:
    """The stage's score of the export (`Stage.selection_score`, recorded with it)."""
    return entry.get("score")


def select_export(stage_folder: Path, choice: ExportChoice, key: str) -> tuple[Path, dict]:
    """The export folder `choice` names in a completed stage folder, and its index entry. `key` is the
    config key that made the choice, for messages."""
    stage_folder = Path(stage_folder)
    if choice.kind == "last":
        entries = [e for e in read_index(stage_folder) if e["name"] == "last"]
        # Stage folders written before exports were indexed hold just `export/`.
        return stage_folder / FINAL_FOLDER, (entries[0] if entries else {"name": "last"})
    entries = read_index(stage_folder)
    if choice.kind == "best":
        scored = [(score, e) for e in entries if (score := _score(e)) is not None]
        if not scored:
            raise UserError(f"{key}: best: no export of {stage_folder} has a validation score "
                            f"(give the stage a data.valid file)")
        best = max(scored, key=lambda pair: (pair[0], -pair[1]["step"]))[1]   # ties: the earliest
        return stage_folder / best["path"], best
    matching = [e for e in entries if e.get(choice.kind) == choice.number]
    if not matching:
        kept = ", ".join(f"epoch {e['epoch']}" if e.get("epoch") else f"step {e['step']}" for e in entries) or "none"
        raise UserError(f"{key}: {choice}: {stage_folder} kept no such export (kept: {kept}); train it with "
                        f"train.export_each_epoch=true or train.export_every=N")
    return stage_folder / matching[0]["path"], matching[0]
