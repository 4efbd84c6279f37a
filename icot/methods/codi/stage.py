"""CODI: one decoder (LoRA adapters on a frozen base, and the projection) trained as teacher and student
at once (codi:src/model.py:262-409).

Per step: the student row `q <sep> <|bot|> thoughts <|eot|> <sep> #### a <sep>` runs through the
multi-pass forward (`icot.models.thoughts`), each thought the projection of the previous position's
last hidden state (after the final norm), without detaching; the teacher row `q <sep> steps[:-1] <sep>
#### a <sep>` runs once under no_grad for the distillation targets and once with grad for its
cross-entropy (`codi.teacher_passes` 1: one pass for both). Loss = student CE + distill_weight x KD +
teacher_weight x teacher CE, with KD the mean over the embedding output and every layer of
SmoothL1 (or MSE) between the student's and the teacher's states at the token that predicts the answer,
each divided by the std of the teacher's selected states (`distillation_loss`). Cross-entropies are
token means over the shifted labels, as the reference's. Dropout: model.dropout on the decoder,
codi.lora_dropout on the adapters, codi.projection_dropout on the projection.
Validation decodes after the thoughts (accuracy) and measures the loss; `best` follows accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from icot.data.collate import to_device
from icot.errors import UserError
from icot.methods.codi.model import (CodiModel, build_projection, lora_targets, rebuilt_on_cpu, save_codi_export,
                                     with_adapters)
from icot.methods.codi.sequences import (CODI_TOKENS, add_codi_tokens, collate_codi, inference_batch,
                                         student_sequence)
from icot.models.decoder import decoder_shape, gather_rows, unwrap
from icot.models.generation import generate_with_thoughts
from icot.models.thoughts import thought_forward
from icot.stage import Stage, shifted_lm_metrics, start_decoder


def selected_states(hidden: torch.Tensor, columns: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[N, H]: hidden[b, columns[b]] for 1-D columns; for [B, K] columns, hidden[b, columns[b, k]] where
    mask[b, k] (row-major)."""
    if columns.dim() == 1:
        return gather_rows(hidden, columns)
    picked = hidden.gather(1, columns.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))   # [B, K, H]
    return picked[mask.bool()]


def distillation_loss(student_states, student_columns: torch.Tensor, teacher_states, teacher_columns: torch.Tensor,
                      kind: str = "smooth_l1", div_std: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over layers (the embedding output first) of the loss between the student's states at
    `student_columns` and the teacher's (detached) at `teacher_columns` (one column per row, or [B, K]
    under `mask`: the loss is then the mean over every selected state); with `div_std` each layer's loss
    is divided by the std of the teacher's selected states, twice for l2 (codi:src/model.py:354-368).
    In float32 whatever the model's precision."""
    total = 0.0
    for student, teacher in zip(student_states, teacher_states, strict=True):
        picked = selected_states(student, student_columns, mask).float()
        target = selected_states(teacher, teacher_columns, mask).detach().float()
        loss = F.smooth_l1_loss(picked, target) if kind == "smooth_l1" else F.mse_loss(picked, target)
        if div_std:
            std = target.std()
            loss = loss / std / std if kind == "l2" else loss / std
        total = total + loss
    return total / len(student_states)


def student_pass(model, student: dict, options, latent_id: int):
    """The student row's multi-pass forward (its thoughts filled in `inputs_embeds`; the last call's hidden
    states of every layer)."""
    return thought_forward(model, student["input_ids"], student["attention_mask"], student["position_ids"],
                           latent_id, passes=options.latents, feedback=unwrap(model).projection,
                           later_mask=student.get("later_mask"), hidden_states=True)


def codi_loss(model, batch: dict, options, latent_id: int, output=None) -> dict[str, torch.Tensor]:
    """The step's loss and its parts from a `collate_codi` batch (see the module docstring); `output`: the
    student's `student_pass`, where the caller ran it."""
    student, teacher = batch["student"], batch["teacher"]
    if output is None:
        output = student_pass(model, student, options, latent_id)
    metrics = shifted_lm_metrics(output.logits, student["labels"])
    inputs = {key: teacher[key] for key in ("input_ids", "attention_mask", "position_ids")}
    if options.teacher_passes == 2:
        with torch.no_grad():
            targets = model(**inputs, output_hidden_states=True).hidden_states
        graded = model(**inputs)
    else:
        graded = model(**inputs, output_hidden_states=True)
        targets = graded.hidden_states
    teacher_loss = shifted_lm_metrics(graded.logits, teacher["labels"])["loss"]
    distill = distillation_loss(output.hidden_states, student["distill"] - output.hidden_start, targets,
                                teacher["distill"], options.distill_loss, options.distill_div_std,
                                teacher.get("distill_mask"))
    student_loss = metrics["loss"]
    metrics["loss"] = student_loss + options.distill_weight * distill + options.teacher_weight * teacher_loss
    metrics.update(student_loss=student_loss.detach(), distill_loss=distill.detach(),
                   teacher_loss=teacher_loss.detach())
    return metrics


class CodiStage(Stage):
    generation_target = "cot_removed"   # the student writes `<sep> #### a <sep>` after its thoughts
    row_keys = ("codi.latents",)
    uses_steps = True

    def __init__(self, config, strategy, tokenizer):
        super().__init__(config, strategy, tokenizer)
        self.options = config.codi
        if self.options.reference_masking and config.model.gradient_checkpointing:
            raise UserError("codi.reference_masking needs the KV cache, which activation checkpointing drops in "
                            "training: set model.gradient_checkpointing false or codi.reference_masking false")
        self.tokens = add_codi_tokens(tokenizer)

    @classmethod
    def roles_read(cls, config):
        return ("start",) if config.codi.start == "teacher" else ()

    @classmethod
    def work_per_step(cls, config, tokens):
        # The student row (about the without-CoT view plus the thoughts, one forward per thought) and the
        # teacher row (the with-CoT view), each trained: 3 forwards' worth; the no_grad teacher pass: 1.
        teacher = 3 + (1 if config.codi.teacher_passes == 2 else 0)
        return config.train.batch_size * (3 * (tokens["nocot"] + config.codi.latents + 2) + teacher * tokens["cot"])

    def longest_row(self, feature):
        """The student row (the prompt, the thoughts between their markers, the answer) or the teacher's."""
        student = len(student_sequence(feature, self.options.latents, self.tokens)[0])
        return max((student, f"its CODI student row ({self.options.latents} thoughts and 2 markers)"),
                   super().longest_row(feature))

    def check_decoder(self, decoder):
        if self.options.lora:
            lora_targets(decoder, self.options.lora_targets)   # names the model lacks: one line, not peft's

    def check_data(self, train_set, valid_set, limit, log):
        """Besides the steps and rows: without codi.include_last_step the teacher row drops each CoT's last
        step, so where most CoTs have one step, most teacher rows would hold no CoT to distil."""
        super().check_data(train_set, valid_set, limit, log)
        from icot.data.views import list_lengths

        if not self.options.include_last_step:
            single = int((list_lengths(train_set, "step_starts") <= 1).sum())
            if 2 * single > len(train_set):
                raise UserError(f"codi.include_last_step false drops each CoT's last step from the teacher row, and "
                                f"{single} of {len(train_set)} training CoTs have one step or none under data.steps "
                                f"{self.config.data.steps}: their teacher rows would hold no CoT; set "
                                f"codi.include_last_step true or another data.steps")

    def build(self):
        decoder = start_decoder(self, self.options.start == "teacher", self.config.model.dropout)
        self.check_decoder(decoder)
        projection = build_projection(decoder_shape(decoder)[1], self.options)
        # The adapters are created outside the ZeRO-3 load scope (peft reads a partitioned base layer's
        # shape from `ds_shape`); the engine partitions them with the projection.
        return CodiModel(with_adapters(decoder, self.options) if self.options.lora else decoder, projection)

    def export_extra(self) -> dict:
        extra = super().export_extra()
        options = self.options
        extra["codi"] = {"latents": options.latents, "projection_dim": options.projection_dim,
                         "projection_norm": options.projection_norm, "reference_masking": options.reference_masking,
                         "tokens": list(CODI_TOKENS),
                         "lora": {"r": options.lora_r, "alpha": options.lora_alpha} if options.lora else None}
        return extra

    def export(self, model, state_dict, folder):
        """The merged decoder, the projection and the tokenizer (and the adapters alone in `adapter/`),
        from a CPU copy rebuilt from the full state dict: the trained module may be partitioned."""
        codi = rebuilt_on_cpu(unwrap(model).config, self.options, state_dict)
        save_codi_export(codi, folder, self.tokenizer, self.export_extra(), self.options.export_adapter,
                         self.adapter_base())

    def adapter_base(self) -> str | None:
        """The folder of the weights the adapters sit on (absolute): the start's export, model.name_or_path,
        or none (a base built from scratch in the run)."""
        import os

        if self.options.start == "teacher":
            return str(self.input_export("start").resolve())
        path = self.config.model.name_or_path
        return os.path.realpath(path) if path and os.path.isdir(path) else None

    # -- training ----------------------------------------------------------------------------------
    def collate(self, features):
        batch = collate_codi(features, self.tokenizer, self.options, self.tokens, self.separator_id)
        return {name: to_device(part, self.strategy.device) for name, part in batch.items()}

    def loss(self, model, batch):
        return codi_loss(model, batch, self.options, self.tokens.latent)

    # -- validation --------------------------------------------------------------------------------
    def generate(self, model, features, synced):
        prompts, cap = self.generation_batch(features)
        batch = inference_batch(prompts, self.options.latents, self.tokens, self.options.reference_masking)
        return generate_with_thoughts(model, batch, self.tokens.latent, self.separator_id, 2, cap, synced,
                                      feedback=unwrap(model).projection, suppress=self.tokens.never_generated)
