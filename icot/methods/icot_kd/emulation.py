"""Thought emulation: an emulator predicts the teacher's diagonal states from the input alone.
Trained: the emulator (decoder + MLPs, mixture, LSTM, attention). Frozen: the teacher.
Loss: sum over layers and dimensions of squared error / 2 (+ mixture cross-entropy for `token`)."""

from icot.methods.icot_kd.teacher_source import TeacherSource
from icot.models.coupled import check_compatible
from icot.models.emulator import Emulator
from icot.stage import Stage, unwrap


class EmulationStage(Stage):
    trained_views = ("prompt",)   # the with-CoT view feeds the frozen teacher

    def build(self):
        options = self.config.icot_kd
        self.teacher = TeacherSource(self)
        # `token`: one component per vocabulary token, supervised by the CoT token at t_l.
        mixture_size = len(self.tokenizer) if options.mixture == "token" else 1
        emulator = Emulator(self.teacher.trained_decoder(), mixture_size=mixture_size,
                            temperature=options.mixture_temperature)
        check_compatible(teacher=self.teacher.model, emulator=emulator)
        self.teacher.prepare()
        return emulator

    @classmethod
    def work_per_step(cls, config, tokens):
        # The emulator reads the prompt; the teacher reads the with-CoT view forward only.
        return config.train.batch_size * (3 * tokens["prompt"] + TeacherSource.work_per_step(config) * tokens["cot"])

    def prepare_train_set(self, train_set):
        return self.teacher.attach_cache(train_set)

    def loss(self, model, batch):
        cot, prompt = batch["cot"], batch["prompt"]
        states, positions = self.teacher.for_batch(cot, batch.get("rows"))
        emulator = unwrap(model)
        targets = cot["input_ids"].gather(1, positions) if emulator.mixture_size > 1 else None
        output = model(prompt["input_ids"], prompt["attention_mask"], prompt["first_sep"], mixture_targets=targets)
        return emulator.loss(output, states, targets, self.config.icot_kd.mixture_loss_weight)

    def export_extra(self):
        return {"stage": self.name, "delta": self.teacher.delta}
