"""The contract between a stage and the one training loop, and what every stage shares.

A stage names its models (which one is trained, which are frozen), its loss, how it generates for
validation accuracy and what it exports. Its name, the views its batches hold and the earlier stages
it reads come from its declaration in the registry (`icot.registry.StageSpec`). The loop does
everything else. A stage that changes what it trains on as training goes (a curriculum) overrides
`on_step` and keeps its schedule's state in `state_dict`, which every checkpoint carries.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from icot import registry
from icot.config import Paths, StageConfig
from icot.data.collate import IGNORE_INDEX, collate_generate, collate_train, to_device, view_ids
from icot.errors import UserError
from icot.exports import select_export
from icot.models.decoder import decoder_config, load_decoder, set_gradient_checkpointing, unwrap
from icot.models.io import save_component

DONE_MARKER = "DONE"
PREEMPTED_MARKER = "PREEMPTED"


@dataclass(frozen=True)
class StepContext:
    """What the step hook knows about the optimizer step about to run (the same on every rank)."""

    step: int                  # optimizer steps done before this one
    epoch: int                 # 0-based
    steps_per_epoch: int
    batch: np.ndarray          # the training-set indices of the whole (global) batch of this step
    total_steps: int = 0       # optimizer steps of the whole run


@dataclass
class StepUpdate:
    """What the step hook asks of the loop: scalars to log beside the loss, whether to start the
    optimizer afresh (its moments and step count cleared) before this step, and a factor on the
    learning rate train.schedule gives this step (a curriculum's own decay, `icot.curriculum`)."""

    scalars: dict[str, float] = field(default_factory=dict)
    reset_optimizer: bool = False
    lr_scale: float = 1.0


def lm_metrics(output, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss plus the counts behind token accuracy (greedy prediction of each labelled next token)."""
    predicted = output.logits[:, :-1].argmax(dim=-1)
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    return {"loss": output.loss,
            "correct_tokens": (predicted.eq(targets) & labelled).sum(),
            "label_tokens": labelled.sum()}


def shifted_lm_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token-mean cross-entropy of the shifted logits, and the counts behind token accuracy."""
    shifted, targets = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
    labelled = targets != IGNORE_INDEX
    return {"loss": loss, "correct_tokens": (shifted.argmax(dim=-1).eq(targets) & labelled).sum(),
            "label_tokens": labelled.sum()}


class Stage(ABC):
    generation_target: str | None = None  # "cot" or "nocot": the view whose continuation validation decodes
    curriculum_scalar: str | None = None  # the step hook's scalar that says how far its curriculum is (plots)
    row_keys: tuple[str, ...] = ()        # the keys that lengthen its rows beyond its views (`longest_row`)
    uses_steps = False   # replaces or drops whole CoT steps (data.steps): checked against the data at set-up

    def __init__(self, config: StageConfig, strategy, tokenizer):
        self.config = config
        self.spec = registry.get_stage(config.stage)
        self.strategy = strategy
        self.tokenizer = tokenizer
        self.separator_id = tokenizer.eos_token_id
        self._model_flops: dict[int, object] = {}   # id(module) -> icot.flops.ModelFlops (see `model_flops`)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def views(self) -> tuple[str, ...]:
        return self.spec.views

    # -- set up ----------------------------------------------------------------------------------
    def inputs(self) -> dict[str, Path]:
        """The earlier stage folders this stage reads, by role (recorded in the manifest)."""
        return input_folders(self.config)

    def input_export(self, role: str) -> Path:
        """The export folder of input `role` that `inputs.<role>.export` picks."""
        return input_exports(self.config)[role][0]

    @abstractmethod
    def build(self) -> nn.Module:
        """Create the trained module (and prepare frozen ones through the strategy)."""

    def prepare_train_set(self, train_set):
        """Called once the model is built; may precompute what training needs per example."""
        return train_set

    def longest_row(self, feature: dict) -> tuple[int, str]:
        """(the most tokens of any sequence this stage builds from `feature`, in training or validation and
        at every point of its curriculum, before decoding adds to it; what that sequence is). By default
        its views, which `fit_splits` already fits; a stage that adds tokens (thoughts) overrides it and
        names the keys that add them in `row_keys`."""
        return max(len(view_ids(feature, view)) for view in self.views), "its longest view"

    def check_decoder(self, decoder: nn.Module) -> None:
        """Refuse a decoder whose structure the stage's options do not fit (LoRA targets it lacks, positions
        it cannot shift), with the key: called by `build` and, on a decoder built on the meta device from
        the config, before a pipeline trains its first stage (`icot.preflight`)."""

    def check_data(self, train_set, valid_set, limit: int | None, log) -> None:
        """Refuse settings that pass the config's checks but do not fit the tokenized splits (fitted to the
        model's `limit` positions): the rule that splits steps, the rows the stage builds. Called at the
        stage's set-up and by `icot.preflight`; `log` prints a line."""
        if self.uses_steps:
            check_steps(self.config, train_set, log)
        check_rows_fit(self, limit, {"train": train_set, "valid": valid_set})

    @classmethod
    def roles_read(cls, config: StageConfig) -> tuple[str, ...]:
        """The declared inputs (`reads`) this config actually reads (a stage may start without one)."""
        return tuple(registry.get_stage(config.stage).reads)

    @classmethod
    def work_per_step(cls, config: StageConfig, tokens: dict[str, float]) -> float:
        """Tokens through the decoders per optimizer step (a training pass counts three forwards), from
        the mean tokens of each view; the pipeline's time estimate weighs stages by it."""
        return config.train.batch_size * 3 * sum(tokens[view] for view in registry.get_stage(config.stage).views)

    # -- train -----------------------------------------------------------------------------------
    def on_step(self, context: StepContext) -> StepUpdate:
        """Called before every optimizer step on every rank. A schedule that changes the training data
        lives here (its state in `state_dict`); training examples reach `collate` with their
        training-set `index`, so the schedule can decide per example."""
        return StepUpdate()

    def after_step(self, record: dict[str, float]) -> None:
        """Called after every optimizer step on every rank with its all-reduced record (loss, token
        accuracy, ...), the same on every rank: a schedule that paces itself by the loss reads it here
        (into its state, so that a resumed run decides as the uninterrupted one)."""

    def state_dict(self) -> dict:
        """The schedule's state, saved in every checkpoint (identical on every rank)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned, on resume."""

    def trained_tokens(self, batch: dict) -> tuple[int, int]:
        """(non-padding tokens, sum of squared row lengths) the trained model reads in a collated batch, for
        tokens/s and MFU (`icot.flops`): every part with an attention mask, unless `trained_views` names
        the views the trained model reads (the rest feed a frozen model)."""
        from icot.flops import row_lengths

        views = getattr(self, "trained_views", None)
        return row_lengths(batch if views is None else {view: batch[view] for view in views})

    def batch_flops(self, model: nn.Module, batch: dict) -> float:
        """Forward + backward model FLOPs of one collated batch (`icot.flops`): every trained decoder of
        `model` over the tokens `trained_tokens` counts. A stage whose decoders read different rows says
        which reads what."""
        return self.model_flops(unwrap(model)).step_flops(*self.trained_tokens(batch))

    def model_flops(self, module: nn.Module):
        """`icot.flops.ModelFlops` of a module's trained decoders, counted once per module (every step
        reads it; counting walks the module)."""
        from icot.flops import ModelFlops

        if id(module) not in self._model_flops:
            self._model_flops[id(module)] = ModelFlops.of_model(module)
        return self._model_flops[id(module)]

    def collate_view(self, features: Sequence[dict], view: str) -> dict[str, torch.Tensor]:
        """The right-padded batch of one view, on the strategy's device."""
        return to_device(collate_train(features, view, self.separator_id), self.strategy.device)

    def collate(self, features: Sequence[dict]) -> dict:
        """One batch per view (`collate_view`), plus `rows` (training-set indices) where the examples
        carry a `row` column."""
        batch = {view: self.collate_view(features, view) for view in self.views}
        if features and "row" in features[0]:
            batch["rows"] = torch.tensor([int(f["row"]) for f in features])
        return batch

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """{'loss': scalar, ...other scalars to log}; token counts for token accuracy if any."""

    # -- validate --------------------------------------------------------------------------------
    def validation_settings(self) -> dict[str, object]:
        """suffix -> context manager: the validation loss and token accuracy are measured under each
        (e.g. `_all_removed` for a curriculum: the metric then reads `loss_all_removed`)."""
        return {"": nullcontext()}

    def selection_score(self, validation: dict[str, float]) -> float | None:
        """How good an export validated this way is, for `best` (higher is better); None: not eligible."""
        if "accuracy" in validation:
            return validation["accuracy"]
        return -validation["loss"] if "loss" in validation else None

    def generate(self, model: nn.Module, features: Sequence[dict], synced: bool) -> list[list[int]] | None:
        """Generated ids per example for validation accuracy; None where the stage has no decoding."""
        return None

    def generation_batch(self, features: Sequence[dict]) -> tuple[dict[str, torch.Tensor], int]:
        """A left-padded prompt batch and a length cap: the longest reference continuation + 4."""
        longest = max(len(view_ids(f, self.generation_target)) - int(f["prompt_len"]) for f in features)
        return to_device(collate_generate(features, self.separator_id), self.strategy.device), longest + 4

    # -- finish ----------------------------------------------------------------------------------
    def export(self, model: nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        """Write the trained component(s) and the tokenizer into `folder` (on rank 0, from a full state
        dict), as `transformers` and `icot.models.io.load_component` load them."""
        save_component(unwrap(model), folder, state_dict=state_dict, extra=self.export_extra())
        self.tokenizer.save_pretrained(folder)

    def export_extra(self) -> dict:
        return {"stage": self.name}


# --------------------------------------------------------------------------------------------------
# Earlier stages: folders and exports.


def stage_folder(config: StageConfig, role: str) -> Path:
    """The folder of the completed earlier stage read as `role` (`inputs.<role>.dir`, else its folder in
    run_dir)."""
    source = registry.get_stage(config.stage).reads[role]
    override = config.inputs.__dict__[role].dir
    folder = Path(override) if override else Paths.for_stage(config.run_dir, source).root
    if not (folder / DONE_MARKER).exists():
        raise UserError(f"stage {config.stage!r} needs a completed {source!r} stage ({role}), but {folder} has "
                        f"no {DONE_MARKER} marker: run `icot train {source}` first or set --inputs.{role}.dir")
    return folder


def input_folders(config: StageConfig) -> dict[str, Path]:
    """Every earlier stage folder this config's stage reads, by role."""
    roles = registry.get_stage(config.stage).load().roles_read(config)
    return {role: stage_folder(config, role) for role in roles}


def input_exports(config: StageConfig) -> dict[str, tuple[Path, dict]]:
    """role -> (the export folder `inputs.<role>.export` picks, its entry in the stage's exports.json)."""
    return {role: select_export(folder, config.inputs.__dict__[role].export, f"inputs.{role}.export")
            for role, folder in input_folders(config).items()}


def check_input_tokenizers(tokenizer, exports: dict[str, tuple[Path, dict]]) -> None:
    """Every earlier export this stage reads must have been trained with this stage's tokenizer: the
    same shape (vocabulary size) with other ids would train on the wrong tokens without a word."""
    from icot.data.tokenizer_build import load_tokenizer
    from icot.data.views import describe_tokenizer, tokenizer_definition

    mine = tokenizer_definition(tokenizer)
    for role, (folder, _) in exports.items():
        if not (folder / "tokenizer_config.json").is_file():
            continue   # a plain pretrained folder without a tokenizer
        theirs = load_tokenizer(folder, f"inputs.{role}")
        if tokenizer_definition(theirs) != mine:
            raise UserError(f"inputs.{role}: {folder} was trained with another tokenizer "
                            f"({describe_tokenizer(theirs)}) than this stage's ({describe_tokenizer(tokenizer)}): "
                            f"their token ids differ; point model.tokenizer at the one it was trained with")


# --------------------------------------------------------------------------------------------------
# Tokenizer, data, decoders.


def stage_tokenizer(config: StageConfig):
    """The tokenizer named by model.tokenizer, else model.name_or_path, else the export of the first
    earlier stage."""
    from icot.data.tokenizer_build import load_tokenizer

    if config.model.tokenizer:
        return load_tokenizer(config.model.tokenizer, "model.tokenizer")
    if config.model.name_or_path:
        return load_tokenizer(config.model.name_or_path, "model.name_or_path")
    exports = input_exports(config)
    if exports:
        role, (folder, _) = next(iter(exports.items()))
        return load_tokenizer(folder, f"the {role} export")
    raise UserError("model.tokenizer: no tokenizer given (a local folder; `icot tokenizer build` makes one)")


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
    tokenized = tokenize_dataset(examples, tokenizer, num_proc=config.data.num_proc, max_length=config.data.max_length,
                                 cache_dir=config.data.cache_dir, on_overlength=config.data.overlength,
                                 on_unknown="drop" if config.data.skip_bad_lines else "error", source=path,
                                 step_rule=config.data.steps)
    if len(tokenized) == 0:
        raise UserError(f"{path}: no example left after tokenization (data.max_length={config.data.max_length})")
    return tokenized


def fit_splits(config: StageConfig, limit: int | None, *splits):
    """Each tokenized split (train, valid, ...) limited to the examples that fit the model's positions,
    as data.overlength says."""
    from icot.data.views import fit_to_positions

    names = ("train", "valid")
    fitted = [fit_to_positions(split, limit, config.data.overlength, getattr(config.data, name))
              for name, split in zip(names, splits)]
    if fitted and fitted[0] is not None and len(fitted[0]) == 0:
        raise UserError(f"{config.data.train}: no example fits the model's {limit} positions")
    return fitted


def check_rows_fit(stage: Stage, limit: int | None, splits: dict[str, object]) -> None:
    """Every sequence `stage` will build from the (fitted) splits, by name, fits the model's `limit`
    positions: a curriculum whose later stage outgrows them stops here, before the stage folder is
    written, rather than at that stage (and again at every resume)."""
    from icot.data.reader import DataFormatError

    if limit is None or not stage.row_keys:
        return
    for name, split in splits.items():
        if split is None:
            continue
        for feature in split:
            length, what = stage.longest_row(feature)
            if length > limit:
                raise DataFormatError(getattr(stage.config.data, name), feature.get("line"),
                                      f"{what} has {length} tokens, more than the model's {limit} positions: "
                                      f"lower {' or '.join(stage.row_keys)}, or raise model.max_positions")


def check_steps(config: StageConfig, train_set, log) -> None:
    """For a stage that replaces or drops whole CoT steps: `data.steps` must fit the training CoTs (the first
    thousand examples of local data are read) and find a step in most examples; the step counts are logged."""
    from icot.data.reader import iter_examples
    from icot.data.steps import describe_counts, rule_problem
    from icot.data.views import list_lengths

    path, rule = config.data.train, config.data.steps
    if path and Path(path).exists() and rule != "auto":
        cots = []
        for _, example in iter_examples(path, skip_bad=True):
            cots.append(example.cot)
            if len(cots) == 1000:
                break
        problem = rule_problem(cots, rule)
        if problem:
            raise UserError(f"data.steps: {rule} does not fit {path}: {problem}")
    counts = list_lengths(train_set, "step_starts").tolist()
    log(f"data.steps {rule}: {describe_counts(counts)}")
    empty = counts.count(0)
    if 2 * empty > len(counts):
        raise UserError(f"{path}: {empty} of {len(counts)} training CoTs have no step under data.steps {rule}: the "
                        f"stage {config.stage} would replace nothing (are the CoTs empty?)")


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
            intermediate=model.intermediate, eos_token_id=tokenizer.eos_token_id, activation=model.activation))
    return prepare_decoder(decoder, config, dropout)


def start_decoder(stage: Stage, from_export: bool, dropout: float, beside: nn.Module | None = None) -> nn.Module:
    """The decoder a method begins with, with at least a row per token of the stage's tokenizer (which
    may have gained the method's own tokens): the `start` input's export (the shared teacher's), else
    model.name_or_path, else one built from scratch.

    With `beside`, a second decoder trained beside that module (SIM-CoT's step decoder): its tables as
    loaded (it never reads or writes the method's tokens), loaded outside ZeRO-3's load scope and cast to
    the dtype of `beside`'s trained parameters, since one ZeRO-3 optimizer holds one dtype and the engine
    partitions a module loaded outside the scope without casting it."""
    from icot.models.io import load_component
    from icot.models.thoughts import grown

    size, model = (len(stage.tokenizer) if beside is None else 0), stage.config.model
    load = stage.strategy.load_pretrained if beside is None else (lambda loader: loader())
    if from_export or model.name_or_path:
        folder = stage.input_export("start") if from_export else None
        source = (lambda: load_component(folder, expect="decoder")) if from_export else (
            lambda: load_decoder(model.name_or_path))
        decoder = prepare_decoder(load(lambda: grown(source(), size)), stage.config, dropout)
    else:
        decoder = fresh_decoder(stage.config, stage.tokenizer, dropout=dropout, strategy=stage.strategy)
    if beside is not None:
        decoder.to(next(p for p in beside.parameters() if p.requires_grad).dtype)
    return decoder


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
