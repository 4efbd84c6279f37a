"""SIM-CoT's auxiliary step decoder (Wei et al. 2025): a second causal LM that reads continuous thoughts as a
prefix and must write out the explicit CoT step each one replaces. Training only: exports and inference
hold the method's own model alone.

`StepSupervised` wraps a latent method's trained module (a Coconut decoder, a CODI model) with the step
decoder, so one engine trains both with one optimizer; the method's code calls and reads the wrapper as
its own module (its forward, config, token tables and projection pass through). `step_decoder_loss` is the
auxiliary loss over a `collate_step_targets` batch (`icot.methods.simcot.targets`).

Model code: plain PyTorch and transformers, whatever wraps the module (a DeepSpeed engine keeps it as
`.module`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from icot.data.collate import IGNORE_INDEX

STEP_DECODER = "step_decoder"   # its parameters' prefix in the trained module's state dict
MODEL = "model"


class StepSupervised(nn.Module):
    def __init__(self, model: nn.Module, step_decoder: nn.Module):
        super().__init__()
        self.model = model
        self.step_decoder = step_decoder

    def forward(self, **kwargs):
        return self.model(**kwargs)

    def __getattr__(self, name: str):
        # Whatever is not the wrapper's own (config, generation_config, get_input_embeddings, projection,
        # is_activation_checkpointing, ...) is the method's module's: its code runs unchanged on the wrapper.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules[MODEL], name)


def without_step_decoder(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The method's module's own entries of a `StepSupervised` state dict, under their own names."""
    prefix = MODEL + "."
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def step_decoder_loss(module: StepSupervised, states: torch.Tensor, steps: dict[str, torch.Tensor],
                      reduction: str) -> torch.Tensor:
    """The step loss of one batch.

    `states` [B, W, H]: the thought vectors of every row (the columns `steps["columns"]` [P, K] name K of
    them per target, in row `steps["rows"]` [P]). Each target row runs through the step decoder as
    `K thought vectors, the step's token embeddings (the method's own input table), terminator, padding`
    with `steps`' mask, positions and labels (the step and its terminator). Per thought slot
    (`steps["slots"]`), the summed token cross-entropy of its rows is divided by its rows (`reduction`
    row: a sum per row, a mean over rows, the Coconut reference's) or by its labelled tokens (token: the
    CODI reference's token mean); the loss is the mean over the slots that hold a target. Nothing is
    detached: the loss reaches the method's module through every thought. A batch without a target (the
    collation then holds one unlabelled row) gives 0, still through one decoder call, so that every rank
    calls the decoder equally often (ZeRO-3 gathers its parameters at each call)."""
    prefixes = states[steps["rows"][:, None], steps["columns"]]                      # [P, K, H]
    tokens = module.get_input_embeddings()(steps["input_ids"])                       # [P, L, H]
    embeds = torch.cat((prefixes.to(tokens.dtype), tokens), dim=1)                   # [P, K + L, H]
    logits = module.step_decoder(inputs_embeds=embeds, attention_mask=steps["attention_mask"],
                                 position_ids=steps["position_ids"]).logits
    targets = steps["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    labelled = (targets != IGNORE_INDEX).sum(dim=1)                                  # [P]
    slots = int(steps["slots"].max()) + 1
    summed = losses.new_zeros(slots).index_add(0, steps["slots"], losses.sum(dim=1))
    count = labelled.float() if reduction == "token" else (labelled > 0).float()
    divisor = losses.new_zeros(slots).index_add(0, steps["slots"], count)
    held = divisor > 0
    if not bool(held.any()):
        return logits.float().sum() * 0.0   # in the graph, so every parameter still gets its (zero) gradient
    return (summed[held] / divisor[held]).mean()
