"""Tiny random decoders and a hand-written GPT-2 forward used as the reference computation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 40
SEP = 0  # the separator / EOS id of these tests


def tiny_gpt2(layers: int = 3, hidden: int = 16, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_layer=layers, n_embd=hidden, n_head=2, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=SEP, eos_token_id=SEP, pad_token_id=SEP)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(layers: int = 3, hidden: int = 16, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64,
                         bos_token_id=SEP, eos_token_id=SEP, pad_token_id=SEP, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def make_decoder(family: str, **kwargs):
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[family](**kwargs)


def hand_gpt2_forward(model: GPT2LMHeadModel, input_ids: torch.Tensor, edit=None) -> torch.Tensor:
    """GPT-2's forward written out from its weights (no padding), calling `edit(layer, h)` on every
    block input. Returns the logits."""
    base = model.transformer
    config = model.config
    batch, length = input_ids.shape
    heads = config.n_head
    head_dim = config.n_embd // heads
    h = base.wte(input_ids) + base.wpe(torch.arange(length)).unsqueeze(0)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for layer, block in enumerate(base.h):
        if edit is not None:
            h = edit(layer, h)
        x = F.layer_norm(h, (config.n_embd,), block.ln_1.weight, block.ln_1.bias, config.layer_norm_epsilon)
        q, k, v = (x @ block.attn.c_attn.weight + block.attn.c_attn.bias).split(config.n_embd, dim=-1)
        q, k, v = (t.view(batch, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, config.n_embd)
        h = h + attended @ block.attn.c_proj.weight + block.attn.c_proj.bias
        x = F.layer_norm(h, (config.n_embd,), block.ln_2.weight, block.ln_2.bias, config.layer_norm_epsilon)
        x = F.gelu(x @ block.mlp.c_fc.weight + block.mlp.c_fc.bias, approximate="tanh")
        h = h + x @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
    h = F.layer_norm(h, (config.n_embd,), base.ln_f.weight, base.ln_f.bias, config.layer_norm_epsilon)
    return h @ model.lm_head.weight.T


def random_example_batch(batch: int, length: int, first_seps: list[int], second_seps: list[int] | None = None,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpadded ids with separators at the given positions (no other separator anywhere)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    second_seps = second_seps or [length - 1] * batch
    for row, (s1, s2) in enumerate(zip(first_seps, second_seps)):
        ids[row, s1] = SEP
        ids[row, s2] = SEP
    return ids, torch.tensor(first_seps), torch.tensor(second_seps)
