"""Save and load components as folders.

A component folder is a Hugging Face model folder (`AutoModelForCausalLM.from_pretrained` loads the
decoder from it directly) plus, for the student and the emulator, `icot_heads.safetensors` (the
extra modules) and `icot_component.json` (what is needed to rebuild them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from icot.errors import UserError
from icot.models.decoder import decoder_shape, load_decoder
from icot.models.emulator import Emulator
from icot.models.student import Student

COMPONENT_FILE = "icot_component.json"
HEADS_FILE = "icot_heads.safetensors"
KINDS = ("decoder", "student", "emulator")


def component_kind(module: nn.Module) -> str:
    if isinstance(module, Student):
        return "student"
    if isinstance(module, Emulator):
        return "emulator"
    return "decoder"


def save_component(module: nn.Module, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                   extra: dict | None = None) -> Path:
    """Write `module` (a plain decoder, Student or Emulator) into folder `path`.

    `state_dict` overrides the module's own (a gathered one under ZeRO-3, where the local parameters
    are partitions); `extra` is merged into the JSON description (e.g. the delta used).
    """
    from safetensors.torch import save_file

    if getattr(module, "inference_only", False):
        raise UserError(f"{path}: this emulator was prepared for inference (for_inference); save it before")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kind = component_kind(module)
    state_dict = module.state_dict() if state_dict is None else state_dict
    if kind == "decoder":
        decoder, decoder_state, heads = module, state_dict, {}
    else:
        decoder = module.decoder
        decoder_state = {k[len("decoder."):]: v for k, v in state_dict.items() if k.startswith("decoder.")}
        heads = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if not k.startswith("decoder.")}
    decoder.save_pretrained(path, state_dict=decoder_state)
    num_layers, hidden_size = decoder_shape(decoder)
    description = {"kind": kind, "num_layers": num_layers, "hidden_size": hidden_size}
    if kind == "emulator":
        description.update(mixture_size=module.mixture_size, temperature=module.temperature)
    description.update(extra or {})
    if heads:
        save_file(heads, str(path / HEADS_FILE))
    (path / COMPONENT_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return path


def read_description(path: str | Path) -> dict:
    path = Path(path)
    file = path / COMPONENT_FILE
    if not path.is_dir():
        raise UserError(f"{path}: no such component folder")
    if not file.exists():
        return {"kind": "decoder"}  # a plain Hugging Face folder, e.g. pretrained weights
    try:
        description = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{file}: not valid JSON ({err})") from None
    if description.get("kind") not in KINDS:
        raise UserError(f"{file}: key 'kind' must be one of {', '.join(KINDS)}")
    return description


def load_component(path: str | Path, expect: str | None = None, **decoder_kwargs) -> nn.Module:
    """Rebuild a component saved by `save_component` (or a plain Hugging Face folder as a decoder)."""
    from safetensors.torch import load_file

    path = Path(path)
    description = read_description(path)
    kind = description["kind"]
    if expect is not None and kind != expect:
        raise UserError(f"{path}: holds a {kind}, expected a {expect}")
    decoder = load_decoder(str(path), **decoder_kwargs)
    if kind == "decoder":
        return decoder
    num_layers, hidden_size = decoder_shape(decoder)
    if (num_layers, hidden_size) != (description["num_layers"], description["hidden_size"]):
        raise UserError(f"{path / COMPONENT_FILE}: describes {description['num_layers']} layers x "
                        f"{description['hidden_size']} hidden, but the decoder has {num_layers} x {hidden_size}")
    if kind == "student":
        module = Student(decoder)
    else:
        module = Emulator(decoder, mixture_size=description["mixture_size"],
                          temperature=description["temperature"])
    heads = load_file(str(path / HEADS_FILE))
    missing, unexpected = module.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith("decoder.")]
    if missing or unexpected:
        raise UserError(f"{path / HEADS_FILE}: missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}")
    return module.to(decoder.dtype)
