"""Continuous thoughts (Coconut): the last hidden state at a thought's preceding position, after the
final norm, becomes the thought's input embedding, thought after thought, without detaching.

`thought_forward` runs a batch whose rows hold `<latent>` placeholder tokens, as the Coconut reference
does (coconut.py:39-193): one pass over the columns before the first thought, then one pass per thought
(the one column whose embedding the previous pass decided), then the rest, with a KV cache so no column
is computed twice; passes = thoughts + 1. The logits of all passes together equal those of a single
forward whose input embeddings are set to the fed-back states (checked in tests/test_coconut.py).
The reference's collator left-pads rows so that every first thought sits in one column, which makes
the calls as few as the most thoughts of a row; rows with fewer hold ordinary tokens in the later
thought columns.

Activation checkpointing drops the KV cache in training (transformers runs checkpointed blocks without
one), so there each pass recomputes the prefix instead: the same logits up to float round-off, at the
cost of the prefix recomputed per thought.

Model code: plain PyTorch and transformers, whatever wraps the decoder (a DeepSpeed engine is called
like the decoder; `module` is the decoder inside it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from icot.models.decoder import unwrap


@dataclass
class ThoughtOutput:
    logits: torch.Tensor          # [B, T, V]: next-token logits at every column
    inputs_embeds: torch.Tensor   # [B, T, H]: the input embeddings with every thought filled in
    cache: object | None          # the KV cache through column T - 1 (None without one)
    hidden_states: tuple | None = None   # with `hidden_states`: the last call's, per layer (embeddings first)
    hidden_start: int = 0                # the column of the last call's first hidden state


def checkpointing_in_training(decoder: nn.Module) -> bool:
    active = getattr(decoder, "is_activation_checkpointing", None)
    if active is None:
        active = getattr(decoder, "is_gradient_checkpointing", False)
    return bool(active) and decoder.training


def thought_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor, latent_id: int, passes: int | None = None,
                    use_cache: bool | None = None, feedback: nn.Module | None = None,
                    later_mask: torch.Tensor | None = None, hidden_states: bool = False,
                    cache=None) -> ThoughtOutput:
    """Logits of a batch whose `<latent>` tokens are continuous thoughts (see the module docstring).

    The decoder runs over the columns before the first thought, then one column per call up to the last
    thought column, then the rest; after a call that ends just before a thought, that thought's embedding
    becomes the last hidden state of the call's last column. `passes` asks for at least that many
    one-column calls (ranks whose batches hold fewer thoughts still call the decoder as often as the
    others); `use_cache=None`: a KV cache unless activation checkpointing is training the decoder.
    `feedback` maps a fed-back state to the thought's embedding (CODI's projection; None: the state
    itself, as Coconut). `later_mask` replaces `attention_mask` in every call after the first (CODI's
    reference masking: the prefix pass masks its padding, later passes attend to it); it needs the
    cache. `hidden_states`: also return the last call's hidden states of every layer. `cache`: the KV
    cache to fill (e.g. a static one, for compiled decoding after it); a new dynamic one by default."""
    from transformers import DynamicCache

    decoder = unwrap(model)
    if use_cache is None:
        use_cache = not checkpointing_in_training(decoder)
    if later_mask is not None and not use_cache:
        raise ValueError("later_mask needs the KV cache: without it every call recomputes the prefix")
    width = input_ids.size(1)
    latent = input_ids == latent_id
    columns = latent.nonzero()[:, 1]
    first, span = (int(columns.min()), int(columns.max() - columns.min()) + 1) if columns.numel() else (width, 0)
    passes = max(span, passes or 0)
    if passes:
        first = min(first, width - passes)
        if first < 1:
            raise ValueError(f"{passes} thought passes need a column before the first thought in a batch "
                             f"{width} columns wide")
    inputs_embeds = decoder.get_input_embeddings()(input_ids)
    if cache is not None and not use_cache:
        raise ValueError("a cache was given to a forward without one")
    if use_cache and cache is None:
        cache = DynamicCache(config=decoder.config)
    logits = []
    start, end = 0, (first if passes else width)
    for call in range(passes + 1):
        begin = start if use_cache else 0
        last_call = call == passes
        mask = attention_mask if call == 0 or later_mask is None else later_mask
        output = model(inputs_embeds=inputs_embeds[:, begin:end], attention_mask=mask[:, :end],
                       position_ids=position_ids[:, begin:end], cache=cache, use_cache=use_cache,
                       output_hidden_states=hidden_states or not last_call)
        if use_cache or last_call:
            logits.append(output.logits)
        if last_call:
            last = (output.hidden_states, begin) if hidden_states else (None, 0)
            break
        # Column `end`'s embedding: the last hidden state of column end - 1 (after the final norm) in the
        # rows with a thought there. Out of place (autograd holds the earlier embeddings), and through
        # `where` even where no row has one, so that every call is in the graph: under ZeRO-3 every
        # rank's backward then gathers the same parameters, whatever its batch holds.
        state = output.hidden_states[-1][:, -1]
        state = (state if feedback is None else feedback(state)).to(inputs_embeds.dtype)
        column = torch.where(latent[:, end, None], state, inputs_embeds[:, end])
        inputs_embeds = torch.cat((inputs_embeds[:, :end], column[:, None], inputs_embeds[:, end + 1:]), dim=1)
        start, end = end, (end + 1 if call + 1 < passes else width)
    return ThoughtOutput(torch.cat(logits, dim=1), inputs_embeds, cache, *last)


def grown(decoder: nn.Module, size: int) -> nn.Module:
    """The decoder with at least `size` token rows (transformers' resize: the new rows are the mean of the
    old plus noise with their covariance). Run inside the ZeRO-3 load scope, transformers resizes the
    partitioned tables itself."""
    if decoder.get_input_embeddings().weight.shape[0] < size:
        decoder.resize_token_embeddings(size)
    return decoder


def token_tables(decoder: nn.Module) -> list[nn.Module]:
    """The input embedding and, where it is not tied to it, the output projection."""
    embedding, output = decoder.get_input_embeddings(), decoder.get_output_embeddings()
    return [embedding] if output is None or output.weight is embedding.weight else [embedding, output]


def copy_token_rows(decoder: nn.Module, new_ids: list[int], source_id: int) -> None:
    """The rows of `new_ids` in every token table set to `source_id`'s (the Coconut reference's intent,
    run.py:145-157, there for the input embedding and lm_head)."""
    with torch.no_grad():
        for table in token_tables(decoder):
            for token in new_ids:
                table.weight[token] = table.weight[source_id]
