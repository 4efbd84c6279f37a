"""Coconut + SIM-CoT: Coconut (its `coconut:` section: the same sequences and curriculum) with an auxiliary
decoder that reads each step's continuous thoughts (thoughts_per_step of them, the fed-back states) and must
write out the step they replace (icot/methods/simcot/; METHODS.md section 4, the reference's Coconut fork,
simcot:Coconut/coconut.py:515-785).

The fork's rules: every thought of the stage is supervised; thought t decodes the t-th latent step, the
last one every latent step from its own on, and a thought beyond the example's steps the answer text;
each thought's loss is the step's summed token cross-entropy averaged over the rows, the step loss their
mean (weight 1.0); the decoder is a fresh pretrained copy of the base model, without dropout, trained with
the model by one optimizer. Its released training never computes this loss (METHODS.md 4.6.1): icot does.
Options: the `coconut_simcot:` section.
"""

from __future__ import annotations

from dataclasses import dataclass

from icot.methods.simcot import StepSupervisionConfig
from icot.registry import Method, Mode, StageSpec, register


@dataclass
class CoconutSimCotConfig(StepSupervisionConfig):
    """The Coconut fork's defaults: no dropout (its decoder stays in eval mode, coconut.py:789-793) and a
    summed cross-entropy per row (coconut.py:768-780)."""


METHOD = register(Method(
    name="coconut_simcot",
    title="Coconut + SIM-CoT (continuous thoughts with step supervision, Wei et al. 2025)",
    section=CoconutSimCotConfig,
    uses=("coconut",),
    demo="demo_simcot.yaml",
    stages=(
        StageSpec("coconut_simcot", "icot.methods.coconut_simcot.stage:CoconutSimCotStage",
                  "Coconut whose continuous thoughts an auxiliary decoder (training only) decodes into the steps "
                  "they replace",
                  reads={"start": "teacher"}, views=("cot",),
                  mode=Mode("coconut_simcot", "Coconut + SIM-CoT", "cot_removed",
                            "icot.methods.coconut.modes:CoconutModel")),
    ),
))
