"""Model FLOPs and model FLOPs utilization (MFU), the figures a trainer is judged by.

FLOPs of one training step (forward and backward) over a row of t non-padding tokens, for a decoder of
N matmul parameters, L blocks and attention width A (heads x head size):

    6 N t  +  12 L A t^2

6 N per token: a multiply-add (2 FLOPs) per weight in the forward, twice that in the backward (the
gradients of the activations and of the weights). 12 L A t per token: the attention scores QK^T and
their product with V (2 x 2 L A t forward, x 3 with the backward), counted over the whole row as in
PaLM's appendix B (Chowdhury et al. 2022) and nanoGPT, not halved for the causal mask. N counts every
weight a matmul reads, the output projection included (tied or not), and leaves out the embedding
lookups, biases and norms. MFU = these FLOPs per second per device / the device's peak dense FLOPs
at the training precision. Activation recomputation (checkpointing) is not counted: it is work the
hardware does beyond the model's (that would be hardware FLOPs utilization). Frozen models that only
supply targets (a teacher's states) are not counted either: the figure is the trained model's.
A frozen matmul weight inside a trained decoder (a LoRA run's base, CODI) has no weight gradient: its
backward costs 2 FLOPs a multiply-add, not 4, so such a decoder counts (6 N - 2 F) t, F its frozen
matmul weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Peak dense tensor-core TFLOPS per device from the vendors' data sheets: (bf16/fp16, tf32, fp32).
# More specific names first ("H100 PCIe" before "H100", "GH200" before "H200", "A100" before "A10").
PEAK_TFLOPS = (
    ("GH200", 989.4, 494.7, 66.9),
    ("H200", 989.4, 494.7, 66.9),
    ("H100 PCIe", 756.0, 378.0, 51.2),
    ("H100", 989.4, 494.7, 66.9),      # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.4, 494.7, 66.9),
    ("B200", 2250.0, 1100.0, 80.0),
    ("A100", 312.0, 156.0, 19.5),
    ("A800", 312.0, 156.0, 19.5),
    ("L40S", 362.05, 183.0, 91.6),
    ("L4", 121.0, 60.0, 30.3),
)


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class DecoderFlops:
    """The counts of one decoder that the formula needs."""

    matmul_parameters: int   # N
    layers: int              # L
    attention_width: int     # A: heads x head size
    frozen_parameters: int = 0   # F: matmul weights without a gradient (no weight-gradient FLOPs)

    @classmethod
    def of_config(cls, config) -> "DecoderFlops":
        """From a Hugging Face config: GPT-2 (`n_layer`, `n_embd`, `n_inner`) and the Llama family
        (grouped-query attention, a gated MLP)."""
        layers = int(_get(config, "num_hidden_layers", "n_layer"))
        hidden = int(_get(config, "hidden_size", "n_embd"))
        heads = int(_get(config, "num_attention_heads", "n_head"))
        vocab = int(config.vocab_size)
        if config.model_type == "gpt2":
            inner = int(_get(config, "n_inner", default=4 * hidden))
            attention, width = 4 * hidden * hidden, hidden            # c_attn (q, k, v) and c_proj
            mlp = 2 * hidden * inner                                  # c_fc and c_proj
        else:
            head = int(_get(config, "head_dim", default=hidden // heads))
            kv_heads = int(_get(config, "num_key_value_heads", default=heads))
            width = heads * head
            attention = 2 * hidden * width + 2 * hidden * kv_heads * head   # q and o; k and v
            mlp = 3 * hidden * int(config.intermediate_size)               # gate, up, down
        return cls(layers * (attention + mlp) + vocab * hidden, layers, width)

    def step_flops(self, tokens: float, squared_lengths: float) -> float:
        """Forward + backward FLOPs over rows of `tokens` tokens in all, whose lengths' squares sum to
        `squared_lengths`."""
        return ((6 * self.matmul_parameters - 2 * self.frozen_parameters) * tokens
                + 12 * self.layers * self.attention_width * squared_lengths)

    def per_token(self, length: int) -> float:
        """Forward + backward FLOPs per token of a row of `length` tokens."""
        return self.step_flops(length, length * length) / length


def trained_decoders(model: nn.Module) -> list[nn.Module]:
    """The Hugging Face decoders inside `model` that train (outermost ones only: a causal LM, not also its
    base model)."""
    from transformers import PreTrainedModel

    found, inside = [], set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, PreTrainedModel):
            continue
        inside.update(id(sub) for sub in module.modules())
        if any(p.requires_grad for p in module.parameters()):
            found.append(module)
    return found


def frozen_matmul_weights(decoder: nn.Module) -> int:
    """The weights of the decoder's matmuls (nn.Linear, GPT-2's Conv1D) that take no gradient; a ZeRO-3
    partitioned weight counts by its full size."""
    from transformers.pytorch_utils import Conv1D

    return sum(getattr(module.weight, "ds_numel", module.weight.numel()) for module in decoder.modules()
               if isinstance(module, (nn.Linear, Conv1D)) and not module.weight.requires_grad)


@dataclass(frozen=True)
class ModelFlops:
    """The trained decoders of a stage: every one of them reads the batch's tokens."""

    decoders: tuple[DecoderFlops, ...]

    @classmethod
    def of_model(cls, model: nn.Module) -> "ModelFlops":
        decoders = []
        for decoder in trained_decoders(model):
            counts = DecoderFlops.of_config(decoder.config)
            frozen = min(frozen_matmul_weights(decoder), counts.matmul_parameters)
            decoders.append(DecoderFlops(counts.matmul_parameters, counts.layers, counts.attention_width, frozen))
        return cls(tuple(decoders))

    def step_flops(self, tokens: float, squared_lengths: float) -> float:
        return sum(decoder.step_flops(tokens, squared_lengths) for decoder in self.decoders)


def peak_flops(device: torch.device | str, precision: str, given_tflops: float | None = None) -> float | None:
    """The device's peak dense FLOPs/s at `precision` (fp32 counts TF32 where matmuls may use it), from
    `given_tflops` or the table of known cards; None where unknown (a CPU, an unlisted card)."""
    if given_tflops is not None:
        return given_tflops * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, half, tf32, fp32 in PEAK_TFLOPS:
        if fragment in name:
            if precision in ("bf16", "fp16"):
                return half * 1e12
            return (tf32 if torch.get_float32_matmul_precision() != "highest" else fp32) * 1e12
    return None


def row_lengths(batch: dict) -> tuple[int, int]:
    """(non-padding tokens, sum of squared row lengths) of every view a batch holds (parts with an
    attention mask; a part whose mask is not 2-D 0/1, e.g. a 4-D one, counts by its row sums)."""
    tokens = squares = 0
    for part in batch.values():
        if isinstance(part, dict) and "attention_mask" in part:
            lengths = part["attention_mask"].reshape(part["attention_mask"].size(0), -1).sum(dim=1)
            tokens += int(lengths.sum())
            squares += int((lengths * lengths).sum())
    return tokens, squares
