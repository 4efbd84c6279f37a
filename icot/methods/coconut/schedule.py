"""Coconut's curriculum (METHODS.md 2.2; coco:run.py:244-319): the stage of epoch e is
(e + epoch_offset) // epochs_per_stage; a fresh AdamW at every epoch start (the reference code), at
every stage change (its README) or never; with `uniform_prob` p an example trains, with probability p,
at a stage drawn uniformly from 0..its number of steps (dataset.py:245-252).

One departure: that draw comes from a generator seeded by (seed, epoch, example index) instead of
Python's global `random`, so that every rank, world size and resumed run trains on the same sequences;
validation batches take the scheduled stage (the reference draws for its validation loss too).
"""

from __future__ import annotations

import numpy as np

from icot.stage import StepContext, StepUpdate


class CoconutSchedule:
    def __init__(self, options, seed: int):
        self.options = options
        self.seed = seed
        self.epoch = 0
        self.stage = self.stage_of(0)

    def stage_of(self, epoch: int) -> int:
        return (epoch + self.options.epoch_offset) // self.options.epochs_per_stage

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "stage": self.stage}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.stage = state["epoch"], state["stage"]

    def advance(self, context: StepContext) -> StepUpdate:
        """The stage of this optimizer step, and whether the optimizer starts afresh before it."""
        stage = self.stage_of(context.epoch)
        reset = False
        if context.step > 0 and context.step % context.steps_per_epoch == 0:   # an epoch starts
            rule = self.options.reset_optimizer
            reset = rule == "epoch" or (rule == "stage" and stage != self.stage_of(context.epoch - 1))
        self.epoch, self.stage = context.epoch, stage
        return StepUpdate({"coconut_stage": float(stage)}, reset_optimizer=reset)

    def example_stage(self, feature: dict) -> int:
        """The stage one example trains at: the scheduled one, or the uniform draw (training examples
        carry their training-set `index`; validation examples do not)."""
        p = self.options.uniform_prob
        if p > 0 and "index" in feature:
            rng = np.random.default_rng([self.seed, self.epoch, int(feature["index"])])
            if rng.random() < p:
                return int(rng.integers(0, len(feature["step_starts"]) + 1))
        return self.stage
