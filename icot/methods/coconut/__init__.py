"""Coconut (chain of continuous thought; Hao et al., 2024): over a curriculum of stages, the first k CoT
steps are replaced by k x c continuous thoughts, each the last hidden state of the position before it,
fed back as the next input embedding.

The rules are the reference code's (facebookresearch/coconut; METHODS.md section 2), on icot's engine
and sequence format: `q <sep> <|start-latent|> <|latent|> x n <|end-latent|> steps[k:] <sep> #### a <sep>`.
Options: the `coconut:` section of a recipe; departures are named in `schedule.py` and `sequences.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from icot.config import option
from icot.curriculum import FinalDecay, final_decay_help
from icot.registry import Method, Mode, StageSpec, register


def _probability(value: float) -> str | None:
    return None if value <= 1.0 else "expected a probability in [0, 1]"


def _positive_steps(value: list[int]) -> str | None:
    return None if all(steps >= 1 for steps in value) else "expected optimizer steps of at least 1"


@dataclass
class CoconutConfig:
    start: Literal["teacher", "base"] = option(
        "teacher", help="the weights it starts from: teacher (the shared explicit-CoT teacher's export, as the "
                        "reference's GSM8K run starts from its CoT checkpoint; inputs.start.export picks the "
                        "epoch) or base (model.name_or_path, or a model from scratch: stage 0 is then CoT "
                        "training in the run, as the reference's ProsQA runs)")
    thoughts_per_step: int = option(2, minimum=1, help="continuous thoughts per replaced step (the "
                                                       "reference's c_thought)")
    epochs_per_stage: int = option(3, minimum=1, help="epochs of each curriculum stage (where "
                                                      "coconut.steps_per_stage is empty)")
    steps_per_stage: list[int] = option(
        factory=list, check=_positive_steps,
        help="optimizer steps of each curriculum stage, instead of epochs_per_stage: one number, or one per "
             "stage the run trains, in order from its first (epoch_offset // epochs_per_stage; the last "
             "repeats), e.g. 500,1500,1500 to give the later stages longer; empty: epochs_per_stage")
    max_latent_stage: int = option(3, minimum=0, help="the last stage that replaces steps one by one; beyond it "
                                                      "every step is removed")
    pad_latent_to_max: bool = option(
        True, help="beyond max_latent_stage, max_latent_stage x thoughts_per_step thoughts for every example "
                   "(false: as many as its steps allow, at most that)")
    uniform_prob: float = option(0.0, minimum=0.0, check=_probability,
                                 help="probability that an example trains at a stage drawn uniformly from "
                                      "0..its steps instead of the scheduled one")
    epoch_offset: int = option(0, minimum=0, help="epochs counted as done before this run: the stage of epoch e "
                                                  "is (e + epoch_offset) // epochs_per_stage (the reference "
                                                  "resumes its GSM8K run at 3: it starts at stage 1)")
    reset_optimizer: Literal["epoch", "stage", "never"] = option(
        "epoch", help="a fresh AdamW at every epoch (what the reference code does), at every stage change (what "
                      "its README says) or never")
    token_init: Literal["copy", "resize"] = option(
        "copy", help="the three new tokens' rows: copy (from coconut.init_token, the reference's intent) or "
                     "resize (transformers' resize alone: the mean of the old rows plus noise, what the "
                     "published results used before the reference fixed its copy)")
    init_token: str = option("<<", help="the token whose embedding and output rows the new tokens copy")
    final_decay: FinalDecay = option("none", resumable=True,
                                     help=final_decay_help("every step is latent (stage > max_latent_stage)"))


METHOD = register(Method(
    name="coconut",
    title="Coconut (continuous latent thoughts, Hao et al. 2024)",
    section=CoconutConfig,
    demo="demo_coconut.yaml",
    stages=(
        StageSpec("coconut", "icot.methods.coconut.stage:CoconutStage",
                  "continuous thoughts: the first k CoT steps replaced by k x c fed-back hidden states, stage by stage",
                  reads={"start": "teacher"}, views=("cot",),
                  mode=Mode("coconut", "Coconut (continuous thoughts)", "cot_removed",
                            "icot.methods.coconut.modes:CoconutModel")),
    ),
))
