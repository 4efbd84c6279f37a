"""A stage's checkpoints: which are complete, which one a run resumes, which are deleted, and where an
abandoned run's go.

A checkpoint is `<stage>/ckpt/step<N>/`: DeepSpeed's files, each rank's RNG state (`rng_rank<R>.pt`, as
tensors, written whole after that rank's part of DeepSpeed's save), the resolved config of the run that
wrote it (`config.yaml`), and, written last by rank 0 once every rank has saved, `icot_checkpoint.json`:
the step, the world size, the ZeRO stage and the size of every other file. A checkpoint counts only
when that marker exists and every file it lists has its recorded size, so a save cut short (a kill, a
full disk) or a file truncated later is never resumed: resume takes the newest complete checkpoint and
says which newer ones it skipped and why. Checkpoints written before markers existed (no config.yaml
either) count when each rank's RNG file and the model states are non-empty.

Retention orders checkpoints by step, keeps the newest `train.keep_last` complete ones of the run and
never the one just written away. A run that starts from step 0 where checkpoints exist (`resume=never`,
or none of them complete) first moves them, and the exports they led to, into
`<stage>/previous-<time>/`, so two runs never share one checkpoint folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

MARKER = "icot_checkpoint.json"
CONFIG = "config.yaml"
PREFIX = "step"
MODEL_STATES = "mp_rank_00_model_states.pt"
# What a fresh start moves aside: the checkpoints and the exports indexed from them.
RUN_STATE = ("ckpt", "exports", "exports.json")


def tag_of(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int | None:
    match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match else None


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def save_atomic(obj, path: Path) -> None:
    """torch.save under a temporary name, then a rename: the file is whole or absent."""
    import torch

    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    world_size: int
    zero_stage: int | None      # None for a checkpoint written before markers existed

    @property
    def config(self) -> Path | None:
        """The resolved config it was trained with (None for one written before checkpoints held it)."""
        path = self.path / CONFIG
        return path if path.is_file() else None


def write_marker(path: Path, step: int, world_size: int, zero_stage: int) -> None:
    """Mark `path` complete (rank 0, after every rank saved): the step, the run's shape, every file's size."""
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
             if p.is_file() and p.name != MARKER}
    record = {"step": step, "world_size": world_size, "zero_stage": zero_stage, "files": files}
    partial = path / f"{MARKER}.partial"
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path / MARKER)


def inspect(path: Path) -> Checkpoint | str:
    """The checkpoint at `path`, or why it is not a complete one."""
    step = step_of(path)
    marker = path / MARKER
    if not marker.is_file():
        if (path / CONFIG).is_file():   # written by this icot, which writes the marker right after the config
            return f"no {MARKER}: the save did not finish"
        return _legacy(path, step)
    try:
        record = json.loads(marker.read_text())
        files, world, stage = record["files"], int(record["world_size"]), record["zero_stage"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MARKER} is unreadable ({err})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return Checkpoint(path, int(record["step"]), world, stage)


def _legacy(path: Path, step: int | None) -> Checkpoint | str:
    """A checkpoint from before markers: complete when the model states and rank 0..k-1's RNG files exist
    and are non-empty (each rank wrote its RNG file after its part of DeepSpeed's save)."""
    ranks = sorted(int(m.group(1)) for p in path.glob("rng_rank*.pt") if (m := re.fullmatch(r"rng_rank(\d+)\.pt", p.name)))
    if not ranks:
        return "no icot_checkpoint.json: the save did not finish"
    if ranks != list(range(len(ranks))):
        return f"RNG files of ranks {ranks} only: the save did not finish on every rank"
    for name in [MODEL_STATES, *(rng_file(r) for r in ranks)]:
        file = path / name
        if not file.is_file() or file.stat().st_size == 0:
            return f"{name} is {'empty' if file.is_file() else 'missing'}"
    return Checkpoint(path, step, len(ranks), None)


def scan(folder: Path) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """(complete checkpoints, newest first; the incomplete ones with why), of every `step<N>` in `folder`."""
    complete, broken = [], []
    if not folder.is_dir():
        return complete, broken
    for path in sorted((p for p in folder.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of,
                       reverse=True):
        found = inspect(path)
        if isinstance(found, Checkpoint):
            complete.append(found)
        else:
            broken.append((path, found))
    return complete, broken


def newest(folder: Path) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint in `folder`, and the newer incomplete ones skipped for it."""
    complete, broken = scan(folder)
    if not complete:
        return None, broken
    return complete[0], [(path, why) for path, why in broken if step_of(path) > complete[0].step]


def retain(folder: Path, keep: int, just_written: Path) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (by step) and every incomplete one; never
    `just_written`. Returns what was deleted."""
    complete, broken = scan(folder)
    kept = {c.path for c in complete[:keep]} | {just_written}
    doomed = [c.path for c in complete if c.path not in kept] + [path for path, _ in broken if path != just_written]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def move_aside(stage_root: Path) -> Path | None:
    """Move an earlier run's checkpoints and exports into `<stage>/previous-<time>/`; None if there were none."""
    present = [stage_root / name for name in RUN_STATE if (stage_root / name).exists()]
    if not present:
        return None
    target = stage_root / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while target.exists():
        suffix += 1
        target = stage_root / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    target.mkdir()
    for path in present:
        os.replace(path, target / path.name)
    return target
