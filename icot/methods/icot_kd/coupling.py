"""Couple and optimize: the emulator's predicted states feed the student's MLPs; trained as one engine
(either can be frozen with icot_kd.freeze). Loss: answer cross-entropy, no teacher, no CoT."""

from icot.models.coupled import PARTS, CoupledModel
from icot.models.generation import generate_implicit
from icot.models.io import load_component, save_component
from icot.stage import Stage, lm_metrics, prepare_decoder, unwrap


class CouplingStage(Stage):
    generation_target = "nocot"

    def build(self):
        # The input roles are named after the CoupledModel's parts.
        student, emulator = (self.strategy.load_pretrained(lambda role=role: load_component(self.input_export(role),
                                                                                             expect=role))
                             for role in PARTS)
        for part in (student, emulator):
            prepare_decoder(part.decoder, self.config, dropout=0.0)
        model = CoupledModel(emulator, student)
        frozen = {"student": student, "emulator": emulator}.get(self.config.icot_kd.freeze)
        if frozen is not None:
            frozen.requires_grad_(False)
        return model

    @classmethod
    def work_per_step(cls, config, tokens):
        # The emulator reads the prompt, the student the without-CoT view.
        return config.train.batch_size * 3 * (tokens["prompt"] + tokens["nocot"])

    def loss(self, model, batch):
        nocot = batch["nocot"]
        output = model(nocot["input_ids"], nocot["attention_mask"], nocot["first_sep"], labels=nocot["labels"])
        return lm_metrics(output, nocot["labels"])

    def generate(self, model, features, synced):
        batch, cap = self.generation_batch(features)
        return generate_implicit(unwrap(model), batch, self.separator_id, cap, synced)

    def export(self, model, state_dict, folder):
        coupled = unwrap(model)
        for name in PARTS:
            part = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
            save_component(getattr(coupled, name), folder / name, state_dict=part, extra=self.export_extra())
            self.tokenizer.save_pretrained(folder / name)

