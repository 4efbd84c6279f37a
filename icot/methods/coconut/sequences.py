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

import torch

from icot.data.collate import as_list, second_separator
from icot.data.tokenizer_build import add_special_tokens, special_token_ids

THOUGHT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")


@dataclass(frozen=True)
class ThoughtTokens:
    start: int
    end: int
    latent: int

    @classmethod
    def of(cls, tokenizer) -> "ThoughtTokens":
        """The ids of the three tokens, which `add_thought_tokens` put in the tokenizer."""
        return cls(*special_token_ids(tokenizer, THOUGHT_TOKENS))


def add_thought_tokens(tokenizer) -> ThoughtTokens:
    """Add the three tokens (as special tokens: decoding skips them) where the tokenizer lacks them."""
    return ThoughtTokens(*add_special_tokens(tokenizer, THOUGHT_TOKENS))


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


def with_thoughts(batch: dict[str, torch.Tensor], thoughts: int, tokens: ThoughtTokens) -> dict[str, torch.Tensor]:
    """A left-padded prompt batch (`icot.data.collate.collate_generate`) with the start token, `thoughts`
    thoughts and the end token appended to every row, positions continuing: the inference input."""
    rows = batch["input_ids"].size(0)
    added = torch.tensor([tokens.start] + [tokens.latent] * thoughts + [tokens.end], device=batch["input_ids"].device)
    steps = torch.arange(1, added.numel() + 1, device=added.device)
    return {"input_ids": torch.cat((batch["input_ids"], added.expand(rows, -1)), dim=1),
            "attention_mask": torch.cat((batch["attention_mask"], torch.ones_like(added).expand(rows, -1)), dim=1),
            "position_ids": torch.cat((batch["position_ids"], batch["position_ids"][:, -1:] + steps), dim=1)}
