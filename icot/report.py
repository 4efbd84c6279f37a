"""The results of a run: every mode evaluated on the test file, and `results.md`, `results.json` and
`results.png` (accuracy against throughput, and the validation curves of the stages)."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from icot import registry


@dataclass
class StageRun:
    name: str
    steps: int
    work: float = 0.0     # relative cost of the whole stage (see Stage.work_per_step); 0 where unknown
    seconds: float = 0.0
    skipped: bool = False
    beside: bool = False  # ran beside the stages in sequence


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def completed_stage(folder: Path) -> StageRun:
    """A stage finished by an earlier invocation, as its manifest records it."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        manifest = {}
    return StageRun(folder.name, int(manifest.get("steps", 0)), seconds=stage_seconds(manifest), skipped=True)


def stage_seconds(manifest: dict) -> float:
    """The stage's training time as its manifest records it: the loop's, summed over every process it ran
    in (`train_seconds`; older manifests: the last process's `wall_seconds`)."""
    return float(manifest.get("train_seconds", manifest.get("wall_seconds", 0.0)))


def recorded_seconds(folder: Path) -> float:
    """`stage_seconds` of a completed stage folder (0 where it has no manifest)."""
    try:
        return stage_seconds(json.loads((folder / "manifest.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0.0


def evaluate_all(run_dir: Path, modes: list[str], data: str, batch_size: int,
                 max_examples: int | None) -> dict[str, dict]:
    """Each mode on `data`, by the one harness, one after the other on this machine."""
    from icot.evaluate import evaluate_mode

    results = {}
    for mode in modes:
        print(f"[icot pipeline] evaluating {mode} on {data}", flush=True)
        results[mode] = evaluate_mode(mode, run_dir, data, batch_sizes=(1, batch_size), max_examples=max_examples)
    return results


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what `platform` knows) and the widest vector
    unit torch's CPU kernels use here (AVX2, AVX512, ...): same-commit timings and round-off differ with both."""
    import torch

    name = cpuinfo_model_name() or platform.processor() or platform.machine()
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def cpuinfo_model_name(path: str = "/proc/cpuinfo") -> str | None:
    """The first `model name` line of /proc/cpuinfo; None where the file is absent (not Linux) or names none."""
    if not os.path.exists(path):
        return None
    with open(path) as cpuinfo:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)


def machine_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"CPU {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def mode_title(mode: str) -> str:
    return registry.get_mode(mode)[0].title


def write_results(run_dir: Path, stages: list[StageRun], evaluation: dict[str, dict], data: str,
                  total_seconds: float) -> None:
    results = {
        "machine": machine_description(),
        "test_data": data,
        "modes": evaluation,
        "stages": {s.name: {"steps": s.steps, "seconds": round(s.seconds, 3), "skipped": s.skipped, "beside": s.beside}
                   for s in stages},
        "wall_seconds": round(total_seconds, 1),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# icot results: {run_dir}", "", f"Machine: {results['machine']}. Test data: `{data}`.", "",
             "| mode | accuracy | token accuracy | examples/s (batch 1) | examples/s (batched) |",
             "|---|---|---|---|---|"]
    for mode, r in evaluation.items():
        lines.append(f"| {mode_title(mode)} | {100 * r['accuracy']:.1f}% | {100 * r['token_accuracy']:.1f}% | "
                     f"{r['examples_per_s_batch1']:.1f} | {r['examples_per_s_batched']:.1f} "
                     f"(batch {r['batch_size']}) |")
    lines += unfinished_notes(evaluation)
    lines += ["", "| stage | steps | wall time |", "|---|---|---|"]
    for s in stages:
        threads = stage_threads(run_dir / s.name)
        where = f", {threads} thread{'s' * (threads != 1)}" if threads else ""
        note = " (earlier run)" if s.skipped else f" (beside the other stages{where})" if s.beside else ""
        lines.append(f"| {s.name} | {s.steps} | {format_seconds(s.seconds)}{note} |")
    lines += ["", f"Total wall time of this invocation: {format_seconds(total_seconds)}.", ""]
    (run_dir / "results.md").write_text("\n".join(lines))
    plot_results(run_dir, stages, evaluation)


def unfinished_notes(evaluation: dict[str, dict]) -> list[str]:
    """A line under the table for every mode whose export stopped before its curriculum's end."""
    notes = [f"{mode_title(mode)}: {r['unfinished']}." for mode, r in evaluation.items() if r.get("unfinished")]
    return ["", *notes] if notes else []


def stage_threads(stage_folder: Path) -> int | None:
    """The torch threads a finished stage trained with (its manifest's record; None before it was kept)."""
    try:
        return json.loads((stage_folder / "manifest.json").read_text()).get("threads")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def scalar_curve(stage_folder: Path, tag: str = "valid/accuracy") -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard scalar of a stage; empty where the stage logged none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (stage_folder / "tb").is_dir():
        return []
    events = EventAccumulator(str(stage_folder / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags().get("scalars", []):
        return []
    return [(e.step, e.value) for e in events.Scalars(tag)]


def curriculum_changes(stage_folder: Path, stage: str) -> list[tuple[int, float]]:
    """(step, new level) wherever the stage's curriculum moved on (a stepwise removal, a Coconut stage), at
    the resolution of its logged steps (train.log_every)."""
    scalar = registry.get_stage(stage).load().curriculum_scalar
    if scalar is None:
        return []
    curve = scalar_curve(stage_folder, f"train/{scalar}")
    return [(step, value) for (_, before), (step, value) in zip(curve, curve[1:]) if value != before]


def plot_validation_curves(axis, run_dir: Path, stages: list[str]) -> None:
    """Each stage's validation accuracy against its optimizer steps, with a dotted line (in its colour)
    wherever its curriculum moved on: a user sees where a removal or a stage lost the answer and when it
    came back."""
    for name in stages:
        curve = scalar_curve(run_dir / name)
        if not curve:
            continue
        steps, values = zip(*curve)
        line, = axis.plot(steps, [100 * v for v in values], marker="o", markersize=3, label=name)
        for step, _ in curriculum_changes(run_dir / name, name):
            axis.axvline(step, color=line.get_color(), linestyle=":", linewidth=0.8, alpha=0.6)
    axis.set_xlabel("optimizer step (dotted: the curriculum moves on)")
    axis.set_ylabel("validation accuracy (%)")
    axis.set_ylim(-5, 105)
    axis.set_title("validation accuracy during training")
    if axis.lines:
        axis.legend(fontsize=8)


def plot_results(run_dir: Path, stages: list[StageRun], evaluation: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, r in evaluation.items():
        left.scatter(r["examples_per_s_batch1"], 100 * r["accuracy"], s=60, label=mode_title(mode))
        left.annotate(f"{100 * r['accuracy']:.0f}%", (r["examples_per_s_batch1"], 100 * r["accuracy"]),
                      textcoords="offset points", xytext=(6, 4))
    left.set_xlabel("examples/s (batch 1)")
    left.set_ylabel("test accuracy (%)")
    left.set_ylim(-5, 105)
    left.set_title("accuracy vs throughput")
    left.legend(fontsize=8)
    plot_validation_curves(right, run_dir, [s.name for s in stages])
    figure.tight_layout()
    figure.savefig(run_dir / "results.png", dpi=110)
    plt.close(figure)
