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
from icot.registry import Method, Mode, StageSpec, register


@dataclass
class StepwiseConfig:
    start: Literal["base", "teacher"] = option(
        "base", help="the weights it starts from: base (model.name_or_path, or a model from scratch, as the reference) "
                     "or teacher (the shared explicit-CoT teacher's export: the CoT is learnt already)")
    remove_per_epoch: float = option(8.0, minimum=0.0, help="CoT tokens removed per epoch, one every "
                                                            "round(steps per epoch / this) optimizer steps")
    remove_all_beyond: Optional[int] = option(
        None, minimum=0, help="once this many tokens are scheduled, remove the whole CoT (GSM8K: 39); null: never")
    smoothing_lambda: float = option(4.0, minimum=0.0, help="removal smoothing: each example removes k more tokens "
                                                            "with P(k) = (1 - e^-lambda) e^(-lambda k), k < 100; inf: none")
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
