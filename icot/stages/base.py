"""The contract between a stage and the one training loop.

A stage names its models (which one is trained, which are frozen), the views its batches need, its
loss, how it generates for validation accuracy, and what it exports. The loop does everything else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from icot.config import StageConfig
from icot.data.collate import collate_generate, collate_train, to_device
from icot.models.io import save_component
from icot.stages.common import input_folders


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DeepSpeed engine (or the module itself)."""
    return getattr(model, "module", model)


def lm_metrics(output, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss plus the counts behind token accuracy (greedy prediction of each labelled next token)."""
    predicted = output.logits[:, :-1].argmax(dim=-1)
    targets = labels[:, 1:]
    labelled = targets != -100
    return {"loss": output.loss,
            "correct_tokens": (predicted.eq(targets) & labelled).sum(),
            "label_tokens": labelled.sum()}


class Stage(ABC):
    name: str = ""
    views: tuple[str, ...] = ()          # views each training batch holds
    generation_target: str | None = None  # "cot" or "nocot": the view whose continuation is generated

    def __init__(self, config: StageConfig, strategy, tokenizer):
        self.config = config
        self.strategy = strategy
        self.tokenizer = tokenizer
        self.separator_id = tokenizer.eos_token_id

    # -- set up ----------------------------------------------------------------------------------
    def inputs(self) -> dict[str, Path]:
        """Earlier stage folders this stage reads (recorded in the manifest)."""
        return input_folders(self.config)

    @abstractmethod
    def build(self) -> nn.Module:
        """Create the trained module (and prepare frozen ones through the strategy)."""

    def prepare_train_set(self, train_set):
        """Called once the model is built; may precompute what training needs per example."""
        return train_set

    # -- train -----------------------------------------------------------------------------------
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
    def generate(self, model: nn.Module, features: Sequence[dict], synced: bool) -> list[list[int]] | None:
        """Generated ids per example for validation accuracy; None where the stage has no decoding."""
        return None

    def generation_batch(self, features: Sequence[dict]) -> tuple[dict[str, torch.Tensor], int]:
        """A left-padded prompt batch and a length cap: the longest reference continuation + 4."""
        longest = max(len(f[f"{self.generation_target}_ids"]) - int(f["prompt_len"]) for f in features)
        return to_device(collate_generate(features, self.separator_id), self.strategy.device), longest + 4

    # -- finish ----------------------------------------------------------------------------------
    def export(self, model: nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        """Write the trained component(s) into `folder` (on rank 0, from a full state dict)."""
        save_component(unwrap(model), folder, state_dict=state_dict, extra=self.export_extra())

    def export_extra(self) -> dict:
        return {"stage": self.name}
