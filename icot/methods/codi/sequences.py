"""CODI's sequences, in icot's format (METHODS.md 3.1; codi:train.py:157-214, 263-287).

    teacher:  q <sep> steps[:-1] <sep> #### a <sep>                 (right-padded; labels after the prompt)
    student:  q <sep> <|bot|> <|latent|> x N <|eot|> <sep> #### a <sep>

The student row is one sequence whose `<|latent|>` placeholders the multi-pass forward fills with the
projected fed-back states (`icot.models.thoughts`); `collate_thoughts` left-pads it so that every row's
first thought, hence its `<|bot|>`, sits in one column (the reference's left-padded encoder) and
right-pads it after the answer (its right-padded decoder); the teacher rows hold no thought and are
only right-padded. Its labels cover what follows `<|eot|>`, as the reference's decoder labels
(the `<|eot|>` itself is never a target). The CoT's last step is dropped from the teacher unless
`codi.include_last_step` (the reference's include_last_cot); steps come from the data layer
(`step_starts`, `icot.data.steps`).

The distillation position is the token that predicts the answer's first token, in both sequences (with
`codi.distill_positions: answer`, also every later answer token but the last separator): the
reference's "The answer is:" ends with ":" for GPT-2 and with a lone space token for Llama-class
tokenizers (its +1 there, model.py:306-308); icot finds, for any tokenizer, the last token before the
first one that holds a character of the answer (`answer_offset`).

Departures (named, for icot's format): the answer reads `<sep> #### a <sep>`, as every icot mode,
instead of "The answer is: a" and EOS (the `####` rule parses it; the reference's last-number rule is
reported beside it by `icot eval`); the separator is the pad token (the reference adds `[PAD]`), so
three tokens are added: `<|bot|>`, `<|eot|>` and the `<|latent|>` placeholder, whose embedding row is
never read. With `reference_masking`, the positions count from each padded row's first column and the
passes after the prompt's attend to the padding (`later_mask` of ones), as the reference's fix_attn_mask
false; by default positions start at each row's first token and padding stays masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from icot.data.collate import as_list, collate_thoughts, second_separator
from icot.data.tokenizer_build import add_special_tokens, special_token_ids

CODI_TOKENS = ("<|bot|>", "<|eot|>", "<|latent|>")


@dataclass(frozen=True)
class CodiTokens:
    bot: int
    eot: int
    latent: int

    @classmethod
    def of(cls, tokenizer) -> "CodiTokens":
        """The ids of the three tokens, which `add_codi_tokens` put in the tokenizer."""
        return cls(*special_token_ids(tokenizer, CODI_TOKENS))

    @property
    def never_generated(self) -> list[int]:
        return [self.bot, self.eot, self.latent]


def add_codi_tokens(tokenizer) -> CodiTokens:
    """Add the three tokens (as special tokens: decoding skips them) where the tokenizer lacks them."""
    return CodiTokens(*add_special_tokens(tokenizer, CODI_TOKENS))


_OFFSETS: dict[tuple[int, tuple[int, ...]], int] = {}   # (tokenizer, segment) -> offset: segments repeat a lot


def answer_offset(tokenizer, segment: Sequence[int]) -> int:
    """In the answer segment `#### a <sep>` (the ids after the second separator), the index of the token
    that predicts the answer's first token: the one before the first token that decodes to a character of
    the answer (the marker and spaces are not)."""
    from icot.data.views import ANSWER_MARKER

    key = (id(tokenizer), tuple(segment))
    if key not in _OFFSETS:
        text = tokenizer.decode(list(segment), skip_special_tokens=False)
        marker = text.find(ANSWER_MARKER)
        if marker < 0:
            raise ValueError(f"the answer segment {text!r} holds no {ANSWER_MARKER!r}")
        value = marker + len(ANSWER_MARKER)
        while value < len(text) and text[value].isspace():
            value += 1
        first = next(index for index in range(len(segment))
                     if len(tokenizer.decode(list(segment[:index + 1]), skip_special_tokens=False)) > value)
        _OFFSETS[key] = first - 1
    return _OFFSETS[key]


def teacher_sequence(feature: dict, include_last_step: bool) -> tuple[list[int], int]:
    """(the teacher's ids of one example, the index of its second separator)."""
    ids, prompt_len = as_list(feature["cot_ids"]), int(feature["prompt_len"])
    starts = as_list(feature["step_starts"])
    second = second_separator(ids, prompt_len)
    if include_last_step or not starts:
        return ids, second
    kept = ids[:prompt_len + starts[-1]]
    return kept + ids[second:], len(kept)


def student_sequence(feature: dict, latents: int, tokens: CodiTokens) -> tuple[list[int], int]:
    """(the student's ids of one example, the index of its `<|eot|>`)."""
    ids, prompt_len = as_list(feature["cot_ids"]), int(feature["prompt_len"])
    head = ids[:prompt_len] + [tokens.bot] + [tokens.latent] * latents + [tokens.eot]
    return head + ids[second_separator(ids, prompt_len):], len(head) - 1


def collate_codi(features: Sequence[dict], tokenizer, options, tokens: CodiTokens, pad_id: int) -> dict:
    """The `teacher` and `student` batches of a CODI step, each with `distill`: the column of the token that
    predicts the answer, per row ([B]); with `distill_positions: answer`, that column and the later ones of
    the answer segment up to the one before its last separator ([B, K], right-padded with the first column
    and masked by `distill_mask`, the same in both batches: the rows share their answer segment)."""
    teachers, students = [], []
    teacher_columns, student_columns, student_label_starts = [], [], []
    for feature in features:
        teacher, second = teacher_sequence(feature, options.include_last_step)
        student, eot = student_sequence(feature, options.latents, tokens)
        segment = teacher[second + 1:]
        offset = answer_offset(tokenizer, segment)
        count = len(segment) - 1 - offset if options.distill_positions == "answer" else 1
        teachers.append(teacher)
        teacher_columns.append([second + 1 + offset + i for i in range(count)])
        students.append(student)
        student_columns.append([eot + 2 + offset + i for i in range(count)])   # <|eot|> <sep> then the segment
        student_label_starts.append(eot + 1)
    teacher_batch = collate_thoughts(teachers, [int(f["prompt_len"]) for f in features], tokens.latent, pad_id)
    student_batch = collate_thoughts(students, student_label_starts, tokens.latent, pad_id)
    if options.reference_masking:
        student_batch = reference_layout(student_batch)
    if options.distill_positions == "first":
        teacher_batch["distill"] = torch.tensor([columns[0] for columns in teacher_columns])
        student_batch["distill"] = student_batch["left_padding"] + torch.tensor([c[0] for c in student_columns])
        return {"teacher": teacher_batch, "student": student_batch}
    width = max(map(len, teacher_columns))
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in teacher_columns])
    for batch, columns in ((teacher_batch, teacher_columns), (student_batch, student_columns)):
        batch["distill"] = torch.tensor([c + [c[0]] * (width - len(c)) for c in columns])
        batch["distill_mask"] = mask
    student_batch["distill"] = student_batch["distill"] + student_batch["left_padding"][:, None]
    return {"teacher": teacher_batch, "student": student_batch}


def reference_layout(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's positions and masks on a `collate_thoughts` batch (`codi.reference_masking`):
    positions count the padded row's columns from 0 (no position ids under left padding) and
    `later_mask` lets the passes after the prompt's attend to the left padding (no attention mask)."""
    width = batch["input_ids"].size(1)
    lengths = batch["left_padding"] + batch["attention_mask"].sum(dim=1)
    columns = torch.arange(width)
    inside = columns[None] < lengths[:, None]
    return {**batch, "position_ids": torch.where(inside, columns[None], 0),
            "later_mask": inside.long()}


def inference_batch(batch: dict[str, torch.Tensor], latents: int, tokens: CodiTokens,
                    reference_masking: bool) -> dict[str, torch.Tensor]:
    """A left-padded prompt batch (`icot.data.collate.collate_generate`) with `<|bot|>`, the latent
    placeholders and `<|eot|>` appended: the inference input (codi:test.py:168-257)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, width = ids.shape
    added = torch.tensor([tokens.bot] + [tokens.latent] * latents + [tokens.eot], device=ids.device)
    ones = torch.ones_like(added).expand(rows, -1)
    out = {"input_ids": torch.cat((ids, added.expand(rows, -1)), dim=1),
           "attention_mask": torch.cat((mask, ones), dim=1)}
    if reference_masking:
        out["position_ids"] = torch.arange(width + added.numel(), device=ids.device).expand(rows, -1)
        out["later_mask"] = torch.ones_like(out["attention_mask"])
    else:
        steps = torch.arange(1, added.numel() + 1, device=ids.device)
        out["position_ids"] = torch.cat((batch["position_ids"], batch["position_ids"][:, -1:] + steps), dim=1)
    return out
