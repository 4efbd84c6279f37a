"""Evaluation: exact match of the answer after `####`, for generated token ids."""

from __future__ import annotations

from icot.data.reader import normalize_answer

ANSWER_MARKER = "####"


def generated_answer(tokenizer, ids: list[int]) -> str | None:
    """The normalised answer in generated ids, or None where no `####` was written."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if ANSWER_MARKER not in text:
        return None
    return normalize_answer(text)


def answers_match(tokenizer, ids: list[int], reference: str) -> bool:
    return generated_answer(tokenizer, ids) == normalize_answer(reference)
