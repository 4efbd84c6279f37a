"""Typed stage configuration: dataclasses, a YAML recipe, dotted command-line overrides.

One stage's configuration is merged, later layers winning, from:

    dataclass defaults <- recipe (shared sections) <- recipe `stages.<stage>`
                       <- command line (shared)     <- command line `--stages.<stage>.*`

Every value arrives as text (YAML scalars are read as raw text, not through PyYAML's type guessing,
which reads `1e-4` as a string and `007` as 7) and is converted by the type its field declares.
Unknown keys and wrong types stop the run with a one-line `UserError` naming the dotted key and where
it came from (`recipe.yaml:12` or `command line`). The resolved config is saved beside the run, and
loads back to an equal config.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from icot.errors import UserError

STAGES = ("teacher", "no_cot", "mind_reading", "emulation", "coupling")


def _field(default=None, *, factory=None, choices=None, minimum=None, check=None):
    """A dataclass field whose metadata the loader validates: allowed values, a lower bound, a check."""
    meta = {"choices": choices, "minimum": minimum, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _check_delta(value: str) -> str | None:
    if value in ("dynamic", "first_column") or re.fullmatch(r"\d+", value):
        return None
    return "expected 'dynamic', 'first_column' or a non-negative integer"


def _check_betas(value: list) -> str | None:
    if len(value) == 2 and all(0.0 <= b < 1.0 for b in value):
        return None
    return "expected two numbers in [0, 1), e.g. 0.9,0.999"


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None  # a local Hugging Face folder; None builds `family` from scratch
    family: str = _field("gpt2", choices=("gpt2", "llama", "mistral", "qwen2"))
    layers: int = _field(4, minimum=1)
    hidden: int = _field(128, minimum=1)
    heads: int = _field(4, minimum=1)
    kv_heads: Optional[int] = _field(None, minimum=1)
    intermediate: Optional[int] = _field(None, minimum=1)
    max_positions: int = _field(512, minimum=1)
    dropout: float = _field(0.0, minimum=0.0)
    tokenizer: Optional[str] = None
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    train: Optional[str] = None
    valid: Optional[str] = None
    test: Optional[str] = None
    max_train_examples: Optional[int] = _field(None, minimum=0)
    max_eval_examples: Optional[int] = _field(None, minimum=0)
    max_length: int = _field(1024, minimum=1)
    num_proc: int = _field(1, minimum=1)
    skip_bad_lines: bool = False
    cache_dir: Optional[str] = None


@dataclass
class TrainConfig:
    lr: float = _field(5e-5, minimum=0.0)
    weight_decay: float = _field(0.01, minimum=0.0)
    betas: list[float] = _field(factory=lambda: [0.9, 0.999], check=_check_betas)
    eps: float = _field(1e-8, minimum=0.0)
    batch_size: int = _field(32, minimum=1)  # global: micro x accumulation x world size
    micro_batch_size: Optional[int] = _field(None, minimum=1)  # per rank; None: batch_size / world size
    epochs: float = _field(1.0, minimum=0.0)
    max_steps: Optional[int] = _field(None, minimum=0)
    schedule: str = _field("constant", choices=("constant", "linear", "cosine"))
    warmup_steps: int = _field(0, minimum=0)
    grad_clip: float = _field(0.0, minimum=0.0)  # 0 = off (the paper's runs had no effective clipping)
    precision: str = _field("fp32", choices=("fp32", "bf16", "fp16"))
    zero_stage: int = _field(0, choices=(0, 1, 2, 3))
    offload: bool = False
    seed: int = 42
    log_every: int = _field(10, minimum=1)
    eval_every: int = _field(0, minimum=0)
    eval_examples: int = _field(256, minimum=0)
    save_every: int = _field(0, minimum=0)
    keep_last: int = _field(2, minimum=1)
    resume: str = "auto"  # auto | never | a checkpoint path
    ds_config: Optional[str] = None  # a DeepSpeed template (path or ds_configs/ name) replacing the default


@dataclass
class MethodConfig:
    delta: str = _field("dynamic", check=_check_delta)
    mixture: str = _field("none", choices=("none", "token"))
    mixture_temperature: float = _field(0.05, minimum=0.0)
    mixture_loss_weight: float = _field(1.0, minimum=0.0)
    init_from_teacher: bool = False
    teacher_state_cache: bool = False   # mind_reading / emulation: teacher states computed once, not per step
    freeze: str = _field("none", choices=("none", "student", "emulator"))


@dataclass
class StageConfig:
    stage: str
    run_dir: str = "runs/icot"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    teacher_dir: Optional[str] = None
    student_dir: Optional[str] = None
    emulator_dir: Optional[str] = None


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
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _convert(raw: Raw, tp, key: str, flag: str):
    """Text (or a YAML list) to the declared type; `flag` is how the key is written in messages."""
    base, optional = _unwrap_optional(tp)
    value = raw.value

    def bad(expected: str):
        if value is None:
            shown = "no value" if raw.where == "command line" else "null"
        else:
            shown = "a list" if isinstance(value, list) else repr(value)
        return UserError(f"{raw.where}: {flag}: expected {expected}, got {shown}")

    if value is None and raw.where == "command line" and base is bool:
        return True  # `--train.offload` alone means true
    if value is None:
        if optional:
            return None
        raise bad(_type_name(base))
    if optional and not raw.quoted and isinstance(value, str) and value.lower() in _NULL_WORDS:
        return None
    if typing.get_origin(base) is list:
        (item_type,) = typing.get_args(base)
        items = value if isinstance(value, list) else [
            Raw(part.strip(), raw.where) for part in value.strip().strip("[]").split(",") if part.strip()]
        return [_convert(item, item_type, key, flag) for item in items]
    if isinstance(value, list):
        raise bad(_type_name(base))
    if base is str:
        return value
    if base is bool:
        if value.lower() in _TRUE_WORDS:
            return True
        if value.lower() in _FALSE_WORDS:
            return False
        raise bad("true or false")
    if base is int:
        if value.strip().lstrip("+-").isdigit():
            return int(value)
        number = _to_float(value)
        if number is not None and number.is_integer():  # `1e4` steps is a fine way to write 10000
            return int(number)
        raise bad("an integer")
    if base is float:
        number = _to_float(value)
        if number is None:
            raise bad("a number")
        return number
    raise TypeError(f"config field {key} has unsupported type {tp}")


def _to_float(text: str) -> float | None:
    special = {".inf": float("inf"), "+.inf": float("inf"), "-.inf": float("-inf"), ".nan": float("nan")}
    if text.lower() in special:
        return special[text.lower()]
    try:
        return float(text)
    except ValueError:
        return None


def _type_name(tp) -> str:
    if typing.get_origin(tp) is list:
        return "a list"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[tp]


def _validate_value(value, f: dataclasses.Field, raw: Raw, flag: str) -> None:
    meta = f.metadata
    if value is None:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        options = ", ".join(str(c) for c in meta["choices"])
        raise UserError(f"{raw.where}: {flag}: {value!r} is not one of {options}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise UserError(f"{raw.where}: {flag}: must be at least {meta['minimum']}, got {value}")
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


def _unknown(dotted: str, value, valid: list[str], prefix: str) -> UserError:
    """An unknown-key error suggesting the closest key at that level, or a same-named key elsewhere."""
    flag = _flag(dotted, value)
    hint = difflib.get_close_matches(dotted, [prefix + v for v in valid], n=1, cutoff=0.6)
    if not hint:  # e.g. `lr` at the top level: point at `train.lr`
        base = ".".join(dotted.split(".")[:2]) + "." if dotted.startswith("stages.") else ""
        name = dotted.rsplit(".", 1)[-1]
        hint = [base + k for k in _all_keys(StageConfig) if k.rsplit(".", 1)[-1] == name and k != "stage"]
    suggestion = f"; did you mean '{_flag(hint[0], value)}'?" if hint else ""
    return UserError(f"{_first_where(value)}: unknown key '{flag}'{suggestion}")


def _build(cls, tree: dict, prefix: str, **fixed):
    """Instantiate `cls` from a raw tree: defaults for absent keys, converted and validated values."""
    fields = _fields(cls)
    kwargs = dict(fixed)
    for name, value in tree.items():
        dotted = prefix + name
        if name not in fields or name in fixed:
            raise _unknown(dotted, value, [n for n in fields if n not in fixed], prefix)
        f, tp = fields[name]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, Raw) and value.value is None:
                value = {}  # `train:` with nothing under it
            if not isinstance(value, dict):
                raise UserError(f"{value.where}: {_flag(dotted, value)}: expected a section (a mapping of keys)")
            kwargs[name] = _build(tp, value, dotted + ".")
        else:
            if isinstance(value, dict):
                raise UserError(f"{_first_where(value)}: {_flag(dotted, value)}: expected a value, not a section")
            kwargs[name] = _convert(value, tp, dotted, _flag(dotted, value))
            _validate_value(kwargs[name], f, value, _flag(dotted, value))
    return cls(**kwargs)


def _split_stages(tree: dict) -> tuple[dict, dict]:
    """Separate the `stages:` mapping from the shared sections, checking the stage names."""
    tree = dict(tree)
    stages = tree.pop("stages", {})
    if isinstance(stages, Raw) and stages.value is None:
        stages = {}
    if isinstance(stages, Raw):
        raise UserError(f"{stages.where}: stages: expected a mapping of stage name -> sections")
    stages = dict(stages)
    for name, sections in stages.items():
        if name not in STAGES:
            raise _unknown(f"stages.{name}", sections, list(STAGES), "stages.")
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


def _check_consistency(config: StageConfig) -> None:
    train = config.train
    if train.offload and train.zero_stage < 2:
        raise UserError(f"train.offload needs train.zero_stage 2 or 3, got {train.zero_stage}")
    if train.micro_batch_size is not None and train.micro_batch_size > train.batch_size:
        raise UserError(f"train.micro_batch_size ({train.micro_batch_size}) exceeds "
                        f"train.batch_size ({train.batch_size})")


def load_stage_config(stage: str, recipe_path: str | None = None, overrides: list[str] | None = None) -> StageConfig:
    """The config of one stage: defaults <- recipe <- recipe stages[stage] <- command line."""
    if stage not in STAGES:
        hint = difflib.get_close_matches(stage, STAGES, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        raise UserError(f"unknown stage '{stage}' (stages: {', '.join(STAGES)}){suggestion}")
    cli_tree, cli_recipe = _parse_overrides(list(overrides or []))
    if cli_recipe and recipe_path and Path(cli_recipe) != Path(recipe_path):
        raise UserError(f"two recipes given: {recipe_path} and --config {cli_recipe}")
    recipe_path = cli_recipe or recipe_path
    file_tree = _read_yaml(recipe_path) if recipe_path else {}

    layers = []
    for tree in (file_tree, cli_tree):
        shared, stages = _split_stages(_check_stage_key(tree, stage))
        for name, sections in stages.items():  # validate every stage's overrides, not only this one's
            _build(StageConfig, sections, f"stages.{name}.", stage=name)
        layers += [shared, stages.get(stage, {})]
    merged: dict = {}
    for layer in layers:
        merged = _merge(merged, layer)
    config = _build(StageConfig, merged, "", stage=stage)
    _check_consistency(config)
    return config


def load_resolved(path: str) -> StageConfig:
    """Load a config written by `save_resolved` (its stage is read from the file)."""
    tree = _read_yaml(path)
    stage = tree.get("stage")
    if not isinstance(stage, Raw) or not isinstance(stage.value, str):
        raise UserError(f"{path}: not a resolved stage config (no 'stage:' key)")
    return load_stage_config(stage.value, path, [])


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


class _Dumper(yaml.SafeDumper):
    """Quotes strings that would read back as null, so a saved config loads back unchanged."""


def _represent_str(dumper: yaml.SafeDumper, text: str):
    style = "'" if text.lower() in _NULL_WORDS or text == "" else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)


def save_resolved(config: StageConfig, path: str | Path) -> None:
    """Write the full resolved config: the record of the run, loadable with `load_resolved`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(config_to_dict(config), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    path.write_text(text, encoding="utf-8")


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
