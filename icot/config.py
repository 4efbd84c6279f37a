"""Typed stage configuration: dataclasses with help text, a YAML recipe, dotted command-line overrides.

One stage's configuration is merged, later layers winning, from:

    dataclass defaults <- recipe (shared sections) <- recipe `stages.<stage>`
                       <- command line (shared)     <- command line `--stages.<stage>.*`

Every field is declared once, with its type, default and help text (`option`): the loader converts and
checks values by it, and `icot train STAGE --help` prints it. A stage's config holds the shared sections
(`run_dir`, `model`, `data`, `train`), `inputs` (one entry per earlier stage it reads, by role) and the
section of the method it belongs to (named after the method, e.g. `icot_kd:`), and of the methods that
method uses (a variant's base: `coconut:` for `coconut_simcot`); the registry (`icot.registry`) says which. A recipe may hold the sections of several methods and `methods:`, the
methods `icot pipeline` runs.

Every value arrives as text (YAML scalars are read as raw text, not through PyYAML's type guessing,
which reads `1e-4` as a string and `007` as 7) and is converted by the type its field declares.
Unknown keys and wrong types stop the run with a one-line `UserError` naming the dotted key and where
it came from (`recipe.yaml:12` or `command line`). The resolved config is saved beside the run, and
loads back to an equal config.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from icot import registry
from icot.errors import UserError
from icot.exports import LAST, ExportChoice


def option(default=MISSING, *, help: str, factory=None, minimum=None, check=None, resumable: bool = False,
           path: bool = False, infinite: bool = False, above: float | None = None):
    """A config field: its help text, what the loader checks beyond the type (a lower bound, a check
    function returning a problem or None), whether a run may resume with another value (`resumable`:
    it changes neither shapes nor data order, e.g. the learning rate; every other change is refused), and
    whether it names a local file or folder (`path`: a stage records it absolute, and resume compares it
    as a path, however it is spelled). A number must be finite (NaN never passes) unless `infinite`, and
    greater than `above` where given (a strict bound: 0 where zero would mean something else)."""
    meta = {"help": help, "minimum": minimum, "check": check, "resumable": resumable, "path": path,
            "infinite": infinite, "above": above}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls, help: str):
    """A field holding a nested section."""
    return field(default_factory=cls, metadata={"help": help})


def dropout_probability(value: float) -> str | None:
    """A check (see `option`) for a dropout probability."""
    return None if value < 1.0 else "expected a dropout probability in [0, 1)"


def _check_betas(value: list) -> str | None:
    if len(value) == 2 and all(0.0 <= b < 1.0 for b in value):
        return None
    return "expected two numbers in [0, 1), e.g. 0.9,0.999"


def _check_activation(value: str | None) -> str | None:
    if value is None:
        return None
    from transformers.activations import ACT2FN

    if value in ACT2FN:
        return None
    close = difflib.get_close_matches(value, list(ACT2FN), n=3) or ["gelu_new", "gelu_pytorch_tanh", "silu"]
    return f"expected a transformers activation name (ACT2FN) such as {', '.join(close)}"


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = option(None, path=True, help="a local Hugging Face model folder (pretrained weights); "
                                                    "null builds model.family from scratch")
    family: Literal["gpt2", "llama", "mistral", "qwen2"] = option(
        "gpt2", help="the architecture built from scratch when model.name_or_path is null")
    layers: int = option(4, minimum=1, help="decoder blocks (from scratch)")
    hidden: int = option(128, minimum=1, help="hidden size (from scratch)")
    heads: int = option(4, minimum=1, help="attention heads (from scratch)")
    kv_heads: Optional[int] = option(None, minimum=1, help="key/value heads for grouped-query attention "
                                                           "(llama-family, from scratch); null: model.heads")
    intermediate: Optional[int] = option(None, minimum=1, help="MLP width (from scratch); null: 4 x model.hidden")
    max_positions: int = option(512, minimum=1, help="position embeddings (from scratch)")
    activation: Optional[str] = option(
        None, check=_check_activation,
        help="the MLP's activation (from scratch), a transformers ACT2FN name; null: the family's own "
             "(GPT-2 gelu_new, the Llama family silu). gelu_pytorch_tanh is gelu_new's formula in one "
             "fused kernel: equal to round-off, and 15-20% less time per training step of a small GPT-2 "
             "on a CPU")
    dropout: float = option(0.0, minimum=0.0, resumable=True,
                            help="dropout probability; stages that train with dropout off (all but the teacher) ignore it")
    tokenizer: Optional[str] = option(None, path=True, help="a local tokenizer folder; null: model.name_or_path, else the "
                                                 "export of the first stage this one reads")
    gradient_checkpointing: bool = option(False, resumable=True, help="activation checkpointing over the decoder blocks")


@dataclass
class DataConfig:
    train: Optional[str] = option(None, path=True, help="training data, its format read from it: a file of "
                                                        "INPUT||COT #### ANSWER lines, a Coconut JSON list of "
                                                        "question/steps/answer records, or a dataset folder "
                                                        "with question, cot (or steps), answer columns (CODI); "
                                                        "icot data convert --help")
    valid: Optional[str] = option(None, resumable=True, path=True, help="validation data, in any format data.train "
                                                             "takes (loss, token accuracy and decoded "
                                                             "accuracy during training); null: no validation")
    test: Optional[str] = option(None, resumable=True, path=True, help="test data, in any format data.train takes, "
                                                                   "evaluated by icot pipeline after the stages")
    max_train_examples: Optional[int] = option(None, minimum=0, help="use the first N training examples only")
    max_eval_examples: Optional[int] = option(None, minimum=0, resumable=True,
                                              help="use the first N validation examples only")
    max_length: int = option(1024, minimum=1, help="longest with-CoT view (tokens) an example may have; the "
                                                   "model's positions bound it too (see data.overlength)")
    overlength: Literal["drop", "error"] = option(
        "drop", help="an example longer than data.max_length or the model's positions: drop it (counted in a "
                     "warning) or stop with its file:line")
    num_proc: int = option(1, minimum=1, resumable=True, help="processes for tokenization")
    steps: Literal["auto", "equations", "plus", "sentences", "words"] = option(
        "auto", help="how a CoT splits into steps, for methods that replace or drop whole steps (Coconut, "
                     "CODI): equations (GSM8K-Aug: one <<...>> per step), plus (multiplication in the papers' "
                     "layout: one partial product with its running sum, through its +), sentences (ProsQA, "
                     "ProntoQA: through each sentence's final '.'), words (one step a word: the columns "
                     "layout's column sums), auto (equations where the CoT holds <<, plus where it holds +, "
                     "sentences where a '.' ends a sentence, else words)")
    skip_bad_lines: bool = option(False, help="skip malformed lines and lines with words the tokenizer does not "
                                              "know (counted in a warning) instead of stopping at the first with "
                                              "file:line")
    cache_dir: Optional[str] = option(None, resumable=True, path=True, help="folder for the tokenized-data cache; null: "
                                                                 "beside the dataset's own cache files")


@dataclass
class TrainConfig:
    lr: float = option(5e-5, resumable=True, minimum=0.0, help="AdamW learning rate (the peak value under a schedule)")
    weight_decay: float = option(0.01, resumable=True, minimum=0.0, help="AdamW weight decay, on every parameter "
                                                         "(torch AdamW's default, as in the paper's runs)")
    betas: list[float] = option(resumable=True, factory=lambda: [0.9, 0.999], check=_check_betas, help="AdamW betas")
    eps: float = option(1e-8, resumable=True, minimum=0.0, help="AdamW epsilon")
    batch_size: int = option(32, minimum=1, help="global batch: micro batch x gradient accumulation x world size")
    micro_batch_size: Optional[int] = option(None, resumable=True, minimum=1, help="examples per rank and forward; null: "
                                                                   "train.batch_size / world size (no accumulation)")
    epochs: float = option(1.0, resumable=True, minimum=0.0, help="passes over the training set (fractions allowed); "
                                                  "train.max_steps wins when set")
    max_steps: Optional[int] = option(None, resumable=True, minimum=0, help="optimizer steps; null: train.epochs x steps per epoch")
    schedule: Literal["constant", "linear", "cosine"] = option("constant", resumable=True, help="learning-rate schedule after warmup")
    warmup_steps: int = option(0, resumable=True, minimum=0, help="linear warmup steps")
    warmup_ratio: float = option(0.0, resumable=True, minimum=0.0, help="warmup as a fraction of the run's optimizer "
                                                                       "steps (rounded up, as Hugging Face's Trainer), "
                                                                       "where train.warmup_steps is 0")
    grad_clip: float = option(0.0, resumable=True, minimum=0.0, help="clip the global gradient norm to this; 0 = off (the "
                                                     "paper-era runs clipped nothing; the reference code now "
                                                     "clips at 1.0)")
    precision: Literal["fp32", "bf16", "fp16"] = option("fp32", help="training precision (the paper: fp32)")
    peak_tflops: Optional[float] = option(None, resumable=True, above=0.0,
                                          help="the device's peak dense TFLOPS at train.precision, for the model "
                                               "FLOPs utilization (MFU) logged beside tokens/s; null: from icot's "
                                               "table of known GPUs (icot/flops.py), none on a CPU or unknown card")
    zero_stage: Literal[0, 1, 2, 3] = option(0, help="DeepSpeed ZeRO stage")
    offload: bool = option(False, help="offload optimizer state (ZeRO 2-3) and parameters (ZeRO 3) to the CPU")
    seed: int = option(42, help="seed of the initial weights, the data order and dropout")
    threads: Optional[int] = option(None, resumable=True, minimum=1,
                                    help="torch threads of the stage process (intra-op); null: torch's default "
                                         "(OMP_NUM_THREADS where set), or half the CPU cores each while icot "
                                         "pipeline trains the no-CoT baseline beside the other stages. Two "
                                         "trainings on a small CPU: one thread each, or a step runs many times "
                                         "slower")
    log_every: int = option(10, resumable=True, minimum=1, help="optimizer steps between log lines and TensorBoard points")
    eval_every: int = option(0, resumable=True, minimum=0, help="optimizer steps between validations; 0: at the end only")
    eval_each_epoch: bool = option(False, resumable=True, help="also validate at the end of every epoch")
    eval_examples: int = option(256, resumable=True, minimum=0, help="validation examples decoded for accuracy at each validation")
    save_every: int = option(0, resumable=True, minimum=0, help="optimizer steps between checkpoints; 0: at the end and on "
                                                "a stop signal only")
    keep_last: int = option(2, resumable=True, minimum=1, help="checkpoints kept in <stage>/ckpt")
    export_each_epoch: bool = option(False, resumable=True, help="also export after every epoch, into <stage>/exports/epoch<N> "
                                                 "(validated there), so a later stage can read 'epoch N' or 'best'")
    export_epochs: list[int] = option(resumable=True, factory=list, help="also export after these epochs (counted from 1), "
                                                         "into <stage>/exports/epoch<N>; e.g. 6,7")
    export_best: bool = option(False, resumable=True, help="also keep the export of the best validation so far in "
                                                           "<stage>/exports/best (what is best is the stage's: "
                                                           "accuracy, else loss)")
    export_every: int = option(0, resumable=True, minimum=0, help="also export every N optimizer steps, into "
                                                  "<stage>/exports/step<N>; 0: off")
    resume: str = option("auto", resumable=True, help="auto: from the newest complete checkpoint in <stage>/ckpt; never: from "
                                      "step 0; or a checkpoint folder")
    ds_config: Optional[str] = option(None, resumable=True, path=True, help="a DeepSpeed JSON file to start from (e.g. ds_configs/*.json); "
                                                 "icot fills and checks the keys it owns")


@dataclass
class DemoConfig:
    """The data `icot demo` generates for a recipe (its `demo:` section; no stage reads it)."""

    digits_a: int = option(3, minimum=2, help="digits of the first operand")
    digits_b: int = option(2, minimum=2, help="digits of the second operand")
    layout: Literal["paper", "final_sum", "columns"] = option("columns", help="the CoT's layout (icot data multiply)")
    train: int = option(70_000, minimum=1, help="training lines")
    valid: int = option(500, minimum=1, help="validation lines")
    test: int = option(1000, minimum=0, help="test lines, generated where no official test file is found")
    seed: int = option(0, minimum=0, help="seed of the generated data")
    official_test: Optional[str] = option(None, help="the official test file, relative to the reference data "
                                                     "folder (e.g. 4_by_4_mult/test_bigbench.txt); the generated "
                                                     "splits share no pair with it")


@dataclass
class InputConfig:
    dir: Optional[str] = option(None, path=True, help="read this stage folder instead of the one in run_dir")
    export: ExportChoice = option(LAST, help="which of its exports: last, best (on validation), 'epoch N' or "
                                             "'step N' (kept with train.export_each_epoch / export_every)")


@dataclass
class StageConfig:
    """The sections every stage has; `config_class(stage)` adds its inputs and its method's section."""

    stage: str
    run_dir: str = option("runs/icot", resumable=True, help="the run folder: each stage writes <run_dir>/<stage>/")
    model: ModelConfig = section(ModelConfig, "the decoder")
    data: DataConfig = section(DataConfig, "data files and tokenization")
    train: TrainConfig = section(TrainConfig, "optimisation, DeepSpeed, logging and checkpoints")


@functools.cache
def config_class(stage: str) -> type:
    """The config dataclass of one stage: StageConfig + `inputs` (when it reads earlier stages) + the
    section of its method (when the method declares one) and of each method it `uses`."""
    spec = registry.get_stage(stage)
    fields = []
    if spec.reads:
        inputs = dataclasses.make_dataclass(
            f"{_camel(stage)}Inputs",
            [(role, InputConfig, field(default_factory=InputConfig,
                                       metadata={"help": f"the {source} stage this stage reads as its {role}"}))
             for role, source in spec.reads.items()])
        fields.append(("inputs", inputs, section(inputs, "the earlier stages this stage reads")))
    method = registry.get_method(spec.method)
    for name in (method.name, *method.uses):
        owner = registry.get_method(name)
        if owner.section is not None:
            fields.append((name, owner.section, section(owner.section, f"{owner.title} options")))
    if not fields:
        return StageConfig
    return dataclasses.make_dataclass(f"{_camel(stage)}Config", fields, bases=(StageConfig,))


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def stage_config(stage: str, **values) -> StageConfig:
    """A stage's config from Python (defaults for what is not given)."""
    return config_class(stage)(stage=stage, **values)


# --------------------------------------------------------------------------------------------------
# Raw trees: nested dicts whose leaves are the text of one value and where it came from.


@dataclass
class Raw:
    value: Union[str, None, list]  # text; None for a YAML null; a list of Raw for a YAML sequence
    where: str  # "recipe.yaml:12" or "command line"
    quoted: bool = False  # a quoted YAML string is kept verbatim, never read as null


_NULL_WORDS = ("null", "none", "~")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def _read_yaml(path: str) -> dict:
    """Parse a YAML file into a raw tree without PyYAML's scalar type guessing."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror}") from None
    try:
        node = yaml.compose(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        raise UserError(f"{path}:{mark.line + 1}: invalid YAML: {err.problem}") from None
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise UserError(f"{path}:{node.start_mark.line + 1}: a recipe must be a mapping of sections")
    return _raw_node(node, path, "")


def _raw_node(node: yaml.Node, path: str, key: str):
    where = f"{path}:{node.start_mark.line + 1}"
    if isinstance(node, yaml.MappingNode):
        tree = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not name:
                raise UserError(f"{path}:{key_node.start_mark.line + 1}: keys must be plain names")
            dotted = f"{key}.{name}" if key else name
            if name in tree:
                raise UserError(f"{path}:{key_node.start_mark.line + 1}: duplicate key '{dotted}'")
            tree[name] = _raw_node(value_node, path, dotted)
        return tree
    if isinstance(node, yaml.SequenceNode):
        return Raw([_raw_node(item, path, key) for item in node.value], where)
    if isinstance(node, yaml.ScalarNode):
        plain = node.style is None
        if plain and node.value.lower() in ("", "null", "~"):
            return Raw(None, where)
        return Raw(node.value, where, quoted=not plain)
    raise UserError(f"{where}: unsupported YAML value for '{key}'")


def _parse_overrides(overrides: list[str]) -> tuple[dict, str | None]:
    """`--a.b=v` / `--a.b v` / bare `--flag` (true) into a raw tree, plus the `--config` path if given."""
    tree: dict = {}
    recipe = None
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--") or len(token) == 2:
            raise UserError(f"command line: unexpected argument '{token}' (expected --key=value)")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
                value = overrides[i + 1]
                i += 1
            else:
                value = None  # a bare flag: only valid for booleans, checked on conversion
        i += 1
        if key == "config":
            if value is None:
                raise UserError("command line: --config needs a recipe path")
            recipe = value
            continue
        _insert(tree, key.split("."), Raw(value, "command line"), key)
    return tree, recipe


def _insert(tree: dict, parts: list[str], leaf: Raw, key: str) -> None:
    for depth, part in enumerate(parts):
        if not part:
            raise UserError(f"command line: malformed key '--{key}'")
        if depth == len(parts) - 1:
            tree[part] = leaf
        else:
            tree = tree.setdefault(part, {})
            if not isinstance(tree, dict):
                raise UserError(f"command line: '--{'.'.join(parts[:depth + 1])}' is set as a value and a section")


def _merge(base: dict, top: dict) -> dict:
    """Deep merge of raw trees: mappings merge, values replace."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# Conversion by declared type.


def _unwrap_optional(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        rest = args[0] if len(args) == 1 else Union[tuple(args)]
        return rest, len(args) < len(typing.get_args(tp))
    return tp, False


class _Mismatch(Exception):
    """A value that does not convert to a type; the message says what was expected."""


def _convert(raw: Raw, tp, key: str, flag: str):
    """Text (or a YAML list) to the declared type; `flag` is how the key is written in messages."""
    base, optional = _unwrap_optional(tp)
    value = raw.value
    if value is None and raw.where == "command line" and base is bool:
        return True  # `--train.offload` alone means true
    if value is None or (optional and not raw.quoted and isinstance(value, str) and value.lower() in _NULL_WORDS):
        if optional:
            return None
        raise _bad(raw, type_name(base), flag)
    try:
        return _convert_value(raw, base, key, flag)
    except _Mismatch as mismatch:
        raise _bad(raw, str(mismatch), flag) from None


def _bad(raw: Raw, expected: str, flag: str) -> UserError:
    value = raw.value
    if value is None:
        shown = "no value" if raw.where == "command line" else "null"
    else:
        shown = "a list" if isinstance(value, list) else repr(value)
    return UserError(f"{raw.where}: {flag}: expected {expected}, got {shown}")


def _convert_value(raw: Raw, base, key: str, flag: str):
    value = raw.value
    origin = typing.get_origin(base)
    if origin is list:
        (item_type,) = typing.get_args(base)
        items = value if isinstance(value, list) else [
            Raw(part.strip(), raw.where) for part in value.strip().strip("[]").split(",") if part.strip()]
        return [_convert(item, item_type, key, flag) for item in items]
    if isinstance(value, list):
        raise _Mismatch(type_name(base))
    if origin is Union:   # e.g. `dynamic` or an integer: the first alternative that takes the text
        for alternative in typing.get_args(base):
            try:
                return _convert_value(raw, alternative, key, flag)
            except _Mismatch:
                continue
        raise _Mismatch(type_name(base))
    if origin is Literal:
        for choice in typing.get_args(base):
            if value == str(choice):
                return choice
        raise _Mismatch(type_name(base))
    if hasattr(base, "from_text"):
        try:
            return base.from_text(value)
        except ValueError as err:
            raise _Mismatch(str(err).removeprefix("expected ")) from None
    if base is str:
        return value
    if base is bool:
        if value.lower() in _TRUE_WORDS:
            return True
        if value.lower() in _FALSE_WORDS:
            return False
        raise _Mismatch("true or false")
    if base is int:
        if value.strip().lstrip("+-").isdigit():
            return int(value)
        number = _to_float(value)
        if number is not None and number.is_integer():  # `1e4` steps is a fine way to write 10000
            return int(number)
        raise _Mismatch("an integer")
    if base is float:
        number = _to_float(value)
        if number is None:
            raise _Mismatch("a number")
        return number
    raise TypeError(f"config field {key} has unsupported type {base}")


def _to_float(text: str) -> float | None:
    special = {".inf": float("inf"), "+.inf": float("inf"), "-.inf": float("-inf"), ".nan": float("nan")}
    if text.lower() in special:
        return special[text.lower()]
    try:
        return float(text)
    except ValueError:
        return None


def type_name(tp) -> str:
    """How a type is written in messages and help: `a number`, `one of constant, linear, cosine`, ..."""
    base, optional = _unwrap_optional(tp)
    if optional:
        return f"{type_name(base)} or null"
    origin = typing.get_origin(base)
    if origin is list:
        return "a list"
    if origin is Literal:
        choices = typing.get_args(base)
        return repr(choices[0]) if len(choices) == 1 else "one of " + ", ".join(str(c) for c in choices)
    if origin is Union:
        return " or ".join(type_name(a) for a in typing.get_args(base))
    if hasattr(base, "from_text"):
        return getattr(base, "DESCRIPTION", base.__name__)
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[base]


def _validate_value(value, f: dataclasses.Field, raw: Raw, flag: str) -> None:
    meta = f.metadata
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and math.isnan(value):
        raise UserError(f"{raw.where}: {flag}: must be a number, got nan")
    if number and math.isinf(value) and not meta.get("infinite"):
        raise UserError(f"{raw.where}: {flag}: must be finite, got {value}")
    minimum, above = meta.get("minimum"), meta.get("above")
    if minimum is not None and number and value < minimum:
        raise UserError(f"{raw.where}: {flag}: must be at least {minimum}, got {value}")
    if above is not None and number and value <= above:
        raise UserError(f"{raw.where}: {flag}: must be greater than {above}, got {value}")
    if meta.get("check") is not None:
        problem = meta["check"](value)
        if problem:
            raise UserError(f"{raw.where}: {flag}: {problem}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Building a dataclass from a raw tree, rejecting unknown keys with a suggestion.


def _fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, (_, tp) in _fields(cls).items():
        dotted = prefix + name
        keys.append(dotted)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, dotted + "."))
    return keys


def _flag(dotted: str, raw_or_tree) -> str:
    """How a key is named in messages: `--train.lr` for the command line, `train.lr` in a file."""
    where = raw_or_tree.where if isinstance(raw_or_tree, Raw) else _first_where(raw_or_tree)
    return f"--{dotted}" if where == "command line" else dotted


def _first_where(tree) -> str:
    if isinstance(tree, Raw):
        return tree.where
    for value in tree.values():
        return _first_where(value)
    return "config"


def _unknown(dotted: str, value, valid: list[str], prefix: str, root_cls) -> UserError:
    """An unknown-key error suggesting the closest key at that level, or a same-named key elsewhere."""
    flag = _flag(dotted, value)
    hint = difflib.get_close_matches(dotted, [prefix + v for v in valid], n=1, cutoff=0.6)
    if not hint:  # e.g. `lr` at the top level: point at `train.lr`
        base = ".".join(dotted.split(".")[:2]) + "." if dotted.startswith("stages.") else ""
        name = dotted.rsplit(".", 1)[-1]
        hint = [base + k for k in _all_keys(root_cls) if k.rsplit(".", 1)[-1] == name and k != "stage"]
    suggestion = f"; did you mean '{_flag(hint[0], value)}'?" if hint else ""
    return UserError(f"{_first_where(value)}: unknown key '{flag}'{suggestion}")


def _build(cls, tree: dict, prefix: str, root_cls=None, **fixed):
    """Instantiate `cls` from a raw tree: defaults for absent keys, converted and validated values."""
    root_cls = root_cls or cls
    fields = _fields(cls)
    kwargs = dict(fixed)
    for name, value in tree.items():
        dotted = prefix + name
        if name not in fields or name in fixed:
            raise _unknown(dotted, value, [n for n in fields if n not in fixed], prefix, root_cls)
        f, tp = fields[name]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, Raw) and value.value is None:
                value = {}  # `train:` with nothing under it
            if not isinstance(value, dict):
                raise UserError(f"{value.where}: {_flag(dotted, value)}: expected a section (a mapping of keys)")
            kwargs[name] = _build(tp, value, dotted + ".", root_cls)
        else:
            if isinstance(value, dict):
                raise UserError(f"{_first_where(value)}: {_flag(dotted, value)}: expected a value, not a section")
            kwargs[name] = _convert(value, tp, dotted, _flag(dotted, value))
            _validate_value(kwargs[name], f, value, _flag(dotted, value))
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# A recipe's layers, and what of them belongs to one stage.


def _as_mapping(value, key: str) -> dict:
    if isinstance(value, Raw) and value.value is None:
        return {}
    if isinstance(value, Raw):
        raise UserError(f"{value.where}: {key}: expected a mapping")
    return dict(value)


def _split_stages(tree: dict) -> tuple[dict, dict]:
    """Separate the `stages:` mapping from the shared sections, checking the stage names."""
    tree = dict(tree)
    stages = tree.pop("stages", {})
    if isinstance(stages, Raw) and stages.value is None:
        stages = {}
    if isinstance(stages, Raw):
        raise UserError(f"{stages.where}: stages: expected a mapping of stage name -> sections")
    stages = dict(stages)
    names = registry.stage_names()
    for name, sections in stages.items():
        if name not in names:
            raise _unknown(f"stages.{name}", sections, names, "stages.", StageConfig)
        if isinstance(sections, Raw) and sections.value is None:
            stages[name] = {}
        elif not isinstance(sections, dict):
            raise UserError(f"{sections.where}: stages.{name}: expected sections such as train: or model:")
    return tree, stages


def _check_stage_key(tree: dict, stage: str) -> dict:
    """A resolved config names its stage; loading it for another stage is a mistake."""
    tree = dict(tree)
    raw = tree.pop("stage", None)
    if raw is None:
        return tree
    if not isinstance(raw, Raw) or raw.value != stage:
        shown = raw.value if isinstance(raw, Raw) else "a section"
        where = raw.where if isinstance(raw, Raw) else _first_where(raw)
        raise UserError(f"{where}: this config is for stage '{shown}', not '{stage}' "
                        f"(the stage comes from the command)")
    return tree


def _method_sections() -> dict[str, type]:
    return {m.name: m.section for m in registry.methods() if m.section is not None}


def _only_for(tree: dict, stage: str) -> dict:
    """The part of a shared layer that stage `stage` reads, after checking the rest: the other methods'
    sections (each against its own class), `methods:` and the input roles of other stages."""
    spec = registry.get_stage(stage)
    tree = dict(tree)
    if "method" in tree:
        sections = ", ".join(f"{name}:" for name in _method_sections())
        raise UserError(f"{_first_where(tree['method'])}: the 'method:' section is now named after its method "
                        f"({sections}); rename it")
    _parse_methods(tree.pop("methods", None))
    if "demo" in tree:
        _build(DemoConfig, _as_mapping(tree.pop("demo"), "demo"), "demo.")
    own_sections = (spec.method, *registry.get_method(spec.method).uses)
    for name, cls in _method_sections().items():
        if name in tree and name not in own_sections:
            _build(cls, _as_mapping(tree.pop(name), name), f"{name}.")
    if "inputs" in tree:
        roles = {role for other in registry.stages() for role in other.reads}
        inputs = _as_mapping(tree.pop("inputs"), "inputs")
        for role, value in inputs.items():
            if role not in roles:
                raise _unknown(f"inputs.{role}", value, sorted(roles), "inputs.", StageConfig)
            _build(InputConfig, _as_mapping(value, f"inputs.{role}"), f"inputs.{role}.")
        mine = {role: value for role, value in inputs.items() if role in spec.reads}
        if mine:
            tree["inputs"] = mine
    return tree


def _parse_methods(raw) -> list[str] | None:
    """`methods:` (a list of registered method names) or None when absent."""
    if raw is None:
        return None
    if isinstance(raw, dict):
        raise UserError(f"{_first_where(raw)}: methods: expected a list of method names")
    names = _convert(raw, list[str], "methods", _flag("methods", raw))
    known = registry.method_names()
    for name in names:
        if name not in known:
            raise UserError(f"{raw.where}: {_flag('methods', raw)}: unknown method {name!r}; "
                            f"registered: {', '.join(known)}")
    if not names:
        raise UserError(f"{raw.where}: {_flag('methods', raw)}: name at least one method")
    return names


def _layers(recipe_path: str | None, overrides: list[str] | None) -> tuple[list[dict], str | None]:
    """The raw trees of the recipe and the command line, in merge order, and the recipe path."""
    cli_tree, cli_recipe = _parse_overrides(list(overrides or []))
    if cli_recipe and recipe_path and Path(cli_recipe) != Path(recipe_path):
        raise UserError(f"two recipes given: {recipe_path} and --config {cli_recipe}")
    recipe_path = cli_recipe or recipe_path
    file_tree = _read_yaml(recipe_path) if recipe_path else {}
    return [file_tree, cli_tree], recipe_path


def _check_consistency(config: StageConfig) -> None:
    train = config.train
    if train.offload and train.zero_stage < 2:
        raise UserError(f"train.offload needs train.zero_stage 2 or 3, got {train.zero_stage}")
    if train.micro_batch_size is not None and train.micro_batch_size > train.batch_size:
        raise UserError(f"train.micro_batch_size ({train.micro_batch_size}) exceeds "
                        f"train.batch_size ({train.batch_size})")


def load_stage_config(stage: str, recipe_path: str | None = None, overrides: list[str] | None = None) -> StageConfig:
    """The config of one stage: defaults <- recipe <- recipe stages[stage] <- command line."""
    cls = config_class(registry.get_stage(stage).name)
    trees, _ = _layers(recipe_path, overrides)
    layers = []
    for tree in trees:
        shared, stages = _split_stages(_check_stage_key(tree, stage))
        for name, sections in stages.items():  # validate every stage's overrides, not only this one's
            _build(config_class(name), sections, f"stages.{name}.", stage=name)
        layers += [_only_for(shared, stage), stages.get(stage, {})]
    merged: dict = {}
    for layer in layers:
        merged = _merge(merged, layer)
    config = _build(cls, merged, "", stage=stage)
    _check_consistency(config)
    return config


def load_demo(recipe_path: str, changes: dict[str, str] | None = None) -> DemoConfig:
    """The `demo:` section of a recipe (defaults where it has none), with command-line `changes`."""
    tree = _as_mapping(_read_yaml(recipe_path).get("demo", {}), "demo")
    tree.update({key: Raw(value, "command line") for key, value in (changes or {}).items()})
    return _build(DemoConfig, tree, "demo.")


def load_methods(recipe_path: str | None = None, overrides: list[str] | None = None) -> list[str]:
    """The methods a run trains: `methods:` from the command line, else the recipe, else the default
    ones (`Method.default`)."""
    chosen = None
    for tree in _layers(recipe_path, overrides)[0]:
        chosen = _parse_methods(tree.get("methods")) or chosen
    return list(dict.fromkeys(chosen)) if chosen else [m.name for m in registry.methods() if m.default]


# --------------------------------------------------------------------------------------------------
# Resolved configs: the record of a run.


def _upgrade_legacy(tree: dict, stage: str) -> dict:
    """A resolved config written before methods had their own sections: `method:` becomes the stage's
    method section (`delta: first_column` is 0), `<role>_dir` becomes `inputs.<role>.dir`."""
    spec = registry.get_stage(stage)
    tree = dict(tree)
    legacy = tree.pop("method", None)
    method = registry.get_method(spec.method)
    if isinstance(legacy, dict) and method.section is not None and method.name not in tree:
        legacy = dict(legacy)
        delta = legacy.get("delta")
        if isinstance(delta, Raw) and delta.value == "first_column":
            legacy["delta"] = Raw("0", delta.where)
        known = {f.name for f in dataclasses.fields(method.section)}
        tree[method.name] = {key: value for key, value in legacy.items() if key in known}
    for key in [k for k in tree if k.endswith("_dir") and k != "run_dir"]:
        value = tree.pop(key)
        role = key[:-len("_dir")]
        if role in spec.reads and isinstance(value, Raw) and value.value is not None:
            tree.setdefault("inputs", {}).setdefault(role, {})["dir"] = value
    return tree


def load_resolved(path: str) -> StageConfig:
    """Load a config written by `save_resolved` (its stage is read from the file)."""
    tree = _read_yaml(path)
    stage = tree.get("stage")
    if not isinstance(stage, Raw) or not isinstance(stage.value, str):
        raise UserError(f"{path}: not a resolved stage config (no 'stage:' key)")
    tree = _upgrade_legacy(tree, stage.value)
    config = _build(config_class(registry.get_stage(stage.value).name), _check_stage_key(tree, stage.value), "",
                    stage=stage.value)
    _check_consistency(config)
    return config


def config_to_dict(config) -> dict:
    """Nested plain data (what `save_resolved` writes): typed values such as export choices as text."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list):
        return [config_to_dict(item) for item in config]
    if isinstance(config, ExportChoice):
        return str(config)
    return config


class _Dumper(yaml.SafeDumper):
    """Quotes strings that would read back as null, so a saved config loads back unchanged."""


def _represent_str(dumper: yaml.SafeDumper, text: str):
    style = "'" if text.lower() in _NULL_WORDS or text == "" else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_config(config) -> str:
    return yaml.dump(config_to_dict(config), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def path_keys(cls, prefix: str = "") -> set[str]:
    """Dotted keys of the fields that name a local file or folder (`option(path=True)`)."""
    keys = set()
    for name, (f, tp) in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            keys |= path_keys(tp, f"{prefix}{name}.")
        elif f.metadata.get("path"):
            keys.add(prefix + name)
    return keys


def resolved_path(value: str | None) -> str | None:
    """A local path made absolute (from the current folder) and normalised; anything else as it is (a hub
    name in model.name_or_path)."""
    if value is None or not os.path.exists(os.path.expanduser(value)):
        return value
    return os.path.realpath(os.path.expanduser(value))


def with_absolute_paths(config):
    """`config` (a section or a whole stage config) with every local path it names made absolute: what a
    stage records, so that a job started from another folder, or the same folder spelled otherwise, resumes
    it (`icot.resume.config_changes` compares paths as paths)."""
    changes = {}
    for name, (f, tp) in _fields(type(config)).items():
        value = getattr(config, name)
        if dataclasses.is_dataclass(tp):
            changes[name] = with_absolute_paths(value)
        elif f.metadata.get("path"):
            changes[name] = resolved_path(value)
    return dataclasses.replace(config, **changes)


def save_resolved(config: StageConfig, path: str | Path) -> None:
    """Write the full resolved config: the record of the run, loadable with `load_resolved`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(config), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Help: every key of a stage with its type, default and meaning.


def describe_keys(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) of every value a config class holds, sections expanded."""
    rows = []
    defaults = cls(stage="") if cls is StageConfig or issubclass(cls, StageConfig) else cls()
    for name, (f, tp) in _fields(cls).items():
        if name == "stage":
            continue
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_keys(tp, f"{prefix}{name}."))
            continue
        default = config_to_dict(getattr(defaults, name))
        shown = ("null" if default is None else str(default).lower() if isinstance(default, bool)
                 else ",".join(map(str, default)) if isinstance(default, list) else str(default))
        text = f.metadata.get("help", "") + ("; may change when a run resumes" if f.metadata.get("resumable") else "")
        rows.append((prefix + name, type_name(tp), shown, text))
    return rows


def config_help(stage: str) -> str:
    """The `icot train STAGE --help` text."""
    spec = registry.get_stage(stage)
    method = registry.get_method(spec.method)
    lines = [f"icot train {stage}: {spec.title}",
             f"  method: {method.title}" + (" (shared by every method)" if method.shared else ""),
             f"  reads: {', '.join(f'{source} (as {role})' for role, source in spec.reads.items()) or 'nothing'}",
             f"  writes: <run_dir>/{stage}/" + (f"; evaluated as mode '{spec.mode.name}'" if spec.mode else ""),
             "",
             f"usage: icot train {stage} --config RECIPE [--key=value ...]",
             f"  A key applies to every stage; --stages.{stage}.<key> (or stages: {stage}: in the recipe) to this",
             "  stage only. `icot config --config RECIPE` prints every stage's resolved config.",
             ""]
    import textwrap

    for key, kind, default, text in describe_keys(config_class(stage)):
        lines.append(f"  {key}: {kind}, default {default}")
        lines.extend(textwrap.wrap(text, 96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Stage folder layout.


@dataclass(frozen=True)
class Paths:
    """`<run_dir>/<stage>/`: everything one stage writes."""

    root: Path

    @classmethod
    def of(cls, config: StageConfig) -> "Paths":
        return cls.for_stage(config.run_dir, config.stage)

    @classmethod
    def for_stage(cls, run_dir: str | Path, stage: str) -> "Paths":
        return cls(Path(run_dir) / stage)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def ds_config(self) -> Path:
        return self.root / "ds_config.json"

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"
