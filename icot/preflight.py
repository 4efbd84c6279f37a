"""The checks `icot pipeline` (and so `compare` and `demo`) makes before its first stage trains.

Each stage checks its input at its own set-up, before it writes its folder (`icot.train`); in a pipeline
that set-up comes after every earlier stage has trained, so a mistake in the last stage's options would
surface hours late. Here every stage makes, up front, the checks that need no earlier stage's output: its
options against the tokenizer (Coconut's init token) and against the model's structure, built on the meta
device from the config without weights (LoRA targets, kept positions), and against the tokenized data (the
step rule, the rows its curriculum builds, the schedule). The stage repeats them at its set-up.
"""

from __future__ import annotations

from icot import registry
from icot.config import StageConfig


def check_stages(configs: list[StageConfig], log=print) -> None:
    """Every stage's set-up checks that need no earlier stage (UserError naming the key)."""
    for config in configs:
        check_stage(config, log)


def check_stage(config: StageConfig, log=print) -> None:
    from icot.models.decoder import position_limit
    from icot.stage import Stage, fit_splits, load_split

    cls = registry.get_stage(config.stage).load()
    tokenizer = preflight_tokenizer(config)
    if tokenizer is None:   # it comes from an earlier stage's export, which does not exist yet
        return
    stage = cls(config, None, tokenizer)   # options against the tokenizer (and each other)
    decoder = meta_decoder(config, len(tokenizer))
    stage.check_decoder(decoder)
    if not (stage.row_keys or stage.uses_steps or type(stage).check_data is not Stage.check_data):
        return
    limit = position_limit(decoder)
    train_set = load_split(config, tokenizer, "train")
    if train_set is None:
        return
    train_set, valid_set = fit_splits(config, limit, train_set, load_split(config, tokenizer, "valid"))
    stage.check_data(train_set, valid_set, limit, lambda line: log(f"[icot pipeline] {config.stage}: {line}"))


def preflight_tokenizer(config: StageConfig):
    """The stage's tokenizer where the config names it (model.tokenizer, model.name_or_path); None where it
    would be an earlier stage's export."""
    from icot.data.tokenizer_build import load_tokenizer

    if config.model.tokenizer:
        return load_tokenizer(config.model.tokenizer, "model.tokenizer")
    if config.model.name_or_path:
        return load_tokenizer(config.model.name_or_path, "model.name_or_path")
    return None


def meta_decoder(config: StageConfig, vocab_size: int):
    """The decoder the config describes (model.name_or_path's config, else the model section), on the meta
    device: its modules and shapes, no weights. A stage that starts from the teacher's export has the same
    structure (the teacher is built from the same model section)."""
    import torch
    from transformers import AutoConfig

    from icot.models.decoder import build_decoder, decoder_config

    model = config.model
    if model.name_or_path:
        hf_config = AutoConfig.from_pretrained(model.name_or_path, local_files_only=True)
    else:
        hf_config = decoder_config(model.family, vocab_size=vocab_size, layers=model.layers, hidden=model.hidden,
                                   heads=model.heads, max_positions=model.max_positions, kv_heads=model.kv_heads,
                                   intermediate=model.intermediate, activation=model.activation)
    with torch.device("meta"):
        return build_decoder(hf_config)
