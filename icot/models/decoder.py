"""Decoder access for any Hugging Face causal LM: find its blocks, read and replace block inputs.

The method needs, before every decoder block l, the hidden state at one position per example (the
separator), either read (teacher states) or replaced (student, emulator). Instead of forking each
architecture's modelling code, a forward pre-hook on every block sees the block's input
`hidden_states` and may return a new one. In transformers 5.x activation checkpointing wraps a block's
`forward`, not its `__call__`, so these hooks run once per forward, outside the recomputed region.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from icot.errors import UserError

BLOCK_LIST_NAMES = ("h", "layers")  # GPT-2 family / Llama, Mistral, Qwen2 and most newer decoders

# edit(layer_index, hidden_states [B, T, H]) -> hidden_states (the same tensor to only read)
BlockInputEdit = Callable[[int, torch.Tensor], torch.Tensor]


class UnsupportedDecoderError(UserError):
    """A model whose decoder blocks icot cannot find."""


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (`model.base_model.h` or `.layers`)."""
    base = getattr(model, "base_model", model)
    for name in BLOCK_LIST_NAMES:
        blocks = getattr(base, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    looked_for = " or ".join(f"{type(base).__name__}.{n}" for n in BLOCK_LIST_NAMES)
    raise UnsupportedDecoderError(
        f"unsupported architecture {type(model).__name__}: no decoder block list found at {looked_for}")


def decoder_shape(model: nn.Module) -> tuple[int, int]:
    """(number of decoder blocks, hidden size)."""
    config = model.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if hidden is None:
        raise UnsupportedDecoderError(f"{type(config).__name__} names no hidden_size / n_embd")
    return len(decoder_blocks(model)), int(hidden)


class StopForward(Exception):
    """Raised by a block-input edit to end the forward there, when nothing after that block is read."""


@contextmanager
def edit_block_inputs(model: nn.Module, edit: BlockInputEdit, once: bool = False) -> Iterator[None]:
    """While active, every block's input hidden state goes through `edit(layer, hidden)` first. With
    `once`, each block's hook removes itself after its first call: later forwards run hook-free (a
    hooked block takes PyTorch's slow call path, about 6% of a small model's decoding step)."""
    handles = []

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            if once:
                handles[layer].remove()
            if args:
                return (edit(layer, args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = edit(layer, kwargs["hidden_states"])
            return args, kwargs

        return hook

    handles.extend(block.register_forward_pre_hook(make_hook(layer), with_kwargs=True)
                   for layer, block in enumerate(decoder_blocks(model)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a wrapper that keeps it as `.module` (a DeepSpeed engine), or the module itself."""
    return getattr(model, "module", model)


def position_limit(module: nn.Module) -> int | None:
    """The fewest positions any decoder inside `module` has (GPT-2's n_positions, the others'
    max_position_embeddings); None when none says."""
    limits = []
    for sub in (module.modules() if isinstance(module, nn.Module) else [module]):
        config = getattr(sub, "config", None)
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int):
            limits.append(limit)
    return min(limits) if limits else None


def gather_rows(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden[b, positions[b]] for every b: [B, T, H] -> [B, H]."""
    index = positions.view(-1, 1, 1).expand(-1, 1, hidden.size(-1))
    return hidden.gather(1, index).squeeze(1)


def replace_rows(hidden: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of `hidden` with hidden[b, positions[b]] = values[b]. Out of place: autograd may have
    saved `hidden` for the previous block's backward."""
    index = positions.view(-1, 1, 1).expand(-1, 1, hidden.size(-1))
    return hidden.scatter(1, index, values.unsqueeze(1).to(hidden.dtype))


FAMILIES = ("gpt2", "llama", "mistral", "qwen2")


def decoder_config(family: str, *, vocab_size: int, layers: int, hidden: int, heads: int,
                   max_positions: int, dropout: float = 0.0, kv_heads: int | None = None,
                   intermediate: int | None = None, eos_token_id: int | None = None,
                   activation: str | None = None):
    """A Hugging Face config for a decoder trained from scratch; `activation` (an ACT2FN name) replaces
    the family's own MLP activation."""
    import transformers

    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_layer=layers, n_embd=hidden, n_head=heads, n_positions=max_positions,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
            n_inner=intermediate, bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
            **({"activation_function": activation} if activation else {}))
    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}
    if family not in classes:
        raise UserError(f"model.family: unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return classes[family](
        vocab_size=vocab_size, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_positions, attention_dropout=dropout,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        tie_word_embeddings=False, **({"hidden_act": activation} if activation else {}))


def build_decoder(config) -> nn.Module:
    """A randomly initialised causal LM from a Hugging Face config."""
    from transformers import AutoModelForCausalLM

    return with_causal_lm_loss(AutoModelForCausalLM.from_config(config))


def load_decoder(path: str, **kwargs) -> nn.Module:
    """A causal LM from a local Hugging Face folder (no hub access)."""
    from transformers import AutoModelForCausalLM

    return with_causal_lm_loss(AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs))


def with_causal_lm_loss(model: nn.Module) -> nn.Module:
    """Name the causal-LM loss where transformers cannot infer it from the class name (GPT2LMHeadModel):
    it would warn at the first loss, then fall back to that same loss."""
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Activation checkpointing over the decoder blocks (non-reentrant: hooks and kwargs are safe)."""
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*.
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
