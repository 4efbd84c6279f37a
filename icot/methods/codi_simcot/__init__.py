"""CODI + SIM-CoT: CODI (its `codi:` section: the same teacher and student rows, adapters, projection and
distillation) with an auxiliary decoder that reads each continuous thought (one projected state) and must
write out the CoT step it stands for (icot/methods/simcot/; METHODS.md section 4, the reference's CODI fork,
simcot:CODI/src/model.py:147-748).

The fork's rules: latents + 1 slots, the thoughts fed to the student and the projection of the last one's
output, which the student never reads (model.py:598-672); slot k decodes the teacher row's k-th step (its
last step dropped unless codi.include_last_step), the last slot every step from its own on, a slot
beyond the steps nothing; each slot's loss is its token mean, the step loss their mean over the slots
that hold a target (weight 1.0); the decoder is a fresh pretrained copy of the base model (not under the
adapters), with its dropout, trained fully beside the adapters and the projection. The step tokens are
embedded by the student's (frozen) table. Options: the `codi_simcot:` section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from icot.config import dropout_probability, option
from icot.methods.simcot import StepSupervisionConfig, reduction_option
from icot.registry import Method, Mode, StageSpec, register


@dataclass
class CodiSimCotConfig(StepSupervisionConfig):
    decoder_dropout: float = option(0.1, minimum=0.0, check=dropout_probability,
                                    help="the auxiliary decoder's dropout (the CODI fork trains it in train "
                                         "mode: GPT-2's 0.1)")
    reduction: Literal["row", "token"] = reduction_option("token")
    truncate_to_first_row: bool = option(
        False, help="cut every row's target in a slot to the first row's length + 1 (1 where the first row has "
                    "none), as the CODI fork does by a bug (METHODS.md 4.6.2), to match its checkpoints; off: each "
                    "row's whole step, the paper's intent")


METHOD = register(Method(
    name="codi_simcot",
    title="CODI + SIM-CoT (self-distilled continuous thoughts with step supervision, Wei et al. 2025)",
    section=CodiSimCotConfig,
    uses=("codi",),
    demo="demo_simcot.yaml",
    stages=(
        StageSpec("codi_simcot", "icot.methods.codi_simcot.stage:CodiSimCotStage",
                  "CODI whose continuous thoughts an auxiliary decoder (training only) decodes into the steps "
                  "they stand for",
                  reads={"start": "teacher"}, views=("cot",),
                  mode=Mode("codi_simcot", "CODI + SIM-CoT", "cot_removed",
                            "icot.methods.codi.modes:CodiModeModel")),
    ),
))
