"""SIM-CoT (supervised implicit chain of thought; Wei et al. 2025, arXiv 2509.20317): a training-only
plug-in over a latent method. An auxiliary decoder reads each continuous thought and must write out the
explicit CoT step it replaces; its loss, weighted, joins the method's and reaches the method's model
through the thoughts. The decoder is dropped from the export: inference is the method's, unchanged.

This folder holds what the two SIM-CoT methods share and registers no method itself: `coconut_simcot`
(icot/methods/coconut_simcot/) and `codi_simcot` (icot/methods/codi_simcot/) each declare one, read their
base method's section (`coconut:`, `codi:`) beside their own and serve a mode of their own. The rules are
the reference's (InternLM/SIM-CoT; METHODS.md section 4); where its two forks differ, each method's
defaults follow its fork.

Two facts of the reference decided here (METHODS.md 4.6.1-2): its released Coconut training never computes
the step loss (run.py builds its training set without the step targets), and its CODI fork cuts every
row's target to the length of the first row's. icot computes the step loss, as the paper describes, with
targets padded per row; `codi_simcot.truncate_to_first_row` reproduces the CODI fork's cut, to match its
checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from icot.config import dropout_probability, option


def reduction_option(default: str):
    """`reduction`, with each fork's default (the Coconut fork: row; the CODI fork: token)."""
    return option(default, help="each thought slot's loss: row (the step's token cross-entropies summed, averaged "
                                "over the rows: the Coconut fork's) or token (the mean over the slot's tokens: the "
                                "CODI fork's); the step loss is the mean over the slots that hold a target")


@dataclass
class StepSupervisionConfig:
    """The options both SIM-CoT methods have (each method's section sets its fork's defaults)."""

    weight: float = option(1.0, minimum=0.0, resumable=True,
                           help="weight of the step loss beside the method's own (the Coconut fork hard-codes "
                                "1.0; the CODI fork's explain_loss_factor, 1.0 in every script)")
    decoder_start: Literal["base", "start"] = option(
        "base", help="the auxiliary decoder's weights: base (model.name_or_path, pretrained and not resized, as "
                     "both forks load it; a decoder from scratch of the model section's shape without one) or "
                     "start (the weights the method starts from, e.g. the shared teacher's export)")
    decoder_dropout: float = option(0.0, minimum=0.0, check=dropout_probability, help="the auxiliary decoder's dropout")
    reduction: Literal["row", "token"] = reduction_option("row")
