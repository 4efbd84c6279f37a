"""What the curricula of the later methods share: the learning-rate decay once the curriculum has ended.

A curriculum (stepwise removal, Coconut's stages) moves the task under the model until its last change;
after that the model trains on the final task alone. There a decaying learning rate settles what a
constant one keeps shaking: on 3x2 multiplication, stepwise at a constant 5e-4 stayed at 84.5% valid
after its last removal, and 99.5% within 1000 steps at a fifth of it (docs/DEMO.md). `final_decay`
multiplies train.schedule's rate by a factor falling from 1 at the curriculum's end to 0 at the run's.
"""

from __future__ import annotations

import math
from typing import Literal

FinalDecay = Literal["none", "linear", "cosine"]


def final_decay_factor(kind: str, step: int, ended_at: int | None, total_steps: int) -> float:
    """The factor on the learning rate of optimizer step `step` (0-based) when the curriculum's final
    task began at step `ended_at` (None: not yet) and the run ends after `total_steps`."""
    if kind == "none" or ended_at is None or step < ended_at:
        return 1.0
    progress = min(1.0, (step - ended_at) / max(1, total_steps - ended_at))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def final_decay_help(final_task: str) -> str:
    return (f"the learning rate once {final_task}: none (train.schedule's goes on), or a linear or cosine "
            f"decay of it from there to 0 at the run's end")
