"""The one training loop, shared by every stage.

Read top to bottom: set up (data order, engine, resume), then for every optimizer step: the stage's
step hook (its schedule), micro batches with accumulation, one all-reduced log record, validation,
intermediate exports, checkpoint, stop on a signal. Every collective (metrics, checkpoints,
validation, exports) runs on all ranks at the same step. A checkpoint holds the model, optimizer, LR
schedule, data position, RNG and the stage's schedule state, so a resumed run continues bitwise.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from icot import checkpoints
from icot.config import Paths, StageConfig, save_resolved
from icot.data.collate import examples_at, rank_batches
from icot.errors import UserError
from icot.files import writable_folder
from icot.exports import INTERMEDIATE_FOLDER, intermediate_name, record_export
from icot.stage import Stage, StepContext


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass
class Progress:
    step: int = 0          # optimizer steps done
    examples: int = 0      # training examples consumed (all ranks)
    tokens: int = 0        # non-padding tokens through the trained model (all ranks)
    seconds: float = 0.0   # the loop's wall time (steps, validations, checkpoints), over every process it ran in
    step_seconds: float = 0.0   # the part of it spent in optimizer steps
    model_flops: float = 0.0    # the trained model's forward + backward FLOPs (all ranks; icot.flops)

    def add_step(self, examples: int, tokens: int, flops: float, seconds: float) -> None:
        self.step += 1
        self.examples += examples
        self.tokens += tokens
        self.model_flops += flops
        self.step_seconds += seconds

    def throughput(self, world_size: int, peak_flops: float | None) -> dict:
        """tokens/s, samples/s, model TFLOPS per device and MFU over the optimizer steps so far."""
        return throughput(self.tokens, self.examples, self.model_flops, self.step_seconds, world_size, peak_flops)


def throughput(tokens: float, examples: float, flops: float, seconds: float, world_size: int,
               peak_flops: float | None) -> dict:
    seconds = max(seconds, 1e-9)
    per_device = flops / seconds / world_size
    figures = {"tokens_per_s": tokens / seconds, "samples_per_s": examples / seconds,
               "model_tflops_per_device": per_device / 1e12}
    if peak_flops:
        figures["mfu"] = per_device / peak_flops
    return figures


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption), SIGHUP (a closed terminal) and Ctrl-C (SIGINT) ask for a
    checkpoint and a clean exit at the next step; a second Ctrl-C aborts at once. Installed before the slow
    set-up (data, engines, resume), so an early signal is not lost."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        if signum == signal.SIGINT:
            print("\n[icot] Ctrl-C: checkpointing at the next step, then exiting (Ctrl-C again aborts)",
                  file=sys.stderr, flush=True)
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def batch_order(num_examples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """[steps, batch_size] example indices of one epoch: a seeded permutation, last partial batch dropped."""
    permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
    steps = num_examples // batch_size
    return permutation[: steps * batch_size].reshape(steps, batch_size)


def micro_batch_indices(step_indices: np.ndarray, micro: int, accumulation: int, world: int, rank: int):
    """This rank's micro batches of one optimizer step. Chunk c = a * world + rank, so the grouping of
    examples into micro batches is the same for any split of the global batch across ranks."""
    chunks = step_indices.reshape(accumulation * world, micro)
    return [chunks[a * world + rank] for a in range(accumulation)]


def total_steps(config: StageConfig, num_examples: int) -> tuple[int, int]:
    """(optimizer steps in the run, steps per epoch)."""
    per_epoch = num_examples // config.train.batch_size
    if per_epoch == 0:
        raise UserError(f"data.train: {num_examples} examples is fewer than one batch "
                        f"(train.batch_size={config.train.batch_size})")
    steps = config.train.max_steps if config.train.max_steps is not None else math.ceil(config.train.epochs * per_epoch)
    return max(steps, 1), per_epoch


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch generators from one seed (the same weights in every run and on every rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python's, NumPy's and torch's generator states as tensors and numbers, so that a checkpoint's RNG
    file loads with `torch.load(weights_only=True)`, which runs no code from the file."""
    version, words, gauss = random.getstate()
    _, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": torch.tensor(words, dtype=torch.int64), "python_version": version, "python_gauss": gauss,
            "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_position": int(position),
            "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(cached), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_position"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])


class Trainer:
    def __init__(self, stage: Stage, config: StageConfig, strategy, paths: Paths, train_set, valid_set=None):
        self.stage, self.config, self.strategy, self.paths = stage, config, strategy, paths
        self.train_set, self.valid_set = train_set, valid_set
        self.train_cfg = config.train
        self.steps, self.steps_per_epoch = total_steps(config, len(train_set))
        self.micro = strategy.micro_batch_size
        self.accumulation = strategy.gradient_accumulation
        self.progress = Progress()
        self.clock: tuple[float, float] | None = None   # set when the loop starts (see `train`)
        self.config_changes: list[dict] = []   # settings a resumed run changed, step by step (the manifest's)
        self.saved_step: int | None = None      # the step of this run's newest checkpoint
        self.best_score: float | None = None    # the best validation so far (train.export_best)
        self.last_validation: dict[str, float] | None = None
        self.writer = None
        self.peak_flops: float | None = None   # the device's, for MFU (set up)
        self._epoch_order: tuple[int, np.ndarray] | None = None   # (epoch, batch_order): one permutation per epoch

    # -- set up ----------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, plan) -> None:
        """The engine, then the checkpoint `plan` names (an `icot.resume.ResumePlan`), then TensorBoard."""
        self.engine = self.strategy.prepare_trainable(model, total_steps=self.steps)
        from icot.flops import peak_flops

        self.peak_flops = peak_flops(self.strategy.device, self.train_cfg.precision, self.train_cfg.peak_tflops)
        for line in plan.describe():
            self.log(line)
        if plan.checkpoint is not None:
            self.resume(plan)
        if self.strategy.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writable_folder(self.paths.tb, "the TensorBoard folder")
            # One writer, fixed folder; purge_step drops events an interrupted run wrote past its checkpoint
            # (all of them when this run starts from step 0).
            self.writer = SummaryWriter(str(self.paths.tb), purge_step=self.progress.step + 1)

    def resume(self, plan) -> None:
        checkpoint = plan.checkpoint
        client_state = self.strategy.load_checkpoint(self.engine, checkpoint.path.parent, checkpoint.path.name)
        self.progress = Progress(**client_state["progress"])
        self.stage.load_state_dict(client_state.get("stage", {}))
        self.config_changes = client_state.get("config_changes", [])
        self.best_score = client_state.get("best_score")
        if plan.changes:
            self.config_changes.append({"step": self.progress.step, "changes": {
                key: [old, new] for key, (old, new) in plan.changes.items()}})
        self.strategy.apply_optimizer_settings(self.engine)
        rank, world = self.strategy.rank, self.strategy.world_size
        rng = checkpoint.path / checkpoints.rng_file(rank)
        try:
            set_rng_state(torch.load(rng, weights_only=True))
        except FileNotFoundError:   # a rank the checkpoint's smaller run did not have
            seed_everything(self.train_cfg.seed + rank + 1_000_003 * self.progress.step)
            self.log(f"rank {rank}: no RNG state in {checkpoint.path} (written by {checkpoint.world_size} rank(s)); "
                     f"seeded from the seed, the rank and the step")
        except Exception:   # an RNG file of an older icot, pickled with numpy objects: not loaded unsafely
            seed_everything(self.train_cfg.seed + rank + 1_000_003 * self.progress.step)
            self.log(f"{rng}: not a tensor-only RNG state (written by an older icot?); seeded from the seed, the "
                     f"rank and the step instead")
        where = "" if checkpoint.world_size == world else f", written by {checkpoint.world_size} rank(s), on {world}"
        self.log(f"resumed from {checkpoint.path} at step {self.progress.step}{where}")

    # -- train -----------------------------------------------------------------------------------
    def train(self, stop: StopRequest) -> str:
        """Run to the end or to a stop request; returns 'done' or 'preempted'."""
        from tqdm import tqdm

        # ICOT_PROGRESS_BAR=0: a stage run beside another (icot pipeline) leaves the terminal to its bar.
        bar = tqdm(total=self.steps, initial=self.progress.step, desc=self.stage.name, dynamic_ncols=True,
                   disable=not self.strategy.is_main or os.environ.get("ICOT_PROGRESS_BAR") == "0")
        window = Progress()   # the steps since the last log line
        self.clock = (time.perf_counter(), self.progress.seconds)   # this process's start, the earlier ones' time
        # The bar is closed on every way out, so that an error message starts on a line of its own.
        with bar:
            while self.progress.step < self.steps:
                started = time.perf_counter()
                record, tokens, flops = self.optimizer_step()
                seconds = time.perf_counter() - started
                for progress in (self.progress, window):
                    progress.add_step(self.train_cfg.batch_size, tokens, flops, seconds)
                step = self.progress.step
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if step % self.train_cfg.log_every == 0 or step == self.steps:
                    record.update(window.throughput(self.strategy.world_size, self.peak_flops))
                    self.write_scalars("train", record, step)
                    self.log(f"step {step}/{self.steps} " + " ".join(f"{k} {v:.4g}" for k, v in record.items()))
                    window = Progress()
                validation = None
                if self.validation_due(step) and step < self.steps:
                    validation = self.validate(step)
                if self.export_due(step) and step < self.steps:
                    self.export_intermediate(step, validation if validation is not None else self.validate(step))
                elif validation is not None:
                    self.export_if_best(validation)
                saved = self.train_cfg.save_every and step % self.train_cfg.save_every == 0 and step < self.steps
                if saved:
                    self.save_checkpoint()
                if self.strategy.any_rank(stop.requested):
                    if not saved:
                        self.save_checkpoint()
                    bar.close()
                    self.log(f"stop requested: checkpoint written at step {step} after "
                             f"{self.progress.seconds:.3f} s of training, exiting")
                    return "preempted"
        final = self.validate(self.progress.step)
        if final is not None:
            self.export_if_best(final)
        self.save_checkpoint()
        return "done"

    def optimizer_step(self) -> tuple[dict[str, float], int, float]:
        """One optimizer step over this rank's micro batches; returns the all-reduced record, and the step's
        tokens through the trained model and its model FLOPs (all ranks). The caller counts the step."""
        step = self.progress.step
        global_batch = self.epoch_order(step)[step % self.steps_per_epoch]
        update = self.stage.on_step(StepContext(step, step // self.steps_per_epoch, self.steps_per_epoch, global_batch,
                                                self.steps))
        if update.reset_optimizer:
            self.strategy.reset_optimizer(self.engine)
        if update.lr_scale != 1.0:   # on the schedule's rate of this step, which the scheduler sets afresh after it
            self.strategy.scale_lr(self.engine, update.lr_scale)
        indices = micro_batch_indices(global_batch, self.micro, self.accumulation, self.strategy.world_size,
                                      self.strategy.rank)
        sums: dict[str, float] = {}
        tokens, flops = 0, 0.0
        lr = self.strategy.current_lr(self.engine)  # the rate this step uses (the scheduler moves on after it)
        for micro_indices in indices:
            features = examples_at(self.train_set, micro_indices)
            for feature, index in zip(features, micro_indices):
                feature["index"] = int(index)   # for a schedule that decides per example
            batch = self.stage.collate(features)
            metrics = self.stage.loss(self.engine, batch)
            info = self.strategy.backward_step(self.engine, metrics["loss"])
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            tokens += self.stage.trained_tokens(batch)[0]
            flops += self.stage.batch_flops(self.engine, batch)
        record = self.strategy.all_reduce_mean({k: v / len(indices) for k, v in sums.items()})
        if "label_tokens" in record:
            record["token_accuracy"] = record.pop("correct_tokens") / max(record.pop("label_tokens"), 1e-9)
        if not math.isfinite(record["loss"]):
            raise TrainingDiverged(f"{self.stage.name}: loss is {record['loss']} at step {step + 1}; "
                                   f"stopping (lower train.lr or enable train.grad_clip)")
        self.stage.after_step(record)
        record["lr"] = lr
        record.update(update.scalars)
        if info.grad_norm is not None:
            record["grad_norm"] = float(info.grad_norm)
        totals = self.strategy.all_reduce_sum({"tokens": float(tokens), "flops": flops})
        return record, int(totals["tokens"]), totals["flops"]

    def epoch_order(self, step: int) -> np.ndarray:
        """The batch order of the epoch `step` is in, computed once per epoch (permuting the paper's 808k
        examples takes 15 ms of CPU, every step otherwise)."""
        epoch = step // self.steps_per_epoch
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = batch_order(len(self.train_set), self.train_cfg.batch_size, self.train_cfg.seed, epoch)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    # -- validate --------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float] | None:
        if self.valid_set is None or len(self.valid_set) == 0:
            return None
        from icot.evaluate import answers_match

        model = self.engine
        model.eval()
        rank, world = self.strategy.rank, self.strategy.world_size
        sums: dict[str, float] = {}
        # Every rank runs the same number of batches (collectives under ZeRO-3 need it): a rank whose
        # shard is exhausted runs a padding batch that counts for nothing.
        for suffix, setting in self.stage.validation_settings().items():
            for key in ("loss", "examples", "correct_tokens", "label_tokens"):
                sums[key + suffix] = 0.0
            with setting:
                for rows in rank_batches(len(self.valid_set), self.micro, rank, world):
                    metrics = self.stage.loss(model, self.stage.collate(examples_at(self.valid_set, rows or [0])))
                    if rows:  # the loss weighted by examples: the same mean for any split into batches and ranks
                        sums["loss" + suffix] += len(rows) * float(metrics["loss"])
                        sums["examples" + suffix] += len(rows)
                        if "label_tokens" in metrics:
                            sums["correct_tokens" + suffix] += float(metrics["correct_tokens"])
                            sums["label_tokens" + suffix] += float(metrics["label_tokens"])
        sums["exact"], sums["generated"] = 0.0, 0.0
        if self.train_cfg.eval_examples and self.stage.generation_target is not None:
            decoded = min(self.train_cfg.eval_examples, len(self.valid_set))
            for rows in rank_batches(decoded, self.micro, rank, world):
                features = examples_at(self.valid_set, rows or [0])
                generated = self.stage.generate(model, features, synced=world > 1)
                if rows:
                    sums["exact"] += sum(answers_match(self.stage.tokenizer, ids, f["answer"])
                                         for ids, f in zip(generated, features))
                    sums["generated"] += len(rows)
        totals = self.strategy.all_reduce_sum(sums)
        result = {}
        for suffix in self.stage.validation_settings():
            result["loss" + suffix] = totals["loss" + suffix] / max(totals["examples" + suffix], 1)
            if totals["label_tokens" + suffix]:
                result["token_accuracy" + suffix] = totals["correct_tokens" + suffix] / totals["label_tokens" + suffix]
        if totals["generated"]:
            result["accuracy"] = totals["exact"] / totals["generated"]
        model.train()
        self.write_scalars("valid", result, step)
        self.log(f"validation at step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in result.items()))
        self.last_validation = result
        return result

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """On all ranks (DeepSpeed's save is a collective), then the run's config and, last, the marker
        that makes it count (icot.checkpoints); keeps the newest train.keep_last by step."""
        step = self.progress.step
        folder, tag = self.paths.ckpt, checkpoints.tag_of(step)
        if self.clock is not None:
            started, before = self.clock
            self.progress.seconds = before + time.perf_counter() - started
        stage_state = self.stage.state_dict()
        self.check_same_on_every_rank(stage_state)
        client_state = {"progress": asdict(self.progress), "stage": stage_state, "config_changes": self.config_changes,
                        "best_score": self.best_score}
        self.strategy.save_checkpoint(self.engine, folder, tag, client_state=client_state)
        self.saved_step = step
        (folder / tag).mkdir(parents=True, exist_ok=True)
        checkpoints.save_atomic(rng_state(), folder / tag / checkpoints.rng_file(self.strategy.rank))
        self.strategy.barrier()
        if self.strategy.is_main:
            save_resolved(self.config, folder / tag / checkpoints.CONFIG)
            checkpoints.write_marker(folder / tag, step, self.strategy.world_size, self.train_cfg.zero_stage)
            for path in checkpoints.retain(folder, self.train_cfg.keep_last, folder / tag):
                self.log(f"removed checkpoint {path}")
        self.strategy.barrier()

    def check_same_on_every_rank(self, stage_state: dict) -> None:
        """The schedule must agree across ranks (a resumed run restores rank 0's on all of them)."""
        digest = int(hashlib.sha256(repr(stage_state).encode()).hexdigest()[:12], 16)   # exact in float64
        if not self.strategy.all_equal(float(digest)):
            raise RuntimeError(f"{self.stage.name}: the stage's schedule state differs between ranks at step "
                               f"{self.progress.step}; on_step must depend on the step, the epoch and the seed only")

    # -- exports ---------------------------------------------------------------------------------
    def export_due(self, step: int) -> bool:
        every, epoch = self.train_cfg.export_every, self.epoch_at(step)
        return bool((epoch is not None and (self.train_cfg.export_each_epoch or epoch in self.train_cfg.export_epochs))
                    or (every and step % every == 0))

    def validation_due(self, step: int) -> bool:
        every = self.train_cfg.eval_every
        return bool((every and step % every == 0) or (self.train_cfg.eval_each_epoch and self.epoch_at(step)))

    def epoch_at(self, step: int) -> int | None:
        """The number of whole epochs done at `step`, where `step` ends one."""
        return step // self.steps_per_epoch if step % self.steps_per_epoch == 0 else None

    def export_intermediate(self, step: int, validation: dict | None) -> None:
        name = intermediate_name(step, self.epoch_at(step))
        self.write_export(self.paths.root / INTERMEDIATE_FOLDER / name, name, validation)
        if validation is not None:
            self.export_if_best(validation)

    def export_if_best(self, validation: dict) -> None:
        """With train.export_best, `<stage>/exports/best` follows the best validation (the stage's score)."""
        score = self.stage.selection_score(validation)
        if not self.train_cfg.export_best or score is None or (self.best_score is not None and score <= self.best_score):
            return
        self.best_score = score
        self.write_export(self.paths.root / INTERMEDIATE_FOLDER / "best", "best", validation)

    def export_final(self) -> None:
        """The stage's export (`<stage>/export`), read by later stages and `icot eval`; on every rank."""
        self.write_export(self.paths.export, "last", self.last_validation)

    def write_export(self, folder: Path, name: str, validation: dict | None) -> None:
        """Gather the weights (a collective under ZeRO-3), write them on rank 0, index the export."""
        state_dict = self.strategy.state_dict_for_export(self.engine)
        if self.strategy.is_main:
            step = self.progress.step
            score = self.stage.selection_score(validation) if validation else None
            try:
                self.stage.export(self.engine, state_dict, folder)
                record_export(self.paths.root, {"name": name, "path": str(folder.relative_to(self.paths.root)),
                                                "step": step, "epoch": self.epoch_at(step), "validation": validation,
                                                "score": score})
            except OSError as err:
                raise UserError(f"cannot write the export {folder} ({err.strerror}); the checkpoint of step "
                                f"{self.saved_step} is kept: make the folder writable and rerun to export") from None
            self.log(f"exported {folder} (step {step})")
        self.strategy.barrier()

    # -- logging ---------------------------------------------------------------------------------
    def write_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
            self.writer.flush()

    def log(self, message: str) -> None:
        if self.strategy.is_main:
            from tqdm import tqdm

            tqdm.write(f"[icot {self.stage.name}] {message}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

