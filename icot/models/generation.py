"""Greedy decoding, batched with left padding: the modes' loops through Hugging Face `generate`, a
lean loop that calls the model directly (`lean_greedy`), and the decoding after continuous
thoughts of Coconut and CODI (`generate_with_thoughts`; `reference_thought_decode` is the Coconut
reference code's scheme).

- no-CoT: a plain decoder answers after the prompt and stops at the first EOS;
- explicit CoT: the teacher writes the CoT, a separator and the answer: it stops after two EOS;
- implicit CoT: one emulator pass over the prompt, then the student decodes with the states
  injected on the prompt pass only (they persist through the KV cache); it stops at the first EOS.
`synced` keeps every rank stepping until all are done (needed under ZeRO-3, where each forward is a
collective). `decoding` (every function that decodes): `eager`, or `static` / `compiled` for a static KV
cache and a (compiled) one-token step after the same prompt pass (`icot.models.static_decoding`).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from icot.models.coupled import CoupledModel
from icot.errors import UserError
from icot.models.decoder import position_limit, unwrap
from icot.models.static_decoding import check_decoding, greedy_loop, static_greedy


class IgnorePaddingWarning(logging.Filter):
    """`generate` drops an attention mask of all ones (an unpadded batch), after which the model warns
    that the input may be padded because it holds the pad id: every prompt here ends in the separator,
    which is the pad id. The mask was passed; the warning is false."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask`" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(IgnorePaddingWarning())


class StopAfterSeparators(StoppingCriteria):
    """A row is done once it has generated `count` separators."""

    def __init__(self, separator_id: int, count: int, prompt_length: int):
        self.separator_id = separator_id
        self.count = count
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length:]
        return (generated == self.separator_id).sum(dim=1) >= self.count


def truncate_after_separators(new_tokens: torch.Tensor, separator_id: int, count: int) -> list[list[int]]:
    """Each row's generated ids up to and including its `count`-th separator."""
    rows = []
    for row in new_tokens.tolist():
        seen = 0
        for index, token in enumerate(row):
            if token == separator_id:
                seen += 1
                if seen == count:
                    row = row[: index + 1]
                    break
        rows.append(row)
    return rows


def room_after(decoder: nn.Module, last_positions: torch.Tensor) -> int:
    """How many new tokens fit in the decoder's positions after prompts that end at position
    `last_positions[b] - 1` (their lengths, or those plus a position shift); no limit where the decoder
    states none."""
    limit = position_limit(decoder)
    if limit is None:
        return 2**31
    room = limit - int(last_positions.max())
    if room < 1:
        raise UserError(f"a prompt fills the decoder's {limit} positions: nothing can be generated after it "
                        f"(raise model.max_positions)")
    return room


def greedy_decode(decoder: nn.Module, batch: dict[str, torch.Tensor], separator_id: int, separators: int,
                  max_new_tokens: int, synced: bool = False, decoding: str = "eager", prompt_context=None,
                  step_offset: int = 0) -> list[list[int]]:
    """Greedy decoding from a left-padded prompt batch until `separators` new separators per row, or until
    the longest row fills the decoder's positions (a model that never stops must not index past them).
    Static and compiled decoding only: `prompt_context()` wraps the prompt pass, `step_offset` moves every
    new token's position (see `static_greedy`)."""
    prompt_length = batch["input_ids"].size(1)
    max_new_tokens = min(max_new_tokens, room_after(decoder, batch["attention_mask"].sum(dim=1)))
    if check_decoding(decoding, synced) != "eager":
        def prompt_pass(cache):
            with prompt_context() if prompt_context is not None else contextlib.nullcontext():
                output = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"], cache=cache, use_cache=True, logits_to_keep=1)
            return output.logits[:, -1], batch["attention_mask"]

        tokens = static_greedy(decoder, prompt_pass, prompt_length, batch["position_ids"][:, -1], separator_id,
                               separators, max_new_tokens, suppressed_tokens(decoder), synced, decoding == "compiled",
                               step_offset)
        return truncate_after_separators(tokens, separator_id, separators)
    stop = StopAfterSeparators(separator_id, separators, prompt_length)
    output = decoder.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        eos_token_id=None, pad_token_id=separator_id, stopping_criteria=StoppingCriteriaList([stop]),
        synced_gpus=synced)
    return truncate_after_separators(output[:, prompt_length:], separator_id, separators)


@torch.no_grad()
def generate_no_cot(decoder: nn.Module, batch, separator_id: int, max_new_tokens: int, synced: bool = False,
                    decoding: str = "eager"):
    return greedy_decode(decoder, batch, separator_id, 1, max_new_tokens, synced, decoding)


@torch.no_grad()
def generate_explicit(teacher: nn.Module, batch, separator_id: int, max_new_tokens: int, synced: bool = False,
                      decoding: str = "eager", **static_options):
    return greedy_decode(teacher, batch, separator_id, 2, max_new_tokens, synced, decoding, **static_options)


@torch.no_grad()
def generate_implicit(model: CoupledModel, batch, separator_id: int, max_new_tokens: int,
                      synced: bool = False, decoding: str = "eager"):
    states = model.emulator(batch["input_ids"], batch["attention_mask"], batch["first_sep"],
                            position_ids=batch.get("position_ids")).states
    with model.student.injection(states, batch["first_sep"], prompt_pass_only=True):
        return greedy_decode(model.student.decoder, batch, separator_id, 1, max_new_tokens, synced, decoding)


@torch.no_grad()
def lean_greedy(decoder, batch: dict[str, torch.Tensor], new_tokens: int, separator_id: int,
                prefill_context=None) -> torch.Tensor:
    """`new_tokens` greedy tokens per row of a left-padded prompt batch with a KV cache, calling the model
    directly (no `generate` and its per-step overhead). `separator_id` is never emitted (so every row
    runs to `new_tokens`, as `icot bench` needs); `prefill_context` wraps the prompt pass only (e.g. an
    injection of states)."""
    from transformers import DynamicCache

    mask, positions = batch["attention_mask"], batch["position_ids"]
    cache = DynamicCache(config=decoder.config)
    with prefill_context if prefill_context is not None else contextlib.nullcontext():
        out = decoder(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, cache=cache,
                      use_cache=True, logits_to_keep=1)
    tokens = []
    ones = mask.new_ones((mask.size(0), 1))
    for step in range(new_tokens):
        logits = out.logits[:, -1]
        logits[:, separator_id] = float("-inf")
        token = logits.argmax(dim=-1, keepdim=True)
        tokens.append(token)
        if step == new_tokens - 1:
            break
        mask = torch.cat((mask, ones), dim=1)
        positions = positions[:, -1:] + 1
        out = decoder(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return torch.cat(tokens, dim=1)


def all_finished(done: torch.Tensor, synced: bool) -> bool:
    """Whether every row is done, on every rank when `synced` (each forward is then a collective, so no
    rank may stop while another still decodes)."""
    unfinished = torch.tensor(0.0 if bool(done.all()) else 1.0, device=done.device)
    if synced:
        import torch.distributed as dist

        dist.all_reduce(unfinished)
    return unfinished.item() == 0.0


def suppressed_tokens(model) -> list[int]:
    """The ids the decoder's generation config suppresses (`generate` honours them; so do the loops here)."""
    config = getattr(unwrap(model), "generation_config", None)
    return list(getattr(config, "suppress_tokens", None) or [])


@torch.no_grad()
def generate_with_thoughts(model, batch: dict[str, torch.Tensor], latent_id: int, separator_id: int, separators: int,
                           max_new_tokens: int, synced: bool = False, feedback: nn.Module | None = None,
                           suppress: list[int] = (), decoding: str = "eager") -> list[list[int]]:
    """Batched greedy decoding after continuous thoughts (Coconut, CODI), with one KV cache kept from the
    thought passes through the answer. `batch`: left-padded inputs that end with the thoughts and the
    end-of-thought token (`input_ids`, `attention_mask`, `position_ids`, and `later_mask` where the
    passes after the prompt's see another mask: see `thought_forward`, as `feedback`). A row stops after
    `separators` separators; finished rows are fed the separator until all are done, or until the longest
    row fills the decoder's positions. `suppress`: ids never generated, beside those of the decoder's
    generation config."""
    from icot.models.thoughts import thought_forward

    positions = batch["position_ids"]
    max_new_tokens = min(max_new_tokens, room_after(model, positions[:, -1] + 1))
    later = batch.get("later_mask")
    mask = batch["attention_mask"] if later is None else later
    suppress = suppressed_tokens(model) + list(suppress)

    def prompt_pass(cache=None):
        output = thought_forward(model, batch["input_ids"], batch["attention_mask"], positions, latent_id,
                                 use_cache=True, feedback=feedback, later_mask=later, cache=cache)
        return output.logits[:, -1], mask, output.cache

    if check_decoding(decoding, synced) != "eager":
        tokens = static_greedy(unwrap(model), lambda cache: prompt_pass(cache)[:2], positions.size(1), positions[:, -1],
                               separator_id, separators, max_new_tokens, suppress, synced, decoding == "compiled")
        return truncate_after_separators(tokens, separator_id, separators)
    logits, _, cache = prompt_pass()
    ones = mask.new_ones((mask.size(0), max_new_tokens))

    def next_logits(token: torch.Tensor, step: int) -> torch.Tensor:
        step_mask = torch.cat((mask, ones[:, :step + 1]), dim=1)   # the prompt's, then the tokens fed so far
        return model(input_ids=token[:, None], attention_mask=step_mask, position_ids=positions[:, -1:] + step + 1,
                     cache=cache, use_cache=True).logits[:, -1]

    tokens = greedy_loop(logits, next_logits, separator_id, separators, max_new_tokens, suppress, synced)
    return truncate_after_separators(tokens, separator_id, separators)


@torch.no_grad()
def reference_thought_decode(model, input_ids: list[int], latent_id: int, separator_id: int, separators: int,
                             max_new_tokens: int) -> list[int]:
    """The Coconut reference's decoding (coconut.py:201-247), for comparison: one example, the thought
    passes, then every further token from a full forward over all the input embeddings, without a cache."""
    from icot.models.thoughts import thought_forward

    ids = torch.tensor([input_ids], device=next(unwrap(model).parameters()).device)
    ones = torch.ones_like(ids)
    output = thought_forward(model, ids, ones, torch.arange(ids.size(1), device=ids.device)[None], latent_id,
                             use_cache=False)
    embed = unwrap(model).get_input_embeddings()
    embeds, logits, tokens = output.inputs_embeds, output.logits[0, -1], []
    suppress = suppressed_tokens(model)
    for step in range(max_new_tokens):
        logits[suppress] = float("-inf")
        token = int(logits.argmax())
        tokens.append(token)
        if tokens.count(separator_id) >= separators or step == max_new_tokens - 1:
            break
        embeds = torch.cat((embeds, embed(torch.tensor([[token]], device=ids.device))), dim=1)
        logits = model(inputs_embeds=embeds).logits[0, -1]
    return tokens
