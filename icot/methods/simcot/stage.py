"""Step supervision on a latent method's stage: mixed in before the method's stage class
(`class CoconutSimCotStage(StepSupervision, CoconutStage)`), it adds the auxiliary decoder and its loss and
leaves the method's sequences, curriculum, validation and decoding as they are.

Trained: the method's model as the method trains it, and the whole auxiliary decoder, by one optimizer at
the run's learning rate (the Coconut fork: one AdamW over both; the CODI fork: the Trainer's optimizer over
the adapters, the projection and the decoder). Nothing is frozen beyond what the method freezes. The
decoder is active at every step from the first, as in both forks; it is dropped from every export.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from icot.data.collate import to_device
from icot.methods.simcot.targets import collate_step_targets
from icot.models.decoder import unwrap
from icot.models.step_decoder import StepSupervised, step_decoder_loss, without_step_decoder
from icot.stage import start_decoder


class StepSupervision(ABC):
    thought_part: str = ""    # the batch part whose rows hold the thoughts
    first_position = 0        # the position of a step decoder row's first thought vector

    def __init__(self, config, strategy, tokenizer):
        super().__init__(config, strategy, tokenizer)
        self.supervision = getattr(config, self.spec.method)

    # -- what the method gives ---------------------------------------------------------------------
    @property
    def prefix(self) -> int:
        """Thought vectors per target."""
        return 1

    @abstractmethod
    def step_targets(self, feature: dict) -> list[list[int]]:
        """The ids each thought slot of one example decodes, terminator included (empty: none)."""

    def batch_targets(self, features) -> list[list[list[int]]]:
        return [self.step_targets(feature) for feature in features]

    def thought_columns(self, ids) -> list[list[int]]:
        """Per row of the thought part's `input_ids` (on the CPU), the columns of its thought vectors in
        slot order: by default its thoughts."""
        return [row.nonzero().flatten().tolist() for row in ids == self.tokens.latent]

    @abstractmethod
    def supervised_pass(self, model, batch):
        """(the method's metrics, its thought vectors [B, W, H] that `thought_columns` index)."""

    # -- set up ------------------------------------------------------------------------------------
    def build(self):
        model = super().build()
        from_start = self.supervision.decoder_start == "start" and "start" in self.roles_read(self.config)
        # Not resized, as both forks load it: the targets hold the tokenizer's own tokens only.
        decoder = start_decoder(self, from_start, self.supervision.decoder_dropout, beside=model)
        return StepSupervised(model, decoder)

    @classmethod
    def work_per_step(cls, config, tokens):
        # The step decoder reads about the CoT once more: a training pass, 3 forwards' worth.
        return super().work_per_step(config, tokens) + config.train.batch_size * 3 * (tokens["cot"] - tokens["nocot"])

    # -- training ----------------------------------------------------------------------------------
    def collate(self, features):
        batch = super().collate(features)
        columns = self.thought_columns(batch[self.thought_part]["input_ids"].cpu())
        steps = collate_step_targets(self.batch_targets(features), columns, self.prefix, self.separator_id,
                                     self.first_position)
        batch["steps"] = to_device(steps, self.strategy.device)
        return batch

    def trained_tokens(self, batch):
        """The method's rows (tokens/s); the step decoder's rows count in `batch_flops`."""
        return super().trained_tokens({key: part for key, part in batch.items() if key != "steps"})

    def batch_flops(self, model, batch):
        from icot.flops import row_lengths

        wrapper = unwrap(model)
        method = self.model_flops(wrapper.model).step_flops(*self.trained_tokens(batch))
        return method + self.model_flops(wrapper.step_decoder).step_flops(*row_lengths({"steps": batch["steps"]}))

    def loss(self, model, batch):
        metrics, states = self.supervised_pass(model, batch)
        step = step_decoder_loss(unwrap(model), states, batch["steps"], self.supervision.reduction)
        metrics["loss"] = metrics["loss"] + self.supervision.weight * step
        metrics["step_loss"] = step.detach()
        return metrics

    # -- finish ------------------------------------------------------------------------------------
    def export(self, model, state_dict, folder):
        """The method's export of its own model: the auxiliary decoder stays behind."""
        super().export(unwrap(model).model, without_step_decoder(state_dict), folder)
