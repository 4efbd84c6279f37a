"""CODI's trained module: a decoder (with peft LoRA adapters on its frozen base, or whole) and the
projection that maps a fed-back last hidden state to the next continuous thought
(codi:src/model.py:119-200). Model code only: plain PyTorch, transformers and peft.

Exports hold the merged decoder (the adapters folded in: `AutoModelForCausalLM` loads it), the
projection (`codi_projection.safetensors`) and the tokenizer, and, in `adapter/`, the adapters alone in
peft's format beside the same projection.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from icot.models.decoder import decoder_shape

PROJECTION_FILE = "codi_projection.safetensors"
ADAPTER_FOLDER = "adapter"
# The modules that get adapters, per family (codi:train.py:119-138).
LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]}
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2")


def linear_layers(decoder: nn.Module) -> list[str]:
    """The name of every linear layer (nn.Linear, GPT-2's Conv1D) of `decoder`: what LoRA can target."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in decoder.named_modules() if isinstance(module, (nn.Linear, Conv1D)) and name]


def lora_targets(decoder: nn.Module, chosen: list[str]) -> list[str]:
    """The adapters' target modules: `chosen` (codi.lora_targets), each of which must name a linear layer of
    the decoder (peft would stop with its own traceback, or skip it), else the family's defaults."""
    from icot.errors import UserError

    if chosen:
        layers = linear_layers(decoder)
        # peft's rule: a target is a module's name or the end of it after a dot.
        missing = [target for target in chosen if not any(name == target or name.endswith("." + target)
                                                          for name in layers)]
        if missing:
            names = sorted({name.rsplit(".", 1)[-1] for name in layers})
            raise UserError(f"codi.lora_targets: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a "
                            f"linear layer of this {decoder.config.model_type} model; its linear layers: "
                            f"{', '.join(names)}")
        return list(chosen)
    model_type = decoder.config.model_type
    if model_type == "gpt2":
        return LORA_TARGETS["gpt2"]
    if model_type in LLAMA_LIKE:
        return LORA_TARGETS["llama"]
    raise UserError(f"codi.lora_targets: no default adapter targets for model type {model_type!r}; name them")


class Projection(nn.Sequential):
    """The fed-back state's map to the next thought, in its own parameters' dtype (under ZeRO-3 with bf16
    the engine partitions modules built after the load scope without casting them)."""

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return super().forward(state.to(self[1].weight.dtype))


def build_projection(hidden: int, options) -> Projection:
    """Dropout -> Linear(d, projection_dim) -> GELU -> Linear(projection_dim, d) [-> LayerNorm(d)]."""
    projection = Projection(nn.Dropout(options.projection_dropout), nn.Linear(hidden, options.projection_dim),
                               nn.GELU(), nn.Linear(options.projection_dim, hidden))
    if options.projection_norm:
        projection.add_module("ln", nn.LayerNorm(hidden))
    return projection


def with_adapters(decoder: nn.Module, options) -> nn.Module:
    """The decoder under peft LoRA adapters (its own parameters frozen: embeddings and head included)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=lora_targets(decoder, options.lora_targets), init_lora_weights=True,
                        task_type="CAUSAL_LM", fan_in_fan_out=decoder.config.model_type == "gpt2")
    return get_peft_model(decoder, config)


class CodiModel(nn.Module):
    """The decoder and the projection; called like the decoder (the multi-pass forward and the decoding
    loops call it, or the engine around it, as they call any decoder)."""

    def __init__(self, decoder: nn.Module, projection: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.projection = projection

    def forward(self, **kwargs):
        return self.decoder(**kwargs)

    @property
    def base(self) -> nn.Module:
        """The Hugging Face decoder (under the adapters, if any)."""
        from peft import PeftModel

        return self.decoder.get_base_model() if isinstance(self.decoder, PeftModel) else self.decoder

    @property
    def config(self):
        return self.base.config

    @property
    def generation_config(self):
        return self.base.generation_config

    @property
    def is_activation_checkpointing(self) -> bool:
        base = self.base
        active = getattr(base, "is_activation_checkpointing", None)   # transformers 5; 4.x below
        return bool(getattr(base, "is_gradient_checkpointing", False) if active is None else active)

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def merged_decoder(self) -> nn.Module:
        """The plain decoder with the adapters folded in (this module's adapters are merged in place)."""
        from peft import PeftModel

        return self.decoder.merge_and_unload() if isinstance(self.decoder, PeftModel) else self.decoder


def rebuilt_on_cpu(decoder_config, options, state_dict: dict[str, torch.Tensor]) -> CodiModel:
    """A CPU CodiModel of this structure holding `state_dict` (a full one, gathered under ZeRO-3), built
    on the meta device so that no weights are initialised only to be overwritten."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        decoder = AutoModelForCausalLM.from_config(decoder_config)
        model = CodiModel(with_adapters(decoder, options) if options.lora else decoder,
                          build_projection(decoder_shape(decoder)[1], options))
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    model.base.tie_weights()
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if unexpected or still_meta:
        raise RuntimeError(f"the CODI export's state dict does not fit its model: unexpected {unexpected}, "
                           f"missing {still_meta}")
    return model


ADAPTER_README = """# CODI adapters (peft)

The LoRA adapters of this CODI export alone, with the token tables they were trained with (the base grew
{added} rows for CODI's tokens; peft's `save_embedding_layers`), the projection and the tokenizer. The
folder above holds the same model merged, which `transformers` loads by itself.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{folder}")
base = AutoModelForCausalLM.from_pretrained("{base}")
base.resize_token_embeddings({rows})   # room for CODI's tokens; their rows load from the adapter
model = PeftModel.from_pretrained(base, "{folder}")
```

`{projection}` holds the projection that maps a fed-back state to the next continuous thought
(`icot.methods.codi.model.build_projection`, with the shape in ../icot_component.json).
"""


def save_codi_export(model: CodiModel, folder: Path, tokenizer, extra: dict, adapter: bool,
                     base: str | None = None) -> None:
    """Write the adapters alone (`adapter/`, when asked and present, and where a `base` folder exists for
    them to load into: the start's weights, absolute), then the merged decoder, the projection and the
    tokenizer into `folder`."""
    from peft import PeftModel
    from safetensors.torch import save_file

    from icot.models.io import save_component

    projection = {key: value.detach().contiguous().cpu() for key, value in model.projection.state_dict().items()}
    if adapter and isinstance(model.decoder, PeftModel) and base is not None:
        save_adapter(model, folder / ADAPTER_FOLDER, tokenizer, base, projection)
    elif adapter and isinstance(model.decoder, PeftModel):
        extra = dict(extra, adapter=None, adapter_note="no adapter export: the adapters sat on a base built from "
                                                       "scratch in the run, which no folder holds; the merged "
                                                       "model here is complete")
    save_component(model.merged_decoder(), folder, extra=extra)
    save_file(projection, str(folder / PROJECTION_FILE))
    tokenizer.save_pretrained(folder)


def save_adapter(model: CodiModel, folder: Path, tokenizer, base: str, projection: dict) -> None:
    """peft's adapter folder, loadable by `PeftModel.from_pretrained` on `base` (recorded as its
    base_model_name_or_path) once the base has the tokenizer's rows: the token tables go with the adapters
    (the new tokens' rows exist nowhere else), and a README says how."""
    import json

    from safetensors.torch import save_file

    model.decoder.save_pretrained(folder, save_embedding_layers=True)
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    save_file(projection, str(folder / PROJECTION_FILE))
    tokenizer.save_pretrained(folder)
    rows = model.base.get_input_embeddings().weight.shape[0]
    base_rows = json.loads((Path(base) / "config.json").read_text()).get("vocab_size", rows)
    (folder / "README.md").write_text(ADAPTER_README.format(folder=folder.resolve(), base=base, rows=rows,
                                                            added=max(rows - base_rows, 0), projection=PROJECTION_FILE))


def load_codi_export(folder: Path, options) -> CodiModel:
    """The merged decoder and its projection from an export folder."""
    from safetensors.torch import load_file

    from icot.errors import UserError
    from icot.models.io import load_component

    decoder = load_component(folder, expect="decoder")
    file = folder / PROJECTION_FILE
    if not file.is_file():
        raise UserError(f"{folder}: no {PROJECTION_FILE} (not a CODI export)")
    projection = build_projection(decoder_shape(decoder)[1], options)
    try:
        projection.load_state_dict(load_file(str(file)))
    except RuntimeError as error:
        raise UserError(f"{file}: does not fit the projection recorded in icot_component.json ({error})") from None
    return CodiModel(decoder, projection.to(decoder.dtype))
