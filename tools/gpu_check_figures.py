"""tools/gpu_check.sh's one JSON of figures: the device, the bench (every mode eager and compiled), each
method's stages (tokens/s, samples/s, model TFLOPS, MFU) with its evaluation, and the shortened Bai et
al. reproduction, from the files the check wrote under OUT. A part that did not run is null.

    python tools/gpu_check_figures.py OUT        writes OUT/figures.json and prints its summary
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_figures(run: Path) -> dict | None:
    """Each trained stage's throughput (its manifest's) and the run's evaluation of every mode."""
    if not run.is_dir():
        return None
    stages = {}
    for manifest_path in sorted(run.glob("*/manifest.json")):
        manifest = read_json(manifest_path) or {}
        if "stage" in manifest:
            throughput = manifest.get("throughput", {})
            seconds = throughput.get("step_seconds") or 0
            stages[manifest["stage"]] = {"method": manifest.get("method"), "steps": manifest.get("steps"),
                                         "steps_per_s": manifest["steps"] / seconds if seconds else None,
                                         **throughput}
    results = read_json(run / "results.json") or {}
    modes = {mode: {key: entry.get(key) for key in ("accuracy", "token_accuracy", "examples_per_s_batch1",
                                                       "examples_per_s_batched", "examples")}
             for mode, entry in results.get("modes", {}).items()}
    return {"stages": stages, "modes": modes}


def bench_figures(bench: dict | None) -> dict | None:
    if bench is None:
        return None
    tasks = {}
    for task, entry in bench.get("tasks", {}).items():
        inference = entry["inference"]
        tasks[task] = {"new_tokens": entry["new_tokens"], "ms_per_token": inference.get("ms_per_token"),
                       "examples_per_s": inference["examples_per_s"], "ratios": bench["ratios"]["inference"][task]}
    return {"tasks": tasks, "training_step": bench["ratios"].get("train_step"), "goals": bench.get("goals"),
            "timing_basis": bench.get("timing_basis")}


def main(out: Path) -> dict:
    figures = {
        "device": (out / "device.txt").read_text() if (out / "device.txt").is_file() else None,
        "bench": bench_figures(read_json(out / "bench.json")),
        "methods": stage_figures(out / "run"),
        "reproduction": stage_figures(out / "repro/run"),
    }
    (out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def summary(figures: dict) -> str:
    lines = []
    for task, entry in ((figures.get("bench") or {}).get("tasks") or {}).items():
        per_token = entry.get("ms_per_token") or {}
        for mode in ("no_cot", "implicit", "stepwise", "coconut", "codi"):
            eager, compiled = per_token.get(mode, {}).get("1"), per_token.get(f"{mode}_compiled", {}).get("1")
            if eager is not None:
                lines.append(f"bench {task} {mode}: {eager:.3f} ms/token eager, "
                             + (f"{compiled:.3f} compiled" if compiled is not None else "no compiled figure")
                             + " (batch 1)")
    for part in ("methods", "reproduction"):
        entry = figures.get(part) or {}
        for stage, values in (entry.get("stages") or {}).items():
            mfu = values.get("mfu")
            lines.append(f"{part} {stage}: {values.get('tokens_per_s', 0):.0f} tokens/s, "
                         f"{values.get('samples_per_s', 0):.1f} samples/s, "
                         + (f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a"))
        for mode, values in (entry.get("modes") or {}).items():
            if values.get("accuracy") is not None:
                lines.append(f"{part} eval {mode}: accuracy {100 * values['accuracy']:.1f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(main(Path(sys.argv[1]))))
