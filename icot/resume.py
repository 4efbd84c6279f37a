"""What a run starts from: a checkpoint to resume (and whether its config may change), or step 0.

Decided before the stage folder is written, on every rank alike (each reads the same folder):

- `train.resume=auto` takes the newest complete checkpoint in `<stage>/ckpt` (`icot.checkpoints`),
  `never` none, a path that checkpoint folder (or the newest complete one in it).
- The checkpoint's resolved config is compared with this run's. A change of a field marked
  `resumable` (the learning rate, the schedule, the number of steps, logging...) applies from the
  resumed step on and is logged and recorded; any other change (a shape, the data, the batch size, the
  seed, the precision, a method option) is refused with one line naming the keys, nothing written.
- Another world size resumes too: ZeRO 0 checkpoints hold whole states, ZeRO 1-2 ones are written
  elastic (`zero_optimization.elastic_checkpoint`); a ZeRO-3 checkpoint resumes on its own world size
  only, and another one is refused with what to do.
- Starting from step 0 where an earlier run left checkpoints moves them aside first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from icot.checkpoints import Checkpoint, inspect, newest, step_of
from icot.config import Paths, StageConfig, config_to_dict, load_resolved, path_keys, resolved_path
from icot.errors import UserError


@dataclass
class ResumePlan:
    checkpoint: Checkpoint | None                      # None: start from step 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)   # newer, incomplete checkpoints
    changes: dict[str, tuple] = field(default_factory=dict)         # key -> (old, new), applied
    move_aside: bool = False                           # step 0 over an earlier run's checkpoints

    def describe(self) -> list[str]:
        """Log lines: what was skipped, what changed."""
        lines = [f"skipped checkpoint {path}: {why}" for path, why in self.skipped]
        if self.changes:
            lines.append("resuming with changed settings: " + ", ".join(
                f"{key} {old!r} -> {new!r}" for key, (old, new) in self.changes.items()))
        return lines


def plan_resume(config: StageConfig, paths: Paths, world_size: int) -> ResumePlan:
    mode = config.train.resume
    earlier = paths.ckpt.is_dir() and any(paths.ckpt.iterdir())
    if mode == "never":
        return ResumePlan(None, move_aside=earlier)
    if mode == "auto":
        checkpoint, skipped = newest(paths.ckpt)
        if checkpoint is None:
            return ResumePlan(None, skipped, move_aside=earlier)
    else:
        checkpoint, skipped = _named(Path(mode))
    plan = ResumePlan(checkpoint, skipped)
    _check_world_size(checkpoint, world_size)
    plan.changes = config_changes(_trained_with(checkpoint, paths), config, checkpoint)
    return plan


def _named(path: Path) -> tuple[Checkpoint, list[tuple[Path, str]]]:
    """`train.resume=PATH`: a checkpoint folder, or a folder of them (its newest complete one)."""
    if not path.is_dir():
        raise UserError(f"train.resume: no folder {path}")
    if step_of(path) is not None:
        found = inspect(path)
        if not isinstance(found, Checkpoint):
            raise UserError(f"train.resume: {path} is not a complete checkpoint: {found}")
        return found, []
    checkpoint, skipped = newest(path)
    if checkpoint is None:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped) or "no step<N> folder"
        raise UserError(f"train.resume: no complete checkpoint in {path} ({reasons})")
    return checkpoint, skipped


def _check_world_size(checkpoint: Checkpoint, world_size: int) -> None:
    if checkpoint.world_size == world_size or checkpoint.zero_stage in (0, 1, 2):
        return
    if checkpoint.zero_stage is None:
        raise UserError(f"{checkpoint.path} was written by {checkpoint.world_size} rank(s) by an older icot, whose "
                        f"checkpoints resume on the same number of ranks only, not {world_size}; run on "
                        f"{checkpoint.world_size}, or start over with --train.resume=never")
    raise UserError(f"{checkpoint.path} was written by {checkpoint.world_size} rank(s) under ZeRO-3, whose "
                    f"partitioned states resume on {checkpoint.world_size} rank(s) only, not {world_size}: run "
                    f"on {checkpoint.world_size}, convert it with DeepSpeed's ds_to_universal, or start over "
                    f"with --train.resume=never (the old checkpoints are moved aside)")


def _trained_with(checkpoint: Checkpoint, paths: Paths) -> StageConfig | None:
    """The config the checkpoint was trained with: its own copy, or (from before checkpoints held one)
    the stage's config.yaml."""
    source = checkpoint.config or (paths.config if paths.config.is_file() else None)
    return load_resolved(str(source)) if source is not None else None


def config_changes(previous: StageConfig | None, config: StageConfig, checkpoint: Checkpoint) -> dict[str, tuple]:
    """key -> (old, new) of every value that differs; a difference in a field not marked `resumable` is
    refused (UserError naming the keys)."""
    if previous is None:
        return {}
    # The run folder is where the checkpoint was found: however it is written, it is not a change.
    old, new = (_flat({k: v for k, v in config_to_dict(c).items() if k != "run_dir"}) for c in (previous, config))
    allowed, paths = resumable_keys(type(config)), path_keys(type(config))
    changed = {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)
               and not (key in paths and resolved_path(old.get(key)) == resolved_path(new.get(key)))}
    refused = {key: values for key, values in changed.items() if key not in allowed}
    if refused:
        listed = ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in refused.items())
        raise UserError(f"cannot resume {checkpoint.path} with a changed {listed}: it changes what the run trains "
                        f"(shapes, data, batch or method); set it back, use another run_dir, or start over with "
                        f"--train.resume=never")
    return changed


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def resumable_keys(cls, prefix: str = "") -> set[str]:
    """Dotted keys of the fields marked `resumable`."""
    import typing

    keys, hints = set(), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= resumable_keys(hints[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("resumable"):
            keys.add(prefix + f.name)
    return keys
