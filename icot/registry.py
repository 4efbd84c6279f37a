"""The method registry: every stage and evaluation mode of icot is declared here once, by its method.

A method is a folder (`icot/methods/<name>/`) whose `__init__.py` declares a `Method`: its stages, in
the order they run, and for each stage its class, the earlier stages it reads (under a role name the
stage's code uses), the data views its batches hold, the evaluation mode it serves, and the method's
own config section. The CLI, the config loader, `icot pipeline` (order, skipping, the time estimate),
`icot eval` (modes), the results table and plot and the SLURM submission all read this registry; no
other list of stage or mode names exists.

Methods come from three places, in this order: the built-in ones (`icot.methods`), installed packages
declaring the entry point group `icot.methods`, and the modules named in the environment variable
`ICOT_PLUGINS` (comma-separated, e.g. `ICOT_PLUGINS=my_lab.fast_icot`). A plug-in module calls
`register(Method(...))` when imported. Classes are named as `"package.module:Class"` strings and
imported only when used, so `icot --help` and the SLURM submission stay fast.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from icot.errors import UserError

PLUGINS_VARIABLE = "ICOT_PLUGINS"
ENTRY_POINT_GROUP = "icot.methods"
VIEWS = ("cot", "nocot", "prompt", "cot_removed")   # icot.data.collate.view_ids
# Words a stage or method may not be called: pipeline steps and the recipe's own top-level keys.
RESERVED = ("eval", "run_dir", "model", "data", "train", "inputs", "stages", "methods", "stage", "all")


@dataclass(frozen=True)
class Mode:
    """An evaluation mode: how `icot eval` loads and decodes the export of the stage that serves it."""

    name: str       # `icot eval --mode NAME`
    title: str      # its row in the results table
    view: str       # the view whose reference continuation is generated and teacher-forced (cot, nocot, cot_removed)
    model: str      # "package.module:Class" of its `icot.evaluate.ModeModel` subclass


@dataclass(frozen=True)
class StageSpec:
    """One training stage: `icot train NAME` writes `<run_dir>/NAME/`."""

    name: str
    stage: str                                   # "package.module:Class" of its `icot.stage.Stage` subclass
    title: str                                   # one line for `--help` and `icot stages`
    reads: Mapping[str, str] = field(default_factory=dict)   # input role -> the stage whose export it reads
    views: tuple[str, ...] = ()                  # the views each training batch holds
    mode: Mode | None = None                     # the evaluation mode its export serves
    method: str = ""                             # the declaring method (set by `register`)

    def load(self):
        """The stage class."""
        return load_object(self.stage)


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    stages: tuple[StageSpec, ...]
    section: type | None = None   # the dataclass of its options: the recipe section named after the method
    shared: bool = False          # its stages belong to every method's run (the teacher, the no-CoT baseline)
    default: bool = False         # run when a recipe names no `methods:`
    demo: str | None = None       # the recipe of `icot demo --method NAME`, in icot/recipes/
    # Other methods whose sections its stages read beside its own: a variant of them (SIM-CoT over Coconut
    # reads `coconut:`, so the plain and the supervised run of one recipe share one curriculum).
    uses: tuple[str, ...] = ()


_METHODS: dict[str, Method] = {}
_STAGES: dict[str, StageSpec] = {}
_MODES: dict[str, tuple[Mode, StageSpec]] = {}
_LOADED = False


def register(method: Method) -> Method:
    """Add a method; its stage, mode and section names must be new. Returns it with `method` filled in
    on every stage."""
    problems = []
    if method.name in _METHODS:
        problems.append(f"method {method.name!r} is already registered")
    if method.name in RESERVED:
        problems.append(f"{method.name!r} is a reserved word ({', '.join(RESERVED)})")
    if not method.stages:
        problems.append("it declares no stage")
    for name in method.uses:
        if name not in _METHODS or _METHODS[name].section is None:
            problems.append(f"it uses the section of {name!r}, which no registered method declares")
    names = [spec.name for spec in method.stages]
    for spec in method.stages:
        if spec.name in _STAGES or names.count(spec.name) > 1:
            problems.append(f"stage {spec.name!r} is declared twice")
        if spec.name in RESERVED:
            problems.append(f"stage name {spec.name!r} is a reserved word")
        unknown = [view for view in spec.views if view not in VIEWS]
        if unknown:
            problems.append(f"stage {spec.name!r}: unknown views {unknown} (views: {', '.join(VIEWS)})")
        for role, source in spec.reads.items():
            earlier = names[:names.index(spec.name)]
            if source not in _STAGES and source not in earlier:
                problems.append(f"stage {spec.name!r} reads {source!r} ({role}), which no earlier stage is")
        if spec.mode is not None:
            if spec.mode.name in _MODES:
                problems.append(f"mode {spec.mode.name!r} is declared twice")
            if spec.mode.view not in ("cot", "nocot", "cot_removed"):
                problems.append(f"mode {spec.mode.name!r}: view must be 'cot', 'nocot' or 'cot_removed'")
    if problems:
        raise UserError(f"cannot register method {method.name!r}: {'; '.join(problems)}")
    method = replace(method, stages=tuple(replace(spec, method=method.name) for spec in method.stages))
    _METHODS[method.name] = method
    for spec in method.stages:
        _STAGES[spec.name] = spec
        if spec.mode is not None:
            _MODES[spec.mode.name] = (spec.mode, spec)
    return method


def _ensure_loaded() -> None:
    """Import the built-in methods, then the installed and named plug-ins (once per process)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    importlib.import_module("icot.methods")
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
    for module in filter(None, (name.strip() for name in os.environ.get(PLUGINS_VARIABLE, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UserError(f"{PLUGINS_VARIABLE}: cannot import {module!r} ({err})") from None


def load_object(path: str) -> Any:
    """`"package.module:Name"` -> the object."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# -- lookups ---------------------------------------------------------------------------------------


def methods() -> list[Method]:
    _ensure_loaded()
    return list(_METHODS.values())


def method_names(include_shared: bool = False) -> list[str]:
    return [m.name for m in methods() if include_shared or not m.shared]


def get_method(name: str) -> Method:
    _ensure_loaded()
    if name not in _METHODS:
        raise UserError(f"unknown method {name!r}; registered: {', '.join(method_names())}")
    return _METHODS[name]


def stages() -> list[StageSpec]:
    """Every registered stage, shared ones first, each method's in its declared order."""
    _ensure_loaded()
    ordered = [m for m in _METHODS.values() if m.shared] + [m for m in _METHODS.values() if not m.shared]
    return [spec for m in ordered for spec in m.stages]


def stage_names() -> list[str]:
    return [spec.name for spec in stages()]


def get_stage(name: str) -> StageSpec:
    _ensure_loaded()
    if name not in _STAGES:
        import difflib

        hint = difflib.get_close_matches(name, list(_STAGES), n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        raise UserError(f"unknown stage '{name}' (stages: {', '.join(stage_names())}){suggestion}")
    return _STAGES[name]


def modes() -> list[Mode]:
    return [spec.mode for spec in stages() if spec.mode is not None]


def mode_names() -> list[str]:
    return [mode.name for mode in modes()]


def get_mode(name: str) -> tuple[Mode, StageSpec]:
    """The mode and the stage whose export it evaluates."""
    _ensure_loaded()
    if name not in _MODES:
        raise UserError(f"unknown mode {name!r}; choose one of {', '.join(mode_names())}")
    return _MODES[name]


def plan(method_list: list[str] | tuple[str, ...]) -> list[StageSpec]:
    """The stages a run of these methods trains, in order: the shared stages, then each method's."""
    chosen = [get_method(name) for name in method_list]
    shared = [m for m in methods() if m.shared]
    seen: dict[str, StageSpec] = {}
    for m in shared + [m for m in chosen if not m.shared]:
        for spec in m.stages:
            seen.setdefault(spec.name, spec)
    return list(seen.values())


def readers_of(name: str) -> list[StageSpec]:
    """The stages that read stage `name`'s export."""
    return [spec for spec in stages() if name in spec.reads.values()]
