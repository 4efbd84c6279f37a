"""Teacher: a decoder fine-tuned on explicit CoT (`input <sep> cot <sep> answer <sep>`).
Trained: the decoder, dropout on. Frozen: nothing. Loss: cross-entropy on CoT and answer."""

from icot.models.generation import generate_explicit
from icot.stage import Stage, fresh_decoder, lm_metrics, unwrap


class TeacherStage(Stage):
    generation_target = "cot"

    def build(self):
        return fresh_decoder(self.config, self.tokenizer, dropout=self.config.model.dropout, strategy=self.strategy)

    def loss(self, model, batch):
        cot = batch["cot"]
        output = model(input_ids=cot["input_ids"], attention_mask=cot["attention_mask"], labels=cot["labels"])
        return lm_metrics(output, cot["labels"])

    def generate(self, model, features, synced):
        batch, cap = self.generation_batch(features)
        return generate_explicit(unwrap(model), batch, self.separator_id, cap, synced)
