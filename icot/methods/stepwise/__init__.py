"""Stepwise internalization (ICoT-SI; Deng, Choi and Shieber, 2024): one model is fine-tuned on explicit
CoT while its CoT tokens are removed from the left a few at a time, until it answers with no CoT at all.

The rules are the reference code's (da03/Internalize_CoT_Step_by_Step, src/train.py; METHODS.md section 1),
applied per optimizer step where the reference counts micro batches (the same with no gradient
accumulation). Options: the `stepwise:` section of a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from icot.config import option
from icot.curriculum import FinalDecay, final_decay_help
from icot.registry import Method, Mode, StageSpec, register


def _positive_steps(value: list[int]) -> str | None:
    return None if all(steps >= 1 for steps in value) else "expected optimizer steps of at least 1"


@dataclass
class StepwiseConfig:
    start: Literal["base", "teacher"] = option(
        "base", help="the weights it starts from: base (model.name_or_path, or a model from scratch, as the reference) "
                     "or teacher (the shared explicit-CoT teacher's export: the CoT is learnt already)")
    remove_per_epoch: float = option(8.0, minimum=0.0, help="CoT tokens removed per epoch, one every "
                                                            "round(steps per epoch / this) optimizer steps "
                                                            "(where stepwise.steps_per_token is empty)")
    steps_per_token: list[int] = option(
        factory=list, check=_positive_steps,
        help="optimizer steps between removals, instead of remove_per_epoch: one number, or one per removal "
             "level (the i-th, counted from 0: the steps with i tokens removed before the next removal; the "
             "last repeats), e.g. 300,300,900 to remove fast where the model recovers fast and slowly where "
             "it does not; empty: remove_per_epoch")
    advance_at_loss: Optional[float] = option(
        None, minimum=0.0,
        help="pace by recovery: remove the next token as soon as the mean training loss of the last "
             "stepwise.advance_window steps at the current removal is at most this (steps_per_token, or "
             "remove_per_epoch, is then the most steps a removal may take); null: the fixed pace")
    advance_window: int = option(100, minimum=1, help="steps whose mean training loss stepwise.advance_at_loss "
                                                      "reads; also the fewest steps a removal takes")
    final_decay: FinalDecay = option("none", resumable=True,
                                     help=final_decay_help("the whole CoT is removed (the longest training CoT)"))
    remove_all_beyond: Optional[int] = option(
        None, minimum=0, help="once this many tokens are scheduled, remove the whole CoT (GSM8K: 39); null: never")
    smoothing_lambda: float = option(4.0, above=0.0, infinite=True,
                                     help="removal smoothing: each example removes k more tokens with P(k) = "
                                          "(1 - e^-lambda) e^(-lambda k), k < 100; inf: none (0 would put all "
                                          "the mass on k = 99: the whole CoT from the first step)")
    side: Literal["left", "right"] = option("left", help="remove the CoT's first tokens (left) or its last (right)")
    pretrain_epochs: int = option(0, minimum=0, help="epochs before the removal starts (they remove "
                                                     "stepwise.remove_start_from tokens)")
    remove_start_from: int = option(0, minimum=0, help="tokens removed at the start")
    reset_optimizer: bool = option(True, help="a fresh AdamW at every removal increment (the reference's "
                                              "--reset_optimizer), unless the previous batch had no CoT left")
    keep_position: bool = option(
        False, help="the tokens left keep their positions and the first separator takes the last removed token's "
                    "(the reference's --keep_position; GPT-2-family decoders only); inference shifts the "
                    "positions from the separator on as the final removal did")
    max_length: Optional[int] = option(
        None, minimum=1, help="drop from a batch the examples still longer than this after the removal "
                              "(the reference skips the whole batch; GSM8K: 150); null: no limit")


METHOD = register(Method(
    name="stepwise",
    title="stepwise internalization (ICoT-SI, Deng et al. 2024)",
    section=StepwiseConfig,
    demo="demo_stepwise.yaml",
    stages=(
        StageSpec("stepwise", "icot.methods.stepwise.stage:StepwiseStage",
                  "explicit CoT fine-tuning with the CoT removed from the left step by step, until none is left",
                  reads={"start": "teacher"}, views=("cot",),
                  mode=Mode("stepwise", "Stepwise internalization (ICoT-SI)", "cot_removed",
                            "icot.methods.stepwise.modes:StepwiseModel")),
    ),
))
