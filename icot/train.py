"""`icot train <stage>`: set up a stage, run the shared loop, export, write the manifest."""

from __future__ import annotations

import json
import time
from pathlib import Path

from icot import registry
from icot.config import (Paths, StageConfig, config_help, load_resolved, load_stage_config, save_resolved,
                         with_absolute_paths)
from icot.errors import UserError
from icot.stage import DONE_MARKER, PREEMPTED_MARKER


def run_stage(name: str, overrides: list[str]) -> str:
    """Train stage `name` from a recipe and overrides; returns 'done', 'preempted' or 'skipped'
    ('help' for `--help`, which prints every key of the stage's config).

    Everything that can be wrong with the input (config, earlier stages, data, shapes) is checked
    before the stage folder is written, so a failed start loses nothing.
    """
    from icot.loop import StopRequest

    spec = registry.get_stage(name)
    if "--help" in overrides or "-h" in overrides:
        print(config_help(spec.name))
        return "help"
    recipe, rest = split_recipe(overrides)
    config = with_absolute_paths(load_stage_config(spec.name, recipe, rest))
    paths = Paths.of(config)
    if (paths.root / DONE_MARKER).exists():
        print(f"[icot {name}] {paths.root} is already complete; nothing to do")
        return "skipped"

    with StopRequest() as stop:
        return train_stage(spec.load(), config, paths, stop)


def train_stage(cls, config: StageConfig, paths: Paths, stop) -> str:
    import torch

    from icot.checkpoints import move_aside
    from icot.engine import Strategy
    from icot.lock import StageLock
    from icot.loop import Trainer, seed_everything
    from icot.models.decoder import position_limit
    from icot.resume import plan_resume
    from icot.stage import check_input_tokenizers, fit_splits, input_exports, input_folders, load_split, stage_tokenizer

    process_started = time.time()
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    strategy = Strategy(config.train).init_distributed()
    strategy.log(f"torch threads: {torch.get_num_threads()} per rank")
    lock = StageLock(paths.root)
    if strategy.is_main:
        lock.check()   # a second run on this folder stops here, before its set-up
    inputs, exports = input_folders(config), input_exports(config)
    tokenizer = stage_tokenizer(config)
    check_input_tokenizers(tokenizer, exports)
    plan = plan_resume(config, paths, strategy.world_size)   # a changed config is refused here
    stage = cls(config, strategy, tokenizer)
    train_set = load_split(config, tokenizer, "train")
    if train_set is None:
        raise UserError("data.train: no training file given")
    valid_set = load_split(config, tokenizer, "valid")
    seed_everything(config.train.seed)  # the same initial weights in every run and on every rank
    model = stage.build()
    train_set, valid_set = fit_splits(config, position_limit(model), train_set, valid_set)
    stage.check_data(train_set, valid_set, position_limit(model), strategy.log)
    train_set = stage.prepare_train_set(train_set)
    seed_everything(config.train.seed + strategy.rank)  # dropout: a different stream per rank

    # Everything that can be wrong with the input has been checked: from here on the stage folder is written.
    if strategy.is_main:
        lock.acquire()
        if plan.move_aside:
            moved = move_aside(paths.root)
            if moved is not None:
                strategy.log(f"starting {config.stage} from step 0: the earlier run's checkpoints and exports are "
                             f"in {moved}")
        write_stage_files(config, strategy, paths)
    strategy.barrier()
    try:
        trainer = Trainer(stage, config, strategy, paths, train_set, valid_set)
        started = time.time()
        trainer.setup(model, plan)
        status = trainer.train(stop)
        if status == "done":
            trainer.export_final()
            if strategy.is_main:
                write_manifest(paths, config, inputs, exports, trainer, time.time() - started, process_started)
                (paths.root / PREEMPTED_MARKER).unlink(missing_ok=True)
                (paths.root / DONE_MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        elif strategy.is_main:
            (paths.root / PREEMPTED_MARKER).write_text(f"step {trainer.progress.step}\n")
        trainer.close()
    finally:
        lock.release()
    strategy.shutdown()
    strategy.exit_process()   # multi-rank runs end here, exit 0 (see Strategy.exit_process)
    return status


def split_recipe(overrides: list[str]) -> tuple[str | None, list[str]]:
    """`--config RECIPE` / `--config=RECIPE` out of the overrides."""
    rest, recipe = [], None
    tokens = iter(overrides)
    for token in tokens:
        if token == "--config":
            recipe = next(tokens, None)
            if recipe is None:
                raise UserError("--config needs a recipe path")
        elif token.startswith("--config="):
            recipe = token.split("=", 1)[1]
        else:
            rest.append(token)
    if recipe is not None and not Path(recipe).is_file():
        raise UserError(f"--config: no such recipe file {recipe}")
    return recipe, rest


def write_stage_files(config: StageConfig, strategy, paths: Paths) -> None:
    """The resolved config and DeepSpeed config. A resumed run with a changed config keeps the
    earlier one beside it, so nothing already written is lost."""
    paths.root.mkdir(parents=True, exist_ok=True)
    if paths.config.exists():
        previous = load_resolved(str(paths.config))
        if previous != config:
            paths.config.rename(paths.root / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    save_resolved(config, paths.config)
    paths.ds_config.write_text(json.dumps(strategy.ds_config, indent=2) + "\n")


def write_manifest(paths: Paths, config: StageConfig, inputs: dict[str, Path], exports: dict[str, tuple[Path, dict]],
                   trainer, seconds: float, started_at: float) -> None:
    import torch

    from icot.exports import read_index

    spec = registry.get_stage(config.stage)
    manifest = {
        "stage": config.stage,
        "method": spec.method,
        # earlier stage -> its folder, and which of its exports was read (`inputs.<role>.export`).
        "inputs": {spec.reads[role]: str(folder.resolve()) for role, folder in inputs.items()},
        "input_exports": {spec.reads[role]: {"role": role, "choice": str(config.inputs.__dict__[role].export),
                                             "path": str(folder.resolve()), "step": entry.get("step"),
                                             "epoch": entry.get("epoch")}
                          for role, (folder, entry) in exports.items()},
        "data": {split: getattr(config.data, split) for split in ("train", "valid", "test")},
        "tokenizer": config.model.tokenizer or config.model.name_or_path,
        "steps": trainer.progress.step,
        "examples": trainer.progress.examples,
        "tokens": trainer.progress.tokens,
        "wall_seconds": round(seconds, 1),
        # The training loop's time over every process the stage ran in (a resumed stage's earlier ones
        # included, its set-up not): what `icot compare` reports as the stage's training time.
        "train_seconds": round(trainer.progress.seconds, 3),
        # Over the optimizer steps only (icot.flops: the formula; mfu where the device's peak is known).
        "throughput": {**trainer.progress.throughput(trainer.strategy.world_size, trainer.peak_flops),
                       "step_seconds": round(trainer.progress.step_seconds, 6),
                       "model_flops": trainer.progress.model_flops,
                       "peak_flops_per_device": trainer.peak_flops},
        "started_at": round(started_at, 1),    # this run's process, set-up included (epoch seconds)
        "finished_at": round(time.time(), 1),
        "world_size": trainer.strategy.world_size,
        "threads": torch.get_num_threads(),   # per rank
        "validation": trainer.last_validation,
        "resumed_with_changes": trainer.config_changes,
        "export": str(paths.export.resolve()),
        "exports": read_index(paths.root),
    }
    paths.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
