"""Coconut's curriculum (METHODS.md 2.2; coco:run.py:244-319): the stage of epoch e is
(e + epoch_offset) // epochs_per_stage; a fresh AdamW at every epoch start (the reference code), at
every stage change (its README) or never; with `uniform_prob` p an example trains, with probability p,
at a stage drawn uniformly from 0..its number of steps (dataset.py:245-252).

icot's `steps_per_stage` paces the stages in optimizer steps instead of epochs (the run still starts at
stage epoch_offset // epochs_per_stage), and `final_decay` lets the learning rate decay to 0 from the
first step at which every step is latent (`icot.curriculum`; the reference keeps it constant).

One departure: the uniform draw comes from a generator seeded by (seed, epoch, example index) instead
of Python's global `random`, so that every rank, world size and resumed run trains on the same
sequences; validation batches take the scheduled stage (the reference draws for its validation loss too).
"""

from __future__ import annotations

import numpy as np

from icot.curriculum import final_decay_factor
from icot.stage import StepContext, StepUpdate


class CoconutSchedule:
    def __init__(self, options, seed: int):
        self.options = options
        self.seed = seed
        self.epoch = 0
        self.stage = self.stage_of(0)
        self.ended_at: int | None = None   # the first step at which every step was latent

    def stage_of(self, epoch: int, step: int = 0) -> int:
        """The stage of optimizer `step`, which is in `epoch`."""
        first = self.options.epoch_offset // self.options.epochs_per_stage
        lengths = self.options.steps_per_stage
        if not lengths:
            return (epoch + self.options.epoch_offset) // self.options.epochs_per_stage
        for index, length in enumerate(lengths[:-1]):
            if step < length:
                return first + index
            step -= length
        return first + len(lengths) - 1 + step // lengths[-1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "stage": self.stage, "ended_at": self.ended_at}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.stage = state["epoch"], state["stage"]
        self.ended_at = state.get("ended_at")

    def advance(self, context: StepContext) -> StepUpdate:
        """The stage of this optimizer step, whether the optimizer starts afresh before it, and the
        learning-rate factor of `final_decay`."""
        stage = self.stage_of(context.epoch, context.step)
        reset = False
        rule = self.options.reset_optimizer
        if context.step > 0 and rule == "epoch":
            reset = context.step % context.steps_per_epoch == 0   # an epoch starts
        elif context.step > 0 and rule == "stage":
            previous = context.step - 1
            reset = stage != self.stage_of(previous // context.steps_per_epoch, previous)
            if not self.options.steps_per_stage:   # the reference's rule: stages change at epoch starts only
                reset = reset and context.step % context.steps_per_epoch == 0
        self.epoch, self.stage = context.epoch, stage
        if self.ended_at is None and stage > self.options.max_latent_stage:
            self.ended_at = context.step
        lr_scale = final_decay_factor(self.options.final_decay, context.step, self.ended_at, context.total_steps)
        # Logged as the sequences it trains on: every stage past max_latent_stage trains on the same.
        logged = min(stage, self.options.max_latent_stage + 1)
        return StepUpdate({"coconut_stage": float(logged)}, reset_optimizer=reset, lr_scale=lr_scale)

    def example_stage(self, feature: dict) -> int:
        """The stage one example trains at: the scheduled one, or the uniform draw (training examples
        carry their training-set `index`; validation examples do not)."""
        p = self.options.uniform_prob
        if p > 0 and "index" in feature:
            rng = np.random.default_rng([self.seed, self.epoch, int(feature["index"])])
            if rng.random() < p:
                return int(rng.integers(0, len(feature["step_starts"]) + 1))
        return self.stage
