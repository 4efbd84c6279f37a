"""The removal schedule of stepwise internalization, as the reference code runs it (METHODS.md 1.2;
da03/Internalize_CoT_Step_by_Step src/train.py:242-310), one decision per optimizer step.

- `steps_per_removal = round(steps per epoch / remove_per_epoch)`: a counter advances every step (from
  `pretrain_epochs` on) and, when it reaches that number, one more token is scheduled for removal and
  the counter restarts: the scheduled count rises linearly within each epoch. icot's `steps_per_token`
  gives that number in steps instead, one for every removal level where the pace should change; with
  `advance_at_loss` the next removal comes as soon as the mean training loss of the last
  `advance_window` steps at the current level is that low (the fixed pace is then the longest wait):
  fast where the model recovers fast, slowly where it does not.
- At the start of an epoch, and after each increment, a count at or beyond `remove_all_beyond` becomes
  "everything" (infinite).
- Each example removes `scheduled + k` tokens, k drawn from P(k) = (1 - e^-lambda) e^(-lambda k) for
  k = 0..99 (the rest of the mass on 99; lambda = inf: k = 0), clipped to its CoT; the separator after
  the CoT always stays. During the pretrain epochs it removes `remove_start_from`.
- A fresh optimizer at each increment (`reset_optimizer`), unless the previous batch had no CoT left.

After the last removal (the longest training CoT scheduled), `final_decay` lets the learning rate decay
to 0 at the run's end (`icot.curriculum`; the reference keeps it constant).

One departure: k is drawn per example from a generator seeded by (seed, step, example index), not from
torch's global generator, so that every rank, every world size and every resumed run removes the same.
With `side: right` the reference never sees a batch with CoT left (its test compares the removal's end,
which is the CoT's end), so it resets no optimizer and keeps no best-so-far reset: reproduced as is.
"""

from __future__ import annotations

import math

import numpy as np

from icot.curriculum import final_decay_factor
from icot.stage import StepContext, StepUpdate

OFFSETS = 100   # k = 0..99


def offset_distribution(smoothing_lambda: float) -> np.ndarray:
    """P(k) for k = 0..99 (train.py:25-35)."""
    if math.isinf(smoothing_lambda):
        distribution = np.zeros(OFFSETS)
        distribution[0] = 1.0
        return distribution
    k = np.arange(OFFSETS)
    distribution = (1 - math.exp(-smoothing_lambda)) * np.exp(-smoothing_lambda * k)
    distribution[-1] += 1 - distribution.sum()
    return distribution


def steps_per_removal(steps_per_epoch: int, remove_per_epoch: float) -> int:
    if remove_per_epoch == 0:
        return steps_per_epoch * 10**9   # never
    return int(round(steps_per_epoch / remove_per_epoch))


class RemovalSchedule:
    def __init__(self, options, seed: int):
        self.options = options
        self.seed = seed
        self.threshold = math.inf if options.remove_all_beyond is None else options.remove_all_beyond
        self.distribution = offset_distribution(options.smoothing_lambda)
        self.scheduled: float = options.remove_start_from   # tokens, or math.inf: everything
        self.counter = 0
        self.all_removed_before = False    # the previous batch had no CoT left
        self.ended_at: int | None = None   # the step whose schedule first reached the longest CoT
        self.recent_losses: list[float] = []   # training losses at the current level (advance_at_loss)

    # -- the state a checkpoint carries ----------------------------------------------------------
    def state_dict(self) -> dict:
        return {"scheduled": self.scheduled, "counter": self.counter, "all_removed_before": self.all_removed_before,
                "ended_at": self.ended_at, "recent_losses": list(self.recent_losses)}

    def load_state_dict(self, state: dict) -> None:
        self.scheduled, self.counter = state["scheduled"], state["counter"]
        self.all_removed_before = state["all_removed_before"]
        self.ended_at = state.get("ended_at")
        self.recent_losses = list(state.get("recent_losses", []))

    def observe(self, loss: float) -> None:
        """The training loss of the step just taken (advance_at_loss reads the last advance_window)."""
        if self.options.advance_at_loss is not None:
            self.recent_losses = (self.recent_losses + [loss])[-self.options.advance_window:]

    def recovered(self) -> bool:
        """advance_at_loss: the level's last advance_window losses average at most the threshold."""
        threshold, window = self.options.advance_at_loss, self.options.advance_window
        return (threshold is not None and len(self.recent_losses) == window
                and sum(self.recent_losses) / window <= threshold)

    def period(self, steps_per_epoch: int) -> int:
        """Optimizer steps at the current removal level before the next removal."""
        steps = self.options.steps_per_token
        if not steps:
            return steps_per_removal(steps_per_epoch, self.options.remove_per_epoch)
        level = len(steps) - 1 if math.isinf(self.scheduled) else int(self.scheduled)
        return steps[min(level, len(steps) - 1)]

    # -- one step ----------------------------------------------------------------------------------
    def advance(self, context: StepContext, cot_lengths: np.ndarray) -> tuple[StepUpdate, dict[int, float]]:
        """The decision for one optimizer step: what to log, whether to reset the optimizer, and how many
        tokens each example of the step's batch (by training-set index) removes."""
        options = self.options
        if context.step % context.steps_per_epoch == 0:   # train.py:248-252
            if not math.isinf(self.scheduled):
                self.scheduled = int(round(self.scheduled))
            if self.scheduled >= self.threshold:
                self.scheduled = math.inf
        before = self.scheduled
        period = self.period(context.steps_per_epoch)
        recovered = self.recovered() and context.epoch >= options.pretrain_epochs and not math.isinf(self.scheduled)
        if self.counter == period or period == 0 or recovered:
            self.scheduled += 1                          # train.py:257-259
            self.counter = 0
            self.recent_losses = []
        if context.epoch >= options.pretrain_epochs:     # train.py:260-261
            self.counter += 1
        reset = self.scheduled > before and options.reset_optimizer and not self.all_removed_before
        if self.scheduled >= self.threshold:
            self.scheduled = math.inf
        removals, all_removed = {}, False
        if self.scheduled > 0 or not math.isinf(options.smoothing_lambda):   # train.py:280
            pretraining = context.epoch < options.pretrain_epochs
            for index in (int(i) for i in context.batch):
                removals[index] = (options.remove_start_from if pretraining
                                   else self.scheduled + self.offset(context.step, index))
            if options.side == "left":
                all_removed = all(removals[i] >= cot_lengths[i] for i in removals)
            else:
                all_removed = True   # the reference's test, see the module docstring
        self.all_removed_before = all_removed
        longest = int(cot_lengths.max(initial=0))
        if self.ended_at is None and self.scheduled >= longest:
            self.ended_at = context.step
        lr_scale = final_decay_factor(options.final_decay, context.step, self.ended_at, context.total_steps)
        # Logged as what it removes: the count goes on past the longest CoT (the reference's), the removal not.
        scalars = {"removed_tokens": float(min(self.scheduled, longest)), "cot_removed_everywhere": float(all_removed)}
        return StepUpdate(scalars, reset_optimizer=reset, lr_scale=lr_scale), removals

    def offset(self, step: int, index: int) -> int:
        if self.distribution[0] == 1.0:
            return 0
        return int(np.random.default_rng([self.seed, step, index]).choice(OFFSETS, p=self.distribution))


def removal_count(prompt_len: int, second_sep: int, to_remove: float) -> int:
    """How many CoT tokens `to_remove` takes from an example: at most its whole CoT."""
    if to_remove <= 0:
        return 0
    cot = second_sep - prompt_len
    return cot if math.isinf(to_remove) else min(int(to_remove), cot)


def remove_cot(ids: list[int], prompt_len: int, second_sep: int, to_remove: float, side: str) -> list[int]:
    """`ids` (the with-CoT view) without `to_remove` CoT tokens from the left or the right; never the
    separators (train.py:289-306)."""
    cut = removal_count(prompt_len, second_sep, to_remove)
    if cut == 0:
        return list(ids)
    if side == "left":
        return ids[:prompt_len] + ids[prompt_len + cut:]
    return ids[:second_sep - cut] + ids[second_sep:]
