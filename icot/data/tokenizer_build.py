"""Tokenizers: built locally from data files for models trained from scratch, and loaded from folders.

Two kinds, both saved as folders that `transformers.AutoTokenizer.from_pretrained` loads with
`<|endoftext|>` as EOS (also BOS and pad), which the sequence format uses as its only separator:

- `word`: one id per whitespace-separated word of the data (the natural choice for multiplication,
  whose digits are already space separated); `####` is always in the vocabulary.
- `sentencepiece`: a unigram model trained with the `sentencepiece` library (for text such as
  GSM8K-Aug), with EOS as a control piece and `####` as a user-defined symbol so it never splits.
  The `.model` file is kept beside the converted `tokenizer.json`; the conversion is checked against
  the `sentencepiece` processor itself at build time.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from icot.data.reader import ANSWER_MARKER
from icot.errors import UserError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
TOKENIZER_KINDS = ("word", "sentencepiece")
# Room for the reserved tokens and a few words.
MIN_VOCAB_SIZE = 8

SENTENCEPIECE_MODEL_FILE = "tokenizer.model"
# Every file a build writes, removed first so that no earlier build's file is left behind.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", SENTENCEPIECE_MODEL_FILE,
                   "tokenizer.vocab")
SENTENCEPIECE_SPACE = "\u2581"
BYTE_PIECES = 256
SENTENCEPIECE_SPECIAL_PIECES = (UNK_TOKEN, EOS_TOKEN, ANSWER_MARKER)
# Bounds sentencepiece's training time on large files (GSM8K-Aug train has ~1.2M segments).
SENTENCEPIECE_MAX_SENTENCES = 1_000_000
# How many segments the built sentencepiece tokenizer is compared on against the `sentencepiece` processor.
CONVERSION_CHECK_SEGMENTS = 200


def load_tokenizer(folder: str | os.PathLike, what: str):
    """The tokenizer saved in a local folder; `what` names where the folder came from (a config key, an
    export) in errors. Its EOS token is the separator of the sequence format, so it must have one."""
    from transformers import AutoTokenizer

    if not Path(folder).is_dir():
        raise UserError(f"{what}: {folder} is not a local folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:   # an empty folder, a corrupt tokenizer.json: OSError, ValueError, tokenizers' own
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{what}: cannot load a tokenizer from {folder} ({reason[:200]})") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"{what}: the tokenizer in {folder} has no EOS token, which icot uses as the separator")
    return tokenizer


def special_token_ids(tokenizer, tokens: Sequence[str]) -> list[int]:
    """The ids of `tokens`, which a method added (`add_special_tokens`); ValueError where one is missing."""
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"the tokenizer lacks the tokens {tuple(tokens)}")
    return ids


def add_special_tokens(tokenizer, tokens: Sequence[str]) -> list[int]:
    """Add `tokens` as special tokens (decoding skips them) where the tokenizer lacks them; their ids."""
    missing = [token for token in tokens if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return special_token_ids(tokenizer, tokens)


def build_tokenizer(files: Sequence[str | os.PathLike], kind: str = "word", out: str | os.PathLike | None = None,
                    vocab_size: int = 8000, cover: Sequence[str | os.PathLike] = ()):
    """Build a tokenizer of `kind` from data files (`INPUT||COT #### ANSWER` lines).

    Saved to `out` when given (loadable with `AutoTokenizer.from_pretrained(out)`); the returned
    tokenizer is the one loaded back from that folder, so callers see exactly what users will load.
    `cover` (word kind): more files whose every word must be in the vocabulary (a validation or test
    split of a closed vocabulary such as multiplication's numbers); words `files` lack are added after
    theirs, so the ids of `files`' words do not depend on them.
    """
    if not files:
        raise UserError("no data files given to build a tokenizer from")
    check_settings(kind, vocab_size)
    return build_from_segments(list(example_segments(files)), kind=kind, out=out, vocab_size=vocab_size,
                               cover=list(example_segments(cover)))


def build_from_segments(segments: Sequence[str], kind: str = "word", out: str | os.PathLike | None = None,
                        vocab_size: int = 8000, cover: Sequence[str] = ()):
    """`build_tokenizer` from texts (questions, CoTs, answers) instead of files; `out=None` saves nowhere."""
    check_settings(kind, vocab_size)
    if cover and kind != "word":
        raise UserError("cover: only a word-level tokenizer has a closed vocabulary to complete")
    if out is None:
        with tempfile.TemporaryDirectory(prefix="icot-tokenizer-") as scratch:
            return _build_into(list(segments), kind, Path(scratch), vocab_size, cover)
    return _build_into(list(segments), kind, Path(out), vocab_size, cover)


def check_settings(kind: str, vocab_size: int) -> None:
    if kind not in TOKENIZER_KINDS:
        raise UserError(f"unknown tokenizer kind {kind!r}: expected one of {', '.join(TOKENIZER_KINDS)}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")


def build_tokenizer_cli(files: Sequence[str], kind: str = "word", out: str = "tokenizer",
                        vocab_size: int = 8000, cover=()) -> None:
    """`icot tokenizer build FILE... --kind word --out DIR [--cover FILE,FILE]`: build, save and print a
    one-line summary."""
    cover = [c for c in cover.split(",") if c] if isinstance(cover, str) else list(cover)
    tokenizer = build_tokenizer(files, kind=kind, out=out, vocab_size=int(vocab_size), cover=cover)
    print(f"built {kind} tokenizer with {len(tokenizer)} tokens (eos {tokenizer.eos_token!r}, "
          f"id {tokenizer.eos_token_id}) from {len(files)} file(s) -> {out}")


def example_segments(files: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Question, CoT and answer of every example, as the sequence views will write them."""
    from icot.data.reader import iter_examples

    for path in files:
        for _, example in iter_examples(path):
            yield example.question
            yield example.cot
            yield example.answer


def _build_into(segments: list[str], kind: str, folder: Path, vocab_size: int, cover: Sequence[str] = ()):
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    # A previous build's files would be loaded instead of (or beside) the new ones.
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    if kind == "word":
        tokenizer = word_level_tokenizer(segments, vocab_size, cover)
    else:
        tokenizer = sentencepiece_tokenizer(segments, folder, vocab_size)
    tokenizer.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def word_vocabulary(segments: Iterable[str], vocab_size: int, cover: Iterable[str] = ()) -> dict[str, int]:
    """Special tokens first, then the most frequent words; ties go alphabetically, so file order does not
    matter. Words of `cover` not among them come last, alphabetically."""
    reserved = [EOS_TOKEN, UNK_TOKEN, ANSWER_MARKER]
    counts = Counter(word for segment in segments for word in segment.split())
    for token in reserved:
        counts.pop(token, None)
    words = sorted(counts, key=lambda word: (-counts[word], word))
    kept = words[: max(vocab_size - len(reserved), 0)]
    if len(kept) < len(words):
        logger.warning("word vocabulary capped at %d: %d rare words will map to %s",
                       vocab_size, len(words) - len(kept), UNK_TOKEN)
    known = set(reserved) | set(kept)
    added = sorted({word for segment in cover for word in segment.split()} - known)
    return {token: index for index, token in enumerate(reserved + kept + added)}


def word_level_tokenizer(segments: Iterable[str], vocab_size: int, cover: Iterable[str] = ()):
    """A `WordLevel` model over whitespace-split words; decoding joins the words with single spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(word_vocabulary(segments, vocab_size, cover), unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **_special_tokens())


def sentencepiece_tokenizer(segments: list[str], folder: Path, vocab_size: int):
    """Train a unigram sentencepiece model into `folder` and load it through transformers' own converter."""
    from transformers import PreTrainedTokenizerFast

    model_file = train_sentencepiece(segments, folder, vocab_size)
    # Loading a folder holding only a `.model` file makes transformers convert it to a fast tokenizer.
    config_file = folder / "tokenizer_config.json"
    config_file.write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **_special_tokens()}))
    converted = PreTrainedTokenizerFast.from_pretrained(str(folder))
    # Re-wrap the converted backend so the saved config holds only our settings, not loading arguments.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted.backend_tokenizer, **_special_tokens())
    check_sentencepiece_conversion(tokenizer, model_file, segments[:CONVERSION_CHECK_SEGMENTS])
    return tokenizer


def train_sentencepiece(segments: list[str], folder: Path, vocab_size: int) -> Path:
    """Train `folder/tokenizer.model`.

    Digits are split (numbers become digit sequences, as in arithmetic), byte fallback avoids `<unk>`
    for unseen characters, and the identity normalizer keeps decoded answers equal to the data's text.
    `vocab_size` is a soft limit, since small files cannot fill a large vocabulary.
    """
    import sentencepiece as spm

    minimum = sentencepiece_minimum_vocab(segments)
    if vocab_size < minimum:
        raise UserError(f"vocab_size {vocab_size} is too small for a sentencepiece model of these data: every "
                        f"character, the 256 byte-fallback pieces and the special pieces need {minimum}")
    model_prefix = folder / Path(SENTENCEPIECE_MODEL_FILE).stem
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([segment for segment in segments if segment.strip()]),
        model_prefix=str(model_prefix),
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
        unk_piece=UNK_TOKEN, eos_piece=EOS_TOKEN,
        user_defined_symbols=[ANSWER_MARKER],
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        input_sentence_size=SENTENCEPIECE_MAX_SENTENCES,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return model_prefix.with_suffix(".model")


def sentencepiece_minimum_vocab(segments: Sequence[str]) -> int:
    """Pieces sentencepiece needs before learning any: each character (space becomes `▁`), 256 bytes, specials."""
    characters = set().union(*map(set, segments)) - {" "} | {SENTENCEPIECE_SPACE}
    return len(characters) + BYTE_PIECES + len(SENTENCEPIECE_SPECIAL_PIECES)


def check_sentencepiece_conversion(tokenizer, model_file: Path, segments: Sequence[str]) -> None:
    """The converted tokenizer must give the same ids as the `sentencepiece` processor it came from."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    for segment in segments:
        expected = processor.encode(segment)
        converted = tokenizer(segment, add_special_tokens=False)["input_ids"]
        if converted != expected:
            raise RuntimeError(
                f"transformers' conversion of {model_file} disagrees with sentencepiece on {segment!r}: "
                f"{tokenizer.convert_ids_to_tokens(converted)} != {processor.id_to_piece(expected)}")


def _special_tokens() -> dict[str, str]:
    return {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": UNK_TOKEN}
