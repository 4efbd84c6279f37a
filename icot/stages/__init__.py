"""`icot train <stage>`: set up a stage, run the shared loop, export, write the manifest."""

from __future__ import annotations

import json
import time
from pathlib import Path

from icot.config import STAGES, Paths, StageConfig, load_stage_config, save_resolved, load_resolved
from icot.errors import UserError


def stage_class(name: str):
    from icot.stages.coupling import CouplingStage
    from icot.stages.emulation import EmulationStage
    from icot.stages.mind_reading import MindReadingStage
    from icot.stages.no_cot import NoCotStage
    from icot.stages.teacher import TeacherStage

    classes = {cls.name: cls for cls in (TeacherStage, NoCotStage, MindReadingStage, EmulationStage, CouplingStage)}
    if name not in classes:
        raise UserError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    return classes[name]
