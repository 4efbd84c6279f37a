"""CODI + SIM-CoT: `CodiStage` with step supervision (`icot.methods.simcot.stage`). The thought vectors are
the student's thoughts as fed (the projection of the previous position's last hidden state) and, last, the
projection of the last thought's own output (a slot the student never reads)."""

from __future__ import annotations

import torch

from icot.methods.codi.stage import CodiStage, codi_loss, student_pass
from icot.methods.simcot.stage import StepSupervision
from icot.methods.simcot.targets import slot_targets, step_spans, truncated_to_first_row
from icot.models.decoder import unwrap


class CodiSimCotStage(StepSupervision, CodiStage):
    thought_part = "student"

    def step_targets(self, feature):
        steps = step_spans(feature)
        if not self.options.include_last_step:   # the teacher row's steps (`teacher_sequence`)
            steps = steps[:-1]
        return slot_targets(steps, self.options.latents + 1, [], self.separator_id)

    def batch_targets(self, features):
        targets = super().batch_targets(features)
        return truncated_to_first_row(targets) if self.supervision.truncate_to_first_row else targets

    def thought_columns(self, ids):
        # The slot after the last thought reads the extra column that `supervised_pass` appends.
        return [columns + [ids.size(1)] for columns in super().thought_columns(ids)]

    def supervised_pass(self, model, batch):
        student = batch["student"]
        output = student_pass(model, student, self.options, self.tokens.latent)
        last = int((student["input_ids"] == self.tokens.latent).nonzero()[:, 1].max())
        after = unwrap(model).projection(output.hidden_states[-1][:, last - output.hidden_start])
        states = torch.cat((output.inputs_embeds, after[:, None].to(output.inputs_embeds.dtype)), dim=1)
        return codi_loss(model, batch, self.options, self.tokens.latent, output), states
