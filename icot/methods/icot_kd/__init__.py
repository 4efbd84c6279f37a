"""ICoT-KD: implicit chain of thought by knowledge distillation (Deng et al., 2023).

A mind-reading student learns to answer from the teacher's hidden states on a diagonal across the CoT,
an emulator learns to predict those states from the input alone, and the two are coupled and trained
end to end on the answer. Options: the `icot_kd:` section of a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from icot.config import option
from icot.registry import Method, Mode, StageSpec, register


@dataclass
class IcotKdConfig:
    delta: Union[Literal["dynamic"], int] = option(
        "dynamic", minimum=0,
        help="the teacher's diagonal: dynamic spreads layers 0..L-1 evenly from the first separator to the "
             "second, per example; an integer k reads position s1 + l*k (at most s2); 0 reads s1 at every layer")
    mixture: Literal["none", "token"] = option(
        "none", help="the emulator's mixture: none (one component: deterministic CoT such as multiplication) "
                     "or token (one component per vocabulary token, for multi-modal CoT such as GSM8K)")
    mixture_temperature: float = option(0.05, minimum=0.0, help="softmax temperature of the token mixture at "
                                                                "coupling and inference")
    mixture_loss_weight: float = option(1.0, minimum=0.0, help="weight of the token mixture's cross-entropy "
                                                               "in the emulation loss")
    init_from_teacher: bool = option(False, help="start the student and the emulator from the teacher's weights "
                                                 "(not in the paper; helps small budgets)")
    teacher_state_cache: bool = option(False, help="compute the teacher's states once over the training set, "
                                                   "stored in <teacher>/state_cache/ and shared by mind-reading "
                                                   "and emulation, instead of at every step (not in the paper)")
    freeze: Literal["none", "student", "emulator"] = option(
        "none", help="what coupling keeps fixed (the paper-era GSM8K runs froze the student)")


METHOD = register(Method(
    name="icot_kd",
    title="ICoT-KD (implicit CoT by knowledge distillation, Deng et al. 2023)",
    section=IcotKdConfig,
    default=True,
    demo="demo.yaml",
    stages=(
        StageSpec("mind_reading", "icot.methods.icot_kd.mind_reading:MindReadingStage",
                  "mind-reading the teacher: a student answers from the teacher's diagonal states",
                  reads={"teacher": "teacher"}, views=("cot", "nocot")),
        StageSpec("emulation", "icot.methods.icot_kd.emulation:EmulationStage",
                  "thought emulation: an emulator predicts the teacher's states from the input alone",
                  reads={"teacher": "teacher"}, views=("cot", "prompt")),
        StageSpec("coupling", "icot.methods.icot_kd.coupling:CouplingStage",
                  "couple and optimize: the emulator feeds the student, trained end to end on the answer",
                  reads={"student": "mind_reading", "emulator": "emulation"}, views=("nocot",),
                  mode=Mode("implicit", "Implicit CoT (emulator + student)", "nocot",
                            "icot.methods.icot_kd.modes:ImplicitModel")),
    ),
))
