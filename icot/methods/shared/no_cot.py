"""No-CoT baseline: a decoder trained to answer right after the input (`input <sep> answer <sep>`).
Trained: the decoder. Frozen: nothing. Loss: cross-entropy on the answer."""

from icot.models.generation import generate_no_cot
from icot.stage import Stage, fresh_decoder, lm_metrics, unwrap


class NoCotStage(Stage):
    generation_target = "nocot"

    def build(self):
        return fresh_decoder(self.config, self.tokenizer, dropout=0.0, strategy=self.strategy)

    def loss(self, model, batch):
        nocot = batch["nocot"]
        output = model(input_ids=nocot["input_ids"], attention_mask=nocot["attention_mask"],
                       labels=nocot["labels"])
        return lm_metrics(output, nocot["labels"])

    def generate(self, model, features, synced):
        batch, cap = self.generation_batch(features)
        return generate_no_cot(unwrap(model), batch, self.separator_id, cap, synced)
