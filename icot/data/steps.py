"""Reasoning steps of a CoT: where each one starts, in characters and in tokens.

Methods that drop or replace whole steps (Coconut replaces the first k with continuous thoughts) read
them from the `step_starts` column that tokenization adds (`icot.data.views.tokenize_dataset`): the
token offset, counted from the first CoT token, at which each step begins. Steps are split once, here.

Rules (`data.steps`):
- `equations`: GSM8K-Aug, one `<<...>>` equation per step: the CoT's whitespace-separated chunks, as the
  Coconut reference splits it (`steps = cot.split(" ")`);
- `plus`: multiplication, which no reference splits: a step is one partial product (with the running sum
  in parentheses that follows it, from the second on) through the `+` that ends it; the last step runs to
  the end of the CoT. `1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 ...` has the steps `1 7 4 3 3 +`,
  `0 6 7 8 4 1 ( 1 3 2 2 8 1 ) +`, ...;
- `sentences`: ProsQA and ProntoQA (Coconut's JSON, whose steps are sentences): a step runs through the
  `.` that ends it; text after the last `.` is a step of its own;
- `words`: one step per whitespace-separated word: the columns layout of `icot data multiply`, whose
  CoT is one column sum per word (`05 051 067 78`);
- `auto`: `equations` for a CoT that holds `<<`, `plus` for one that holds `+`, `sentences` for one that
  ends a sentence (a `.` at its end or before a space), else `words`.
An empty CoT has no step.
"""

from __future__ import annotations

import re
from typing import Sequence

STEP_RULES = ("auto", "equations", "plus", "sentences", "words")
_CHUNK = re.compile(r"\S+")
_ENDED_STEP = {"plus": re.compile(r"[^+]*\+|[^+]+$"), "sentences": re.compile(r".*?\.(?=\s|$)|.+$")}
_SENTENCE_END = re.compile(r"\.(\s|$)")


def step_char_starts(cot: str, rule: str = "auto") -> list[int]:
    """Character offsets in `cot` where each step's first non-space character is."""
    if rule not in STEP_RULES:
        raise ValueError(f"unknown step rule {rule!r}: expected one of {', '.join(STEP_RULES)}")
    if rule == "auto":
        rule = ("equations" if "<<" in cot else "plus" if "+" in cot else
                "sentences" if _SENTENCE_END.search(cot) else "words")
    if rule in ("equations", "words"):   # the same split: whitespace-separated chunks
        return [match.start() for match in _CHUNK.finditer(cot)]
    starts = []
    for match in _ENDED_STEP[rule].finditer(cot):
        text = match.group()
        if text.strip():
            starts.append(match.start() + len(text) - len(text.lstrip()))
    return starts


def token_starts(offsets: list[tuple[int, int]], char_starts: list[int], first_token: int, end_token: int,
                 text: str) -> list[int]:
    """For each step's first character, the token of `text` (from `first_token` to `end_token`: the CoT's
    tokens) where the step starts, counted from `first_token`: the first token that ends after that
    character, or the whitespace-only tokens just before it (a space joins the word after it, as in
    byte-level BPE's " 0"). Comparing token ends with the step's first non-space character holds whether
    a tokenizer's offsets include the space before a token or not. Steps that would start in one token
    (a tokenizer that merged across a boundary) collapse into one."""
    result: list[int] = []
    token = first_token
    for char in char_starts:
        while token < end_token and offsets[token][1] <= char:
            token += 1
        if token >= end_token:
            break
        start = token
        while start - 1 >= first_token and not text[offsets[start - 1][0]:offsets[start - 1][1]].strip():
            start -= 1
        if not result or start - first_token > result[-1]:
            result.append(start - first_token)
    return result


def rule_problem(cots: Sequence[str], rule: str) -> str | None:
    """Why `rule` does not split most of these CoTs into the steps it is meant for, or None: `equations`
    on CoTs without `<<` makes every word a step; `plus` on CoTs with `<<` splits inside equations, and on
    CoTs without `+` leaves each one step."""
    count = len(cots)
    if rule == "equations":
        lacking = sum("<<" not in cot for cot in cots)
        if 2 * lacking > count:
            return (f"{lacking} of {count} CoTs hold no << equation, so each of their words would be a step "
                    f"(words: say so; plus: multiplication in the papers' layout)")
    if rule == "plus":
        equations = sum("<<" in cot for cot in cots)
        if 2 * equations > count:
            return f"{equations} of {count} CoTs hold << equations, which plus would split inside (equations)"
        lacking = sum("+" not in cot for cot in cots)
        if 2 * lacking > count:
            return f"{lacking} of {count} CoTs hold no +, so each would be one step (words, or equations)"
    return None


def describe_counts(counts: Sequence[int]) -> str:
    """`2-5 steps a CoT (mean 3.1), 0 of 1000 without a step`."""
    if not counts:
        return "no examples"
    empty = sum(1 for n in counts if n == 0)
    return (f"{min(counts)}-{max(counts)} steps a CoT (mean {sum(counts) / len(counts):.1f}), {empty} of "
            f"{len(counts)} without a step")
