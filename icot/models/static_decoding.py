"""Greedy decoding without Python overhead: a static KV cache and a compiled one-token step.

Eager decoding of a small model is bound by the CPU: every new token goes through `generate`'s (or a
Python loop's) bookkeeping and launches each kernel one by one. Here the prompt pass (with whatever a
mode does on it: injected states, continuous thoughts) runs eagerly into a `StaticCache` whose tensors
keep their addresses, and every later token is one call of a step function of fixed shapes
(`[B, 1]` token, a `[B, L]` attention mask of the whole cache, `[B, 1]` positions) that
`torch.compile` turns into one graph; on CUDA with `mode="reduce-overhead"` it is replayed as a CUDA
graph. The answers equal eager decoding's (tests/test_static_decoding.py, every mode).

`decoding`: `eager` (transformers' `generate`, or the thought loop with a dynamic cache), `static` (the
static cache and the step, not compiled: the same numerics, a check of the path) or `compiled`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from icot.errors import UserError

DECODINGS = ("eager", "static", "compiled")
CACHE_BUCKET = 32   # the cache length is rounded up to a multiple of this: fewer shapes, fewer compilations

# A prompt pass: given the empty static cache, fills it with the prompt (and thoughts) and returns the
# next-token logits of its last column [B, V] and the attention mask of the filled columns [B, W].
PromptPass = Callable[[object], tuple[torch.Tensor, torch.Tensor]]

COMPILED_STEP = "_icot_compiled_step"   # the attribute that keeps a model's compiled step with it


def check_decoding(decoding: str, synced: bool = False) -> str:
    if decoding not in DECODINGS:
        raise UserError(f"decoding: expected one of {', '.join(DECODINGS)}, got {decoding!r}")
    if decoding == "compiled" and synced:
        raise UserError("decoding 'compiled' runs a plain model in one process; under ZeRO-3 sharding (several "
                        "ranks stepping together) use 'static' or 'eager'")
    return decoding


def cache_length(columns: int) -> int:
    return -(-columns // CACHE_BUCKET) * CACHE_BUCKET


def new_static_cache(model: nn.Module, columns: int):
    """An empty static KV cache for `columns` positions (rounded up to a bucket), laid out on first use."""
    from transformers import StaticCache

    from icot.models.decoder import unwrap

    return StaticCache(config=unwrap(model).config, max_cache_len=cache_length(columns))


def one_token_step(model: nn.Module, compiled: bool) -> Callable:
    """step(token [B, 1], mask [B, L], positions [B, 1], cache, cache_position [1]) -> logits [B, V]. The
    compiled step is built once per model (kept on it, freed with it) and compiles once per batch size and
    cache length."""
    def step(token, mask, positions, cache, cache_position):
        return model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                     cache_position=cache_position).logits[:, -1]

    if not compiled:
        return step
    if getattr(model, COMPILED_STEP, None) is None:
        on_cuda = next(model.parameters()).device.type == "cuda"
        # reduce-overhead = CUDA graphs; on a CPU the mode has no graphs to record, inductor's code only.
        object.__setattr__(model, COMPILED_STEP,
                           torch.compile(step, dynamic=False, mode="reduce-overhead" if on_cuda else None))
    return getattr(model, COMPILED_STEP)


def check_no_hooks(model: nn.Module) -> None:
    """A compiled step ignores forward hooks registered after it was traced (and would keep the ones it
    was traced with): a mode's edits of the forward belong to its eager prompt pass. transformers' own
    hooks (the recorders of `output_hidden_states`, installed once and left in place) are part of the model."""
    for name, module in model.named_modules():
        hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        if any(not getattr(hook, "__module__", "").startswith("transformers.") for hook in hooks):
            raise RuntimeError(f"compiled decoding: {name or type(model).__name__} has forward hooks after the prompt "
                               f"pass; apply them in the prompt pass only")


def greedy_loop(logits: torch.Tensor, next_logits: Callable[[torch.Tensor, int], torch.Tensor], separator_id: int,
                separators: int, max_new_tokens: int, suppress: list[int], synced: bool) -> torch.Tensor:
    """Greedy tokens [B, n] from the prompt's next-token `logits` [B, V]; `next_logits(token [B], i)` feeds the
    i-th token and returns the logits after it. A row is done after `separators` separators and is fed the
    separator from then on; the loop ends when every row (on every rank, when `synced`) is done, or after
    `max_new_tokens`."""
    from icot.models.generation import all_finished

    done = torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device)
    seen = torch.zeros_like(done, dtype=torch.long)
    tokens = []
    for step in range(max_new_tokens):
        if suppress:
            logits = logits.clone()   # a compiled step's output may be a CUDA graph's buffer
            logits[:, suppress] = float("-inf")
        token = logits.argmax(dim=-1).masked_fill(done, separator_id)
        tokens.append(token)
        seen += (token == separator_id) & ~done
        done |= seen >= separators
        if step == max_new_tokens - 1 or all_finished(done, synced):
            break
        logits = next_logits(token, step)
    return torch.stack(tokens, dim=1)


@torch.no_grad()
def static_greedy(model: nn.Module, prompt_pass: PromptPass, columns: int, last_positions: torch.Tensor,
                  separator_id: int, separators: int, max_new_tokens: int, suppress: list[int] = (),
                  synced: bool = False, compiled: bool = True, step_offset: int = 0) -> torch.Tensor:
    """Greedy tokens [B, n] after a prompt pass over `columns` columns whose last positions are
    `last_positions` [B], with a static cache and the (compiled) one-token step; every new token's position
    moves `step_offset` further (stepwise's kept positions, which a hook applies to the prompt pass only:
    a compiled graph does not see hooks added after it was traced)."""
    cache = new_static_cache(model, columns + max_new_tokens)
    logits, mask = prompt_pass(cache)
    if compiled:
        check_no_hooks(model)
    rows, length = mask.size(0), cache_length(columns + max_new_tokens)
    # The whole cache's mask, fixed for every step: the prompt's, then ones (columns after the current
    # one are hidden by the causal mask, so they need not be zero).
    full_mask = torch.cat((mask, mask.new_ones((rows, length - mask.size(1)))), dim=1)
    positions = last_positions.view(-1, 1) + step_offset
    step = one_token_step(model, compiled)

    def next_logits(token: torch.Tensor, index: int) -> torch.Tensor:
        cache_position = torch.tensor([columns + index], device=token.device)
        return step(token[:, None], full_mask, positions + index + 1, cache, cache_position)

    return greedy_loop(logits, next_logits, separator_id, separators, max_new_tokens, list(suppress), synced)
