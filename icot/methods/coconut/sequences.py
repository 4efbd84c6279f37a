"""Coconut's sequences, in icot's format (METHODS.md 2.1; coco:dataset.py:102-302).

A stage-k training example is

    q <sep> <|start-latent|> <|latent|> x n <|end-latent|> steps[k':] <sep> #### a <sep>

with k' = k steps skipped and n = k x c thoughts for k <= max_latent_stage; beyond it every step is
skipped and n = max_latent_stage x c (`pad_latent_to_max`) or min(steps, max_latent_stage) x c. At
k <= max, k x c thoughts even where the example has fewer than k steps, as the reference. Labels cover
what follows `<|end-latent|>`: the remaining steps, the separator, the answer and the final separator.
Steps come from the data layer (`step_starts`, `icot.data.steps`).

The collator left-pads each row with thoughts so that every first thought sits in one column (position
ids 0 and attention mask 0 on that padding, positions counting from 0 at the first real token), then
right-pads every row with the separator (labels -100, positions 0, mask 0).

At inference (validation and `icot eval`) the prompt is `q <sep> <|start-latent|> <|latent|> x n
<|end-latent|>` with n = min(stage, max_latent_stage) x c for every example. One departure: with
`pad_latent_to_max` off the reference gives a test example min(its gold steps, max) x c thoughts, which
reads the gold CoT at test time; icot gives every example the same n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from icot.data.collate import IGNORE_INDEX, as_list, second_separator

THOUGHT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")


@dataclass(frozen=True)
class ThoughtTokens:
    start: int
    end: int
    latent: int

    @classmethod
    def of(cls, tokenizer) -> "ThoughtTokens":
        """The ids of the three tokens, which `add_thought_tokens` put in the tokenizer."""
        ids = tokenizer.convert_tokens_to_ids(list(THOUGHT_TOKENS))
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError(f"the tokenizer lacks the Coconut tokens {THOUGHT_TOKENS}")
        return cls(*ids)


def add_thought_tokens(tokenizer) -> ThoughtTokens:
    """Add the three tokens (as special tokens: decoding skips them) where the tokenizer lacks them."""
    missing = [token for token in THOUGHT_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return ThoughtTokens.of(tokenizer)


def thought_count(stage: int, steps: int, options) -> tuple[int, int]:
    """(steps skipped, thoughts) of an example with `steps` steps at `stage` (dataset.py:254-267)."""
    c, top = options.thoughts_per_step, options.max_latent_stage
    if stage > top:
        return steps, (top if options.pad_latent_to_max else min(steps, top)) * c
    return min(stage, steps), stage * c


def inference_thoughts(stage: int, options) -> int:
    """Thoughts every example gets at inference for `stage` (dataset.py:198-216, see the module docstring)."""
    return min(stage, options.max_latent_stage) * options.thoughts_per_step


def most_thoughts(stage: int, options) -> int:
    """The most thoughts any example of a batch at `stage` can have: every rank runs this many thought
    passes, so that under ZeRO-3 (a collective per forward) all ranks call the decoder equally often."""
    if options.uniform_prob > 0:
        stage = max(stage, options.max_latent_stage + 1)
    return inference_thoughts(stage, options)


def stage_sequence(feature: dict, stage: int, options, tokens: ThoughtTokens) -> tuple[list[int], int]:
    """(the stage-`stage` ids of one example, the index of its first labelled token)."""
    ids, prompt_len = as_list(feature["cot_ids"]), int(feature["prompt_len"])
    starts = as_list(feature["step_starts"])
    skipped, thoughts = thought_count(stage, len(starts), options)
    if skipped == 0:
        rest = ids[prompt_len:]
    elif skipped < len(starts):
        rest = ids[prompt_len + starts[skipped]:]
    else:
        rest = ids[second_separator(ids, prompt_len):]
    head = ids[:prompt_len] + [tokens.start] + [tokens.latent] * thoughts + [tokens.end]
    return head + rest, len(head)


def collate_thoughts(sequences: Sequence[list[int]], label_starts: Sequence[int] | None, latent_id: int,
                     pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `position_ids` (and `labels` from `label_starts`) with every row's
    first thought in one column (dataset.py:102-183)."""
    firsts = [ids.index(latent_id) if latent_id in ids else None for ids in sequences]
    column = max((first for first in firsts if first is not None), default=0)
    lefts = [0 if first is None else column - first for first in firsts]
    width = max(left + len(ids) for left, ids in zip(lefts, sequences))
    rows = {"input_ids": [], "attention_mask": [], "position_ids": [], "labels": []}
    for index, (ids, left) in enumerate(zip(sequences, lefts)):
        right = width - left - len(ids)
        rows["input_ids"].append([pad_id] * left + ids + [pad_id] * right)
        rows["attention_mask"].append([0] * left + [1] * len(ids) + [0] * right)
        rows["position_ids"].append([0] * left + list(range(len(ids))) + [0] * right)
        if label_starts is not None:
            start = label_starts[index]
            rows["labels"].append([IGNORE_INDEX] * (left + start) + ids[start:] + [IGNORE_INDEX] * right)
    if label_starts is None:
        del rows["labels"]
    batch = {key: torch.tensor(value, dtype=torch.long) for key, value in rows.items()}
    batch["left_padding"] = torch.tensor(lefts, dtype=torch.long)
    return batch


def with_thoughts(batch: dict[str, torch.Tensor], thoughts: int, tokens: ThoughtTokens) -> dict[str, torch.Tensor]:
    """A left-padded prompt batch (`icot.data.collate.collate_generate`) with the start token, `thoughts`
    thoughts and the end token appended to every row, positions continuing: the inference input."""
    rows = batch["input_ids"].size(0)
    added = torch.tensor([tokens.start] + [tokens.latent] * thoughts + [tokens.end], device=batch["input_ids"].device)
    steps = torch.arange(1, added.numel() + 1, device=added.device)
    return {"input_ids": torch.cat((batch["input_ids"], added.expand(rows, -1)), dim=1),
            "attention_mask": torch.cat((batch["attention_mask"], torch.ones_like(added).expand(rows, -1)), dim=1),
            "position_ids": torch.cat((batch["position_ids"], batch["position_ids"][:, -1:] + steps), dim=1)}
