"""The frozen teacher's diagonal states for the stages that read the teacher.

By default they are computed on the fly for every batch, as in the paper. With
`icot_kd.teacher_state_cache: true` they are computed once over the training set and stored beside the
teacher (`<teacher>/state_cache/<key>.pt`, key = the tokenized data, the delta and the teacher), so the
two stages that read them share one pass of the teacher and each step runs the trained model only.
Validation batches are always computed on the fly.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from icot.data.collate import examples_at, rank_batches
from icot.errors import UserError
from icot.models.decoder import decoder_shape
from icot.models.io import load_component
from icot.models.teacher_states import diagonal_positions, teacher_states
from icot.stage import fresh_decoder, prepare_decoder, unwrap

CACHE_FOLDER = "state_cache"


class TeacherSource:
    """Loads the frozen teacher of `stage` and hands out its states per batch."""

    def __init__(self, stage):
        self.stage = stage
        self.strategy = stage.strategy
        self.folder = stage.inputs()["teacher"]
        self.export = stage.input_export("teacher")
        self.delta = stage.config.icot_kd.delta
        teacher = self.strategy.load_pretrained(lambda: load_component(self.export, expect="decoder"),
                                                self.strategy.frozen_ds_config)
        self.num_layers, self.hidden_size = decoder_shape(teacher)
        self.model = teacher      # the plain module until `prepare` wraps it
        self.cache: torch.Tensor | None = None

    def trained_decoder(self):
        """The decoder the stage trains beside the teacher: a copy of the teacher's weights
        (`icot_kd.init_from_teacher`) or a fresh one; dropout off."""
        config = self.stage.config
        if config.icot_kd.init_from_teacher:
            decoder = self.strategy.load_pretrained(lambda: load_component(self.export, expect="decoder"))
            return prepare_decoder(decoder, config, dropout=0.0)
        return fresh_decoder(config, self.stage.tokenizer, dropout=0.0, strategy=self.strategy)

    @staticmethod
    def work_per_step(config) -> float:
        """Tokens the teacher reads per example and step (a forward over the with-CoT view), 0 with the
        cache; in the units of `Stage.work_per_step`."""
        return 0.0 if config.icot_kd.teacher_state_cache else 1.0

    def prepare(self) -> None:
        """Wrap the teacher as a frozen engine (after shape checks against the trained model)."""
        self.model = self.strategy.prepare_frozen(self.model)

    def compute(self, cot: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, L, H] states, [B, L] positions) of a with-CoT batch, from the teacher."""
        return teacher_states(unwrap(self.model), cot["input_ids"], cot["attention_mask"], cot["first_sep"],
                              cot["second_sep"], self.delta, return_positions=True)

    def for_batch(self, cot: dict, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """States and positions for a batch; from the cache when `rows` (training-set indices) are given."""
        if rows is None or self.cache is None:
            return self.compute(cot)
        positions = diagonal_positions(cot["first_sep"], cot["second_sep"], self.num_layers, self.delta)
        return self.cache[rows].to(cot["input_ids"].device), positions

    # -- the cache -------------------------------------------------------------------------------
    def attach_cache(self, train_set):
        """With `method.teacher_state_cache`, the cache for `train_set` and the set with a `row`
        column (so batches carry their indices into the cache); else `train_set` unchanged."""
        if not self.stage.config.icot_kd.teacher_state_cache:
            return train_set
        # Forward only, no activations kept: batches four times the training micro batch run at a fraction
        # of the per-example cost of small ones.
        self.build_cache(train_set, 4 * self.strategy.micro_batch_size)
        return train_set.add_column("row", list(range(len(train_set))))

    def cache_path(self, train_set) -> Path:
        manifest = self.folder / "manifest.json"
        identity = {"data": getattr(train_set, "_fingerprint", None), "examples": len(train_set),
                    "delta": self.delta, "teacher": str(self.export.resolve()),
                    "teacher_manifest": manifest.read_text() if manifest.exists() else None}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        return self.folder / CACHE_FOLDER / f"{key}.pt"

    def build_cache(self, train_set, batch_size: int) -> None:
        """Load the cache for `train_set`, computing it first if absent: each rank computes every
        world-size-th example, rank 0 merges the shards."""
        path = self.cache_path(train_set)
        strategy = self.strategy
        if not path.exists():
            started = time.time()
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self._compute_shard(train_set, batch_size), self._shard_path(path, strategy.rank))
            strategy.barrier()
            if strategy.is_main:
                self._merge_shards(path, len(train_set))
                strategy.log(f"teacher-state cache: {len(train_set)} examples x {self.num_layers} layers in "
                             f"{time.time() - started:.0f}s -> {path}")
            strategy.barrier()
        try:
            self.cache = torch.load(path, mmap=True, weights_only=True)
        except Exception as err:   # torch refuses anything but tensors (a planted pickle included)
            raise UserError(f"{path}: not a teacher-state cache icot wrote ({type(err).__name__}); delete it "
                            f"and rerun to compute it again") from None
        if self.cache.size(0) != len(train_set):
            raise RuntimeError(f"{path}: {self.cache.size(0)} cached rows for {len(train_set)} examples")

    def _shard_path(self, path: Path, rank: int) -> Path:
        return path.with_name(f"{path.stem}.rank{rank}-of-{self.strategy.world_size}.pt")

    @torch.no_grad()
    def _compute_shard(self, train_set, batch_size: int) -> torch.Tensor:
        """States of this rank's examples (rank, rank + world, ...). Every rank runs the same number of
        teacher passes, as ZeRO-3 needs: a rank with no rows left runs one that is discarded."""
        chunks = []
        for rows in rank_batches(len(train_set), batch_size, self.strategy.rank, self.strategy.world_size):
            states, _ = self.compute(self.stage.collate_view(examples_at(train_set, rows or [0]), "cot"))
            if rows:
                chunks.append(states.cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, self.num_layers, self.hidden_size)

    def _merge_shards(self, path: Path, num_examples: int) -> None:
        """Interleave the ranks' shards into `path`, written under a temporary name and renamed so a
        half-written cache never carries the final name."""
        world = self.strategy.world_size
        merged = None
        for rank in range(world):
            shard = torch.load(self._shard_path(path, rank), weights_only=True)
            if merged is None:
                merged = torch.empty((num_examples, *shard.shape[1:]), dtype=shard.dtype)
            merged[rank::world] = shard
        partial = path.with_suffix(".partial")
        torch.save(merged, partial)
        os.replace(partial, path)
        for rank in range(world):
            self._shard_path(path, rank).unlink()
