"""The three kinds of tokenizer the data tests run against, each built locally in about a second.

- `byte_level_bpe`: GPT-2's tokenizer class with a vocabulary trained here by the `tokenizers` library
  (byte-level BPE, `<|endoftext|>` as EOS). `####` is kept out of its training text so that, as with
  the real GPT-2 vocabulary, ` ####` splits into several tokens.
- `word_level` and `sentencepiece`: built by `icot.data.tokenizer_build`, saved and loaded back.

They are trained on the sample lines below (or on reference-data lines), split by the project's reader.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from icot.data.reader import parse_line
from icot.data.tokenizer_build import ANSWER_MARKER, EOS_TOKEN, build_from_segments

TOKENIZER_KINDS = ("bpe", "word", "sentencepiece")

# Lines of different lengths in the data format: 4x4, 2x2 and 3x2 multiplication (rendered by hand
# from 5431 x 3918, 12 x 34 and 907 x 58) and GSM8K-Aug-style word problems with calculator CoTs.
MULTIPLICATION_LINES = [
    "1 3 4 5 * 8 1 9 3||8 4 4 3 4 + 0 1 3 4 5 0 ( 8 5 7 7 9 0 ) + 0 0 9 7 8 8 4 ( 8 5 6 5 8 9 4 ) + 0 0 0 3 9 2 6 1"
    " #### 8 5 6 8 7 2 1 2",
    "2 1 * 4 3||8 4 0 + 0 6 3 0 #### 8 0 4 0",
    "7 0 9 * 8 5||6 5 2 7 + 0 5 3 5 4 #### 6 0 6 2 5",
]
GSM8K_LINES = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?||<<3+4=7>> #### 7",
    "A baker sells 12 cakes a day at $15 each. She pays $30 a day for rent. How much does she keep in a week"
    " of 7 days?||<<12*15=180>> <<180-30=150>> <<150*7=1050>> #### 1050",
    "Mia reads 20 pages on Monday and half as many on Tuesday. How many pages did she read?||<<20/2=10>>"
    " <<20+10=30>> #### 30",
]
SAMPLE_LINES = MULTIPLICATION_LINES + GSM8K_LINES
SAMPLE_IDS = [f"mult{i}" for i in range(len(MULTIPLICATION_LINES))] + [f"gsm{i}" for i in range(len(GSM8K_LINES))]


def split_line(line: str) -> tuple[str, str, str]:
    """(question, cot, answer) of one `INPUT||COT #### ANSWER` line, as the project's reader gives them."""
    example = parse_line(line)
    return example.question, example.cot, example.answer


def split_steps(cot: str) -> list[str]:
    """The text of each step of a CoT (`icot.data.steps`, rule auto)."""
    from icot.data.steps import step_char_starts

    chars = step_char_starts(cot)
    return [cot[a:b].strip() for a, b in zip(chars, chars[1:] + [len(cot)])]


def line_segments(lines: Sequence[str]) -> list[str]:
    """Question, CoT and answer texts of every line, in order: what tokenizers are trained on."""
    return [segment for line in lines for segment in split_line(line)]


def read_lines(path: Path, limit: int | None = None) -> list[str]:
    """The first `limit` non-blank lines of a data file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()][:limit]


def byte_level_bpe(segments: Sequence[str], vocab_size: int = 400):
    """A GPT2Tokenizer whose BPE vocabulary and merges were trained on `segments`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([segment.replace(ANSWER_MARKER, "") for segment in segments], trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    return GPT2Tokenizer(vocab=model["vocab"], merges=merges, pad_token=EOS_TOKEN)


def word_level(segments: Sequence[str]):
    return build_from_segments(segments, kind="word")


def sentencepiece(segments: Sequence[str], vocab_size: int = 400):
    return build_from_segments(segments, kind="sentencepiece", vocab_size=vocab_size)


def build(kind: str, segments: Sequence[str]):
    builders = {"bpe": byte_level_bpe, "word": word_level, "sentencepiece": sentencepiece}
    return builders[kind](segments)


def squash(text: str) -> str:
    """Text without whitespace: tokenizers differ in how they decode spaces, never in the other characters."""
    return "".join(text.split())
