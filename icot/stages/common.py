"""What every stage shares: the tokenizer, the data, fresh decoders, earlier stages' folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from icot.config import Paths, StageConfig
from icot.errors import UserError
from icot.models.decoder import decoder_config, load_decoder, set_gradient_checkpointing

log = logging.getLogger("icot")

DONE_MARKER = "DONE"
PREEMPTED_MARKER = "PREEMPTED"

# Which earlier stage each stage reads, and through which config key it can be pointed elsewhere.
INPUT_STAGES = {
    "teacher": {},
    "no_cot": {},
    "mind_reading": {"teacher": "teacher_dir"},
    "emulation": {"teacher": "teacher_dir"},
    "coupling": {"mind_reading": "student_dir", "emulation": "emulator_dir"},
}


def stage_folder(config: StageConfig, input_stage: str) -> Path:
    """The folder of a completed earlier stage (its export is what this stage reads)."""
    override = getattr(config, INPUT_STAGES[config.stage][input_stage])
    folder = Path(override) if override else Paths.for_stage(config.run_dir, input_stage).root
    if not (folder / DONE_MARKER).exists():
        raise UserError(f"stage {config.stage!r} needs a completed {input_stage!r} stage, but {folder} has "
                        f"no {DONE_MARKER} marker: run `icot train {input_stage}` first or set "
                        f"--{INPUT_STAGES[config.stage][input_stage]}")
    return folder


def input_folders(config: StageConfig) -> dict[str, Path]:
    """Every earlier stage folder this config's stage reads."""
    return {name: stage_folder(config, name) for name in INPUT_STAGES[config.stage]}


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; is {folder} a completed icot stage folder?") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def load_tokenizer(config: StageConfig, fallback: Path | None = None):
    """The tokenizer named by model.tokenizer, else model.name_or_path, else an earlier stage's export."""
    from transformers import AutoTokenizer

    source = config.model.tokenizer or config.model.name_or_path or (str(fallback) if fallback else None)
    if source is None:
        raise UserError("model.tokenizer: no tokenizer given (a local folder; `icot tokenizer build` makes one)")
    if not Path(source).is_dir():
        raise UserError(f"model.tokenizer: {source} is not a local folder")
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise UserError(f"model.tokenizer: {source} has no EOS token, which icot uses as the separator")
    return tokenizer


def load_split(config: StageConfig, tokenizer, split: str):
    """The tokenized split (`train`, `valid` or `test`), or None when the recipe names no file."""
    from icot.data.reader import load_examples
    from icot.data.views import tokenize_dataset

    path = getattr(config.data, split)
    if path is None:
        return None
    examples = load_examples(path, skip_bad=config.data.skip_bad_lines, cache_dir=config.data.cache_dir)
    limit = config.data.max_train_examples if split == "train" else config.data.max_eval_examples
    if limit is not None and limit < len(examples):
        examples = examples.select(range(limit))
    tokenized = tokenize_dataset(examples, tokenizer, num_proc=config.data.num_proc,
                                 max_length=config.data.max_length, cache_dir=config.data.cache_dir)
    if len(tokenized) == 0:
        raise UserError(f"{path}: no example fits data.max_length={config.data.max_length}")
    return tokenized


def fresh_decoder(config: StageConfig, tokenizer, dropout: float, strategy) -> nn.Module:
    """A decoder from model.name_or_path (pretrained; loaded partitioned under ZeRO-3 through
    `strategy`) or built from scratch from the model section."""
    model = config.model
    if model.name_or_path:
        decoder = strategy.load_pretrained(lambda: load_decoder(model.name_or_path))
    else:
        from icot.models.decoder import build_decoder

        decoder = build_decoder(decoder_config(
            model.family, vocab_size=len(tokenizer), layers=model.layers, hidden=model.hidden,
            heads=model.heads, max_positions=model.max_positions, dropout=dropout, kv_heads=model.kv_heads,
            intermediate=model.intermediate, eos_token_id=tokenizer.eos_token_id))
    return prepare_decoder(decoder, config, dropout)


def prepare_decoder(decoder: nn.Module, config: StageConfig, dropout: float) -> nn.Module:
    """Dropout as the stage wants it (on for the teacher only) and activation checkpointing if asked."""
    set_dropout(decoder, dropout)
    set_gradient_checkpointing(decoder, config.model.gradient_checkpointing)
    return decoder


def set_dropout(module: nn.Module, p: float) -> None:
    """Every dropout of a decoder to `p`: nn.Dropout modules and the attention probability that
    attention implementations read from a float attribute."""
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = p
        if isinstance(getattr(sub, "attention_dropout", None), float):
            sub.attention_dropout = p
    config = getattr(module, "config", None)
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout"):
        if config is not None and hasattr(config, key):
            setattr(config, key, p)
