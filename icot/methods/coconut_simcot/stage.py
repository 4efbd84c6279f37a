"""Coconut + SIM-CoT: `CoconutStage` with step supervision (`icot.methods.simcot.stage`). A target is read
per example at the stage it trains at (its uniform draw included): the reference reads the number of
thoughts from the batch's first example (coconut.py:518; METHODS.md 4.6.7)."""

from __future__ import annotations

from icot.data.collate import as_list
from icot.methods.coconut.sequences import thought_count
from icot.methods.coconut.stage import CoconutStage
from icot.methods.simcot.stage import StepSupervision
from icot.methods.simcot.targets import answer_span, slot_targets, step_spans
from icot.stage import shifted_lm_metrics


class CoconutSimCotStage(StepSupervision, CoconutStage):
    thought_part = "cot"
    first_position = 1   # the fork's step rows count positions from 1 (coconut.py:740-744)

    @property
    def prefix(self):
        return self.options.thoughts_per_step

    def step_targets(self, feature):
        stage = self.schedule.example_stage(feature)
        skipped, thoughts = thought_count(stage, len(as_list(feature["step_starts"])), self.options)
        return slot_targets(step_spans(feature)[:skipped], thoughts // self.prefix, answer_span(feature),
                            self.separator_id)

    def supervised_pass(self, model, batch):
        output = self.thought_pass(model, batch)
        return shifted_lm_metrics(output.logits, batch["cot"]["labels"]), output.inputs_embeds
