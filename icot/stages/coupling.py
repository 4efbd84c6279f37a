"""Couple and optimize: the emulator's states feed the student through the student's MLPs, trained end
to end on the answer alone; no teacher, no CoT. Trained: emulator + student as one engine (either
can be frozen with method.freeze). Frozen: per method.freeze. Loss: answer cross-entropy."""

from icot.models.coupled import CoupledModel
from icot.models.generation import generate_implicit
from icot.models.io import load_component, save_component
from icot.stages.base import Stage, lm_metrics, unwrap
from icot.stages.common import prepare_decoder


class CouplingStage(Stage):
    name = "coupling"
    views = ("nocot",)
    generation_target = "nocot"

    def build(self):
        folders = self.inputs()
        student = self.strategy.load_pretrained(
            lambda: load_component(folders["mind_reading"] / "export", expect="student"))
        emulator = self.strategy.load_pretrained(
            lambda: load_component(folders["emulation"] / "export", expect="emulator"))
        for part in (student, emulator):
            prepare_decoder(part.decoder, self.config, dropout=0.0)
        model = CoupledModel(emulator, student)
        frozen = {"student": student, "emulator": emulator}.get(self.config.method.freeze)
        if frozen is not None:
            frozen.requires_grad_(False)
        return model

    def loss(self, model, batch):
        nocot = batch["nocot"]
        output = model(nocot["input_ids"], nocot["attention_mask"], nocot["first_sep"], labels=nocot["labels"])
        return lm_metrics(output, nocot["labels"])

    def generate(self, model, features, synced):
        batch, cap = self.generation_batch(features)
        return generate_implicit(unwrap(model), batch, self.separator_id, cap, synced)

    def export(self, model, state_dict, folder):
        coupled = unwrap(model)
        for name in ("student", "emulator"):
            part = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
            save_component(getattr(coupled, name), folder / name, state_dict=part, extra=self.export_extra())
