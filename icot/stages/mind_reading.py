"""Mind-reading the teacher: a student reads `input <sep>` and answers while, before every block l,
its separator state is replaced by MLP_l of the teacher's normalised layer-l state on the diagonal.
Trained: the student (decoder + MLPs), dropout off. Frozen: the teacher. Loss: answer cross-entropy."""

import torch

from icot.models.generation import greedy_decode
from icot.models.coupled import check_compatible
from icot.models.io import load_component
from icot.models.student import Student
from icot.models.teacher_states import parse_delta, teacher_states
from icot.stages.base import Stage, lm_metrics, unwrap
from icot.stages.common import fresh_decoder, prepare_decoder


class MindReadingStage(Stage):
    name = "mind_reading"
    views = ("cot", "nocot")
    generation_target = "nocot"

    def build(self):
        teacher_export = self.inputs()["teacher"] / "export"
        self.delta = parse_delta(self.config.method.delta)
        teacher = self.strategy.load_pretrained(lambda: load_component(teacher_export, expect="decoder"),
                                                self.strategy.frozen_ds_config)
        if self.config.method.init_from_teacher:
            decoder = prepare_decoder(self.strategy.load_pretrained(
                lambda: load_component(teacher_export, expect="decoder")), self.config, dropout=0.0)
        else:
            decoder = fresh_decoder(self.config, self.tokenizer, dropout=0.0, strategy=self.strategy)
        student = Student(decoder)
        check_compatible(teacher=teacher, student=student)
        self.teacher = self.strategy.prepare_frozen(teacher)
        return student

    def states(self, cot: dict) -> torch.Tensor:
        return teacher_states(unwrap(self.teacher), cot["input_ids"], cot["attention_mask"],
                              cot["first_sep"], cot["second_sep"], self.delta)

    def loss(self, model, batch):
        nocot = batch["nocot"]
        output = model(nocot["input_ids"], nocot["attention_mask"], nocot["first_sep"],
                       self.states(batch["cot"]), labels=nocot["labels"])
        return lm_metrics(output, nocot["labels"])

    def generate(self, model, features, synced):
        """The student answering with the teacher's true states."""
        batch, cap = self.generation_batch(features)
        states = self.states(self.collate(features)["cot"])
        student = unwrap(model)
        with torch.no_grad(), student.injection(states, batch["first_sep"], prompt_pass_only=True):
            return greedy_decode(student.decoder, batch, self.separator_id, 1, cap, synced)

    def export_extra(self):
        return {"stage": self.name, "delta": self.delta}
