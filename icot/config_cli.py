"""`icot config` (a recipe's resolved config, stage by stage) and `icot stages` (what a recipe trains)."""

from __future__ import annotations

import argparse

from icot import registry
from icot.config import dump_config, load_methods, load_stage_config
from icot.errors import UserError
from icot.train import split_recipe


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def config_cli(overrides: list[str]) -> None:
    """`icot config --config RECIPE [--stage S] [--key=value ...]`: the YAML each stage would record."""
    parser = _Parser(prog="icot config", description="Print the resolved config of every stage a recipe "
                                                     "trains (or of one), after the --key=value overrides. "
                                                     "`icot train STAGE --help` explains every key.")
    parser.add_argument("--stage", help="one stage only (any registered stage)")
    args, rest = parser.parse_known_args(overrides)
    recipe, rest = split_recipe(rest)
    names = [args.stage] if args.stage else [spec.name for spec in registry.plan(load_methods(recipe, rest))]
    for name in names:
        print(f"# ---- {name}: {registry.get_stage(name).title}")
        print(dump_config(load_stage_config(name, recipe, rest)))


def stages_cli(overrides: list[str]) -> None:
    """`icot stages [--config RECIPE] [--format table|tsv]`: the run's stages in order. tsv lines are
    `stage<TAB>method<TAB>the stages it reads (space separated)<TAB>mode`, `-` where there are none, for
    scripts (the SLURM submission builds its dependency chain from them)."""
    parser = _Parser(prog="icot stages", description="The stages a recipe trains, in order (without a "
                                                     "recipe: its default methods; --all: every registered stage).")
    parser.add_argument("--format", choices=("table", "tsv"), default="table")
    parser.add_argument("--all", action="store_true", help="every registered stage")
    args, rest = parser.parse_known_args(overrides)
    recipe, rest = split_recipe(rest)
    plan = registry.stages() if args.all else registry.plan(load_methods(recipe, rest))
    for spec in plan:
        reads = " ".join(dict.fromkeys(spec.reads.values()))
        mode = spec.mode.name if spec.mode else ""
        if args.format == "tsv":
            print("\t".join((spec.name, spec.method, reads or "-", mode or "-")))
        else:
            print(f"{spec.name:14s} {spec.method:10s} reads: {reads or '-':24s} mode: {mode or '-':10s} {spec.title}")
