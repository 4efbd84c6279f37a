"""Mind-reading the teacher: a student reads `input <sep>` and answers while, before every block l,
its separator state is replaced by MLP_l of the teacher's normalised layer-l state on the diagonal.
Trained: the student (decoder + MLPs), dropout off. Frozen: the teacher. Loss: answer cross-entropy."""

import torch

from icot.methods.icot_kd.teacher_source import TeacherSource
from icot.models.coupled import check_compatible
from icot.models.generation import greedy_decode
from icot.models.student import Student
from icot.stage import Stage, lm_metrics, unwrap


class MindReadingStage(Stage):
    generation_target = "nocot"
    trained_views = ("nocot",)   # the with-CoT view feeds the frozen teacher

    def build(self):
        self.teacher = TeacherSource(self)
        student = Student(self.teacher.trained_decoder())
        check_compatible(teacher=self.teacher.model, student=student)
        self.teacher.prepare()
        return student

    @classmethod
    def work_per_step(cls, config, tokens):
        # The student trains on the without-CoT view; the teacher reads the with-CoT view forward only.
        return config.train.batch_size * (3 * tokens["nocot"] + TeacherSource.work_per_step(config) * tokens["cot"])

    def prepare_train_set(self, train_set):
        return self.teacher.attach_cache(train_set)

    def loss(self, model, batch):
        nocot = batch["nocot"]
        states, _ = self.teacher.for_batch(batch["cot"], batch.get("rows"))
        output = model(nocot["input_ids"], nocot["attention_mask"], nocot["first_sep"], states,
                       labels=nocot["labels"])
        return lm_metrics(output, nocot["labels"])

    def generate(self, model, features, synced):
        """The student answering with the teacher's true states."""
        batch, cap = self.generation_batch(features)
        states, _ = self.teacher.compute(self.collate_view(features, "cot"))
        student = unwrap(model)
        with torch.no_grad(), student.injection(states, batch["first_sep"], prompt_pass_only=True):
            return greedy_decode(student.decoder, batch, self.separator_id, 1, cap, synced)

    def export_extra(self):
        return {"stage": self.name, "delta": self.teacher.delta}
