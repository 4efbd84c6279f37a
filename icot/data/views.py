"""The three token-id views of an example, in the paper's GPT-2 sequence format.

With the separator `<sep>` (the tokenizer's EOS unless overridden):

- with CoT (teacher):        ` {question} <sep> {cot} <sep> #### {answer} <sep>`
- without CoT (student):     ` {question} <sep> #### {answer} <sep>`
- input only (prompt):       the without-CoT ids up to and including the first separator.

The prompt is cut from the ids rather than tokenized on its own, so it is exactly the prefix the
models were trained on. Every encoded example is checked: both views share that prefix, each holds
the expected number of separators and ends with one, and `####` survives tokenization.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from icot.data.reader import ANSWER_MARKER, DataFormatError
from icot.data.steps import step_char_starts, token_starts
from icot.errors import UserError

logger = logging.getLogger(__name__)

COT_VIEW_SEPARATORS = 3
NOCOT_VIEW_SEPARATORS = 2
POLICIES = ("drop", "error")   # what becomes of an example too long, or with a word the tokenizer does not know
# Bump when the sequence format or the checks change, so cached tokenizations are not reused.
FORMAT_VERSION = "icot-views-3"
KEPT, TOO_LONG, UNKNOWN_WORD = 0, 1, 2   # the `status` of an encoded row


class SequenceFormatError(UserError):
    """An example whose views do not tokenize into the sequence format (names tokenizer and example)."""


def with_cot_text(question: str, cot: str, answer: str, separator: str) -> str:
    return f" {question} {separator} {cot} {separator} {ANSWER_MARKER} {answer} {separator}"


def without_cot_text(question: str, answer: str, separator: str) -> str:
    return f" {question} {separator} {ANSWER_MARKER} {answer} {separator}"


def resolve_separator(tokenizer, separator_id: int | None = None) -> tuple[int, str]:
    """The separator's id and the token text that the views write for it."""
    if separator_id is None:
        separator_id = tokenizer.eos_token_id
        if separator_id is None:
            raise UserError(f"{describe_tokenizer(tokenizer)} has no EOS token to use as separator; "
                            "pass separator_id")
    return separator_id, tokenizer.convert_ids_to_tokens(separator_id)


def separator_positions(ids, separator_id: int, count: int) -> list[int]:
    """Positions of the first `count` occurrences of the separator.

    Counting occurrences (instead of taking the last one) keeps right padding with EOS harmless.
    """
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    positions: list[int] = []
    start = 0
    for _ in range(count):
        try:
            position = ids.index(separator_id, start)
        except ValueError:
            raise ValueError(f"expected {count} separators (id {separator_id}), found {len(positions)}") from None
        positions.append(position)
        start = position + 1
    return positions


def encode_example(tokenizer, question: str, cot: str, answer: str, separator_id: int | None = None) -> dict:
    """`cot_ids`, `nocot_ids` and `prompt_len` (index of the first separator + 1) of one example."""
    batch = encode_batch(tokenizer, [question], [cot], [answer], separator_id)
    return {key: values[0] for key, values in batch.items()}


def encode_batch(tokenizer, questions: Sequence[str], cots: Sequence[str], answers: Sequence[str],
                 separator_id: int | None = None, step_rule: str = "auto") -> dict[str, list]:
    """Column-wise `encode_example`: one tokenizer call per view for the whole batch. `step_starts`: where
    each CoT step begins, in tokens from the first CoT token (`icot.data.steps`, rule `step_rule`)."""
    separator_id, separator = resolve_separator(tokenizer, separator_id)
    cot_texts = [with_cot_text(q, c, a, separator) for q, c, a in zip(questions, cots, answers)]
    nocot_texts = [without_cot_text(q, a, separator) for q, a in zip(questions, answers)]
    fast = getattr(tokenizer, "is_fast", False)
    encoded = tokenizer(cot_texts, add_special_tokens=False, return_attention_mask=False,
                        return_offsets_mapping=fast)
    cot_ids = encoded["input_ids"]
    nocot_ids = tokenizer(nocot_texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    prompt_lens = []
    for question, with_cot, without_cot in zip(questions, cot_ids, nocot_ids):
        problem = view_problem(with_cot, without_cot, separator_id)
        if problem:
            raise format_error(tokenizer, question, problem, separator_id)
        prompt_lens.append(without_cot.index(separator_id) + 1)
    check_answer_marker(tokenizer, questions, nocot_ids, prompt_lens, separator_id)
    step_starts = []
    for index, (question, cot, ids, prompt_len) in enumerate(zip(questions, cots, cot_ids, prompt_lens)):
        cot_start = len(f" {question} {separator} ")   # where the CoT begins in `with_cot_text`
        chars = [cot_start + char for char in step_char_starts(cot, step_rule)]
        cot_end = ids.index(separator_id, prompt_len)
        if fast:
            step_starts.append(token_starts(encoded["offset_mapping"][index], chars, prompt_len, cot_end,
                                            cot_texts[index]))
        else:
            step_starts.append(prefix_token_starts(tokenizer, ids, cot_texts[index], chars, prompt_len, cot_end))
    return {"cot_ids": cot_ids, "nocot_ids": nocot_ids, "prompt_len": prompt_lens, "step_starts": step_starts}


def prefix_token_starts(tokenizer, ids: list[int], text: str, char_starts: list[int], first_token: int,
                        end_token: int) -> list[int]:
    """`token_starts` for a tokenizer without offset mapping (a slow one): each step starts after the
    tokens that the text before it shares with the whole text's `ids` (a space before a step joins the
    step's first token in some tokenizers and stands alone in others: the shared prefix is right for both)."""
    result: list[int] = []
    for char in char_starts:
        before = tokenizer(text[:char], add_special_tokens=False)["input_ids"]
        token = next((i for i, (a, b) in enumerate(zip(before, ids)) if a != b), min(len(before), len(ids)))
        if token >= end_token:
            break
        if token >= first_token and (not result or token - first_token > result[-1]):
            result.append(token - first_token)
    return result


def view_problem(cot_ids: list[int], nocot_ids: list[int], separator_id: int) -> str | None:
    """What is wrong with one example's two views, or None."""
    for name, ids, expected in (("with-CoT", cot_ids, COT_VIEW_SEPARATORS),
                                ("without-CoT", nocot_ids, NOCOT_VIEW_SEPARATORS)):
        found = ids.count(separator_id)
        if found != expected:
            return f"the {name} view has {found} separators, expected {expected}"
        if ids[-1] != separator_id:
            return f"the {name} view does not end with the separator"
    prompt_len = nocot_ids.index(separator_id) + 1
    if cot_ids[:prompt_len] != nocot_ids[:prompt_len]:
        return "the with-CoT and without-CoT views do not share the prompt prefix"
    return None


def check_answer_marker(tokenizer, questions: Sequence[str], nocot_ids: Sequence[list[int]],
                        prompt_lens: Sequence[int], separator_id: int) -> None:
    """The answer segment must decode to text starting with `####`; fails where it became `<unk>` or lost characters."""
    answer_segments = [ids[prompt_len:-1] for ids, prompt_len in zip(nocot_ids, prompt_lens)]
    decoded = tokenizer.batch_decode(answer_segments)
    for question, text in zip(questions, decoded):
        if not text.lstrip().startswith(ANSWER_MARKER):
            raise format_error(tokenizer, question, f"{ANSWER_MARKER!r} does not survive tokenization: the answer "
                               f"segment decodes to {text!r}", separator_id)


def format_error(tokenizer, question: str, problem: str, separator_id: int) -> SequenceFormatError:
    return SequenceFormatError(f"{describe_tokenizer(tokenizer)} (separator id {separator_id}), "
                               f"example {shorten(question)!r}: {problem}")


def describe_tokenizer(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or "built in memory"
    return f"tokenizer {type(tokenizer).__name__} ({name}, {len(tokenizer)} tokens)"


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tokenize_dataset(dataset, tokenizer, num_proc: int = 1, max_length: int | None = None,
                     cache_dir: str | os.PathLike | None = None, separator_id: int | None = None,
                     on_overlength: str = "drop", on_unknown: str = "error", source: str = "data",
                     step_rule: str = "auto"):
    """Encode a (question, cot, answer[, line]) `datasets.Dataset` into columns cot_ids, nocot_ids,
    prompt_len, step_starts (`icot.data.steps`, rule `step_rule`), answer, line.

    Runs `Dataset.map` (batched, `num_proc` processes) under a fingerprint computed from the dataset,
    the tokenizer's full definition and these settings, so a second run loads the cached result: from
    `cache_dir` when given, else beside the dataset's own cache files (an in-memory dataset without
    `cache_dir` is not cached). An example whose with-CoT view exceeds `max_length` tokens, or that holds
    a word the tokenizer maps to its unknown token, is dropped (counted in a warning) or, with the policy
    "error", stops the run with `source:line` (`line`: the file line the reader recorded). `answer`
    stays a string for exact match.
    """
    for name, policy in (("on_overlength", on_overlength), ("on_unknown", on_unknown)):
        if policy not in POLICIES:
            raise UserError(f"{name} must be one of {POLICIES}, got {policy!r}")
    separator_id, _ = resolve_separator(tokenizer, separator_id)
    settings = {"separator_id": separator_id, "max_length": max_length, "on_overlength": on_overlength,
                "on_unknown": on_unknown, "source": str(source), "step_rule": step_rule}
    fingerprint = tokenized_fingerprint(dataset, tokenizer, settings)
    tokenized = dataset.map(
        encode_rows,
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, **settings},
        remove_columns=dataset.column_names,
        features=tokenized_features(with_status=True),
        new_fingerprint=fingerprint,
        cache_file_name=cache_file_name(cache_dir, fingerprint),
        desc="tokenizing",
    )
    import numpy as np

    status = np.asarray(tokenized.data.column("status"))
    if (status != KEPT).any():
        for code, what in ((TOO_LONG, f"longer than {max_length} tokens (with-CoT view)"),
                           (UNKNOWN_WORD, "with words the tokenizer does not know")):
            if (status == code).any():
                logger.warning("%s: dropped %d of %d examples %s", source, int((status == code).sum()), len(status),
                               what)
        tokenized = tokenized.select(np.flatnonzero(status == KEPT))
    return tokenized.remove_columns("status")


def encode_rows(batch: dict[str, list], tokenizer, separator_id: int, max_length: int | None, on_overlength: str,
                on_unknown: str, source: str, step_rule: str) -> dict[str, list]:
    """The `Dataset.map` function: encode a batch; each row's `status` says whether it is kept."""
    encoded = encode_batch(tokenizer, batch["question"], batch["cot"], batch["answer"], separator_id, step_rule)
    encoded["answer"] = list(batch["answer"])
    encoded["line"] = list(batch["line"]) if "line" in batch else [None] * len(batch["answer"])
    unknown = unknown_token_id(tokenizer, separator_id)
    encoded["status"] = []
    for index, ids in enumerate(encoded["cot_ids"]):
        line = encoded["line"][index]
        if unknown is not None and unknown in ids:
            if on_unknown == "error":
                word = unknown_word(tokenizer, unknown, batch["question"][index], batch["cot"][index],
                                    batch["answer"][index])
                raise DataFormatError(source, line, f"{word!r} is not in the vocabulary of {describe_tokenizer(tokenizer)}"
                                                    f": it would become {tokenizer.unk_token} (data.skip_bad_lines "
                                                    f"skips such lines)")
            encoded["status"].append(UNKNOWN_WORD)
        elif max_length is not None and len(ids) > max_length:
            if on_overlength == "error":
                raise DataFormatError(source, line, f"the with-CoT view has {len(ids)} tokens, more than "
                                                    f"data.max_length={max_length}")
            encoded["status"].append(TOO_LONG)
        else:
            encoded["status"].append(KEPT)
    return encoded


def unknown_token_id(tokenizer, separator_id: int) -> int | None:
    """The id an unknown word becomes, where a tokenizer has one of its own (GPT-2's BPE knows every byte
    and calls its EOS the unknown token, which is the separator here)."""
    unknown = tokenizer.unk_token_id
    return None if unknown is None or unknown in (separator_id, tokenizer.pad_token_id) else unknown


def unknown_word(tokenizer, unknown: int, *texts: str) -> str:
    """The first whitespace-separated word of `texts` that encodes to the unknown token."""
    for word in " ".join(texts).split():
        if unknown in tokenizer(word, add_special_tokens=False)["input_ids"]:
            return word
    return tokenizer.unk_token


def list_lengths(dataset, column: str):
    """The length of every row's list in `column` (e.g. `cot_ids`: the with-CoT view's tokens), from the
    Arrow data without building Python lists; a selection gives the rows it holds."""
    import numpy as np
    import pyarrow.compute as pc

    lengths = np.asarray(pc.list_value_length(dataset.data.column(column)))
    if dataset._indices is not None:
        lengths = lengths[np.asarray(dataset._indices.column(0))]
    return lengths


def fit_to_positions(dataset, limit: int | None, policy: str, source: str):
    """The examples whose with-CoT view fits the model's `limit` positions: the others are dropped (counted
    in a warning) or, with the policy "error", stop the run with `source:line`."""
    import numpy as np

    if limit is None or dataset is None or len(dataset) == 0:
        return dataset
    lengths = list_lengths(dataset, "cot_ids")
    too_long = lengths > limit
    if not too_long.any():
        return dataset
    if policy == "error":
        first = int(np.flatnonzero(too_long)[0])
        raise DataFormatError(source, dataset[first]["line"], f"the with-CoT view has {int(lengths[first])} tokens, "
                                                              f"more than the model's {limit} positions")
    logger.warning("%s: dropped %d of %d examples longer than the model's %d positions (with-CoT view)", source,
                   int(too_long.sum()), len(dataset), limit)
    return dataset.select(np.flatnonzero(~too_long))


def tokenized_features(with_status: bool = False):
    from datasets import Features, List, Value

    columns = {"cot_ids": List(Value("int32")), "nocot_ids": List(Value("int32")), "prompt_len": Value("int32"),
               "step_starts": List(Value("int32")), "answer": Value("string"), "line": Value("int32")}
    if with_status:
        columns["status"] = Value("int8")
    return Features(columns)


def tokenized_fingerprint(dataset, tokenizer, settings: dict) -> str:
    """Identifies a tokenization: input data, tokenizer definition, settings and format version.

    Computed here rather than by `datasets`' function hashing, whose hash of a tokenizer object can
    change after the tokenizer has been used.
    """
    from datasets.fingerprint import Hasher

    hasher = Hasher()
    hasher.update(FORMAT_VERSION)
    hasher.update(dataset._fingerprint)
    hasher.update(tokenizer_definition(tokenizer))
    hasher.update(sorted(settings.items()))
    return hasher.hexdigest()


def tokenizer_definition(tokenizer) -> str:
    """Everything that decides a tokenizer's ids: its class, its special tokens and its full backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Padding and truncation are call-time state that transformers writes into the backend.
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
        body = json.dumps(definition, sort_keys=True)
    else:
        from datasets.fingerprint import Hasher

        body = Hasher.hash(tokenizer)
    return f"{type(tokenizer).__name__}|{tokenizer.eos_token_id}|{tokenizer.pad_token_id}|{body}"


def cache_file_name(cache_dir: str | os.PathLike | None, fingerprint: str) -> str | None:
    if cache_dir is None:
        return None
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return str(Path(cache_dir) / f"tokenized-{fingerprint}.arrow")
