"""What each continuous thought must decode, and the step decoder's batch (METHODS.md 4.1, 4.2).

Alignment is positional: thought slot k decodes the k-th step (steps from the data layer's `step_starts`,
`icot.data.steps`: a `<<...>>` equation on GSM8K-Aug, a partial product on multiplication), the last slot
every step from its own on (simcot:Coconut/coconut.py:594-612; simcot:CODI/src/model.py:199-214). In
icot's sequences the steps lie next to each other in the CoT, so the merged target is the CoT's tokens
from that step to its end (the reference re-joins its steps with `\\n`). A slot without a step gets what
the method says (`missing`): the Coconut fork decodes the answer text after the thoughts (its "pseudo
thought", coconut.py:569-592: here `#### a`, icot's answer segment), the CODI fork nothing (no loss).

A target ends with the separator, its terminator (the reference's EOS). A step decoder row is `K thought
vectors, the target, padding`: labels on the target, mask on all but the padding, positions from
`first_position` (the Coconut fork counts from 1, coconut.py:740-744; the CODI fork from 0).
"""

from __future__ import annotations

from typing import Sequence

import torch

from icot.data.collate import IGNORE_INDEX, as_list, second_separator
from icot.data.views import separator_positions


def step_spans(feature: dict) -> list[list[int]]:
    """The token ids of each CoT step of one example."""
    ids, prompt_len = as_list(feature["cot_ids"]), int(feature["prompt_len"])
    bounds = as_list(feature["step_starts"]) + [second_separator(ids, prompt_len) - prompt_len]
    return [ids[prompt_len + a:prompt_len + b] for a, b in zip(bounds, bounds[1:])]


def answer_span(feature: dict) -> list[int]:
    """The answer segment's ids, `#### a`, between the second and the third separator."""
    ids, prompt_len = as_list(feature["cot_ids"]), int(feature["prompt_len"])
    _, second, third = separator_positions(ids, ids[prompt_len - 1], 3)
    return ids[second + 1:third]


def slot_targets(steps: Sequence[list[int]], slots: int, missing: list[int], terminator: int) -> list[list[int]]:
    """The ids each of `slots` thought slots decodes, its terminator included: step k for slot k, every step
    from its own on for the last slot, `missing` where a slot has no step (empty: no target)."""
    if slots == 0:
        return []
    texts = [list(steps[k]) if k < len(steps) else [] for k in range(slots - 1)]
    texts.append([token for step in steps[slots - 1:] for token in step])
    return [text + [terminator] if text else (list(missing) + [terminator] if missing else []) for text in texts]


def truncated_to_first_row(targets: Sequence[Sequence[list[int]]]) -> list[list[list[int]]]:
    """The CODI reference's targets (`codi_simcot.truncate_to_first_row`; METHODS.md 4.6.2): it calls
    `dedup_trailing_pads` inside its loop over rows (simcot:CODI/src/model.py:492-494, 614-616), which cuts
    every row of a slot to the first row's target (terminator included) plus one token, or to one token
    where the first row has no target in that slot."""
    first = targets[0] if targets else []
    return [[target[:len(first[slot]) + 1 if slot < len(first) and first[slot] else 1]
             for slot, target in enumerate(row)] for row in targets]


def collate_step_targets(targets: Sequence[Sequence[list[int]]], columns: Sequence[Sequence[int]], prefix: int,
                         pad_id: int, first_position: int = 0) -> dict[str, torch.Tensor]:
    """The step decoder's batch: one row per (example, slot) with a target. `targets[b][k]`: the ids slot k
    of example b decodes, terminator included (empty: none); `columns[b]`: the columns of example b's
    thought vectors, `prefix` per slot, in slot order. Holds `rows`, `slots`, `columns` [P, prefix],
    `input_ids` [P, L] (the targets, right-padded with `pad_id`), `labels`, `attention_mask` and
    `position_ids` [P, prefix + L]. Without any target, one unlabelled row (see `step_decoder_loss`)."""
    entries = [(row, slot, list(target), list(columns[row][slot * prefix:(slot + 1) * prefix]))
               for row, slots in enumerate(targets) for slot, target in enumerate(slots) if target]
    labelled = bool(entries)
    if not labelled:
        entries = [(0, 0, [pad_id], [0] * prefix)]
    width = max(len(ids) for _, _, ids, _ in entries)
    ids, labels, mask = [], [], []
    for _, _, target, _ in entries:
        right = width - len(target)
        ids.append(target + [pad_id] * right)
        labels.append([IGNORE_INDEX] * prefix + (target if labelled else [IGNORE_INDEX]) + [IGNORE_INDEX] * right)
        mask.append([1] * (prefix + len(target)) + [0] * right)
    positions = torch.arange(first_position, first_position + prefix + width).expand(len(entries), -1)
    return {"rows": torch.tensor([row for row, _, _, _ in entries]),
            "slots": torch.tensor([slot for _, slot, _, _ in entries]),
            "columns": torch.tensor([cols for _, _, _, cols in entries], dtype=torch.long),
            "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask), "position_ids": positions.clone()}
