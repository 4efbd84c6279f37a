"""ICoT-KD's mode: the coupled emulator and student answer without writing any CoT token."""

from pathlib import Path

import torch

from icot.evaluate import ModeModel
from icot.models.coupled import PARTS, CoupledModel
from icot.models.generation import generate_implicit


class ImplicitModel(ModeModel):
    """The export of the stage that couples them: `emulator/` and `student/` component folders."""

    @property
    def decoder(self):
        return self.model.student.decoder

    @classmethod
    def holds(cls, folder: Path) -> bool:
        return all((folder / part).is_dir() for part in PARTS)

    @classmethod
    def load(cls, folder: Path):
        from icot.data.tokenizer_build import load_tokenizer
        from icot.models.io import load_component

        emulator = load_component(folder / "emulator", expect="emulator").for_inference()
        student = load_component(folder / "student", expect="student")
        return CoupledModel(emulator, student), load_tokenizer(folder / "student", "the student export")

    @classmethod
    def random_model(cls, random_decoder):
        from icot.models.emulator import Emulator
        from icot.models.student import Student

        student_decoder, emulator_decoder = random_decoder(0), random_decoder(1)
        torch.manual_seed(2)
        return CoupledModel(Emulator(emulator_decoder).for_inference(), Student(student_decoder))

    def generate(self, batch, max_new_tokens, synced=False):
        return generate_implicit(self.model, batch, self.separator_id, max_new_tokens, synced, self.decoding)

    @torch.no_grad()
    def logits(self, batch):
        return self.model(batch["input_ids"], batch["attention_mask"], batch["first_sep"]).logits
