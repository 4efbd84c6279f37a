"""tools/gpu_check.sh, shortened (ICOT_CHECK_SHORT=1), on the CPU: every step runs; the summary holds the
device, the bench table (every mode eager and compiled) and the results tables of a bf16, ZeRO-2,
activation-checkpointed pipeline of every method and of the shortened Bai et al. reproduction; one JSON
holds the figures (tokens/s and MFU figures of every stage, ms a token of every mode)."""

from __future__ import annotations

import json
import subprocess

from icot import registry
from icot.bench import timed_modes
from tests.train_fixtures import ROOT, icot_env


def test_the_gpu_check_runs_shortened_on_a_cpu(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), str(out)], cwd=tmp_path,
                            env=icot_env(ICOT_CHECK_SHORT="1", DS_ACCELERATOR="cpu", TORCH_CUDA_ARCH_LIST="8.0;9.0a+PTX"),
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # DeepSpeed's FusedAdam build cannot parse architecture suffixes; the script drops them first.
    assert "TORCH_CUDA_ARCH_LIST '8.0;9.0a+PTX' without its suffixes" in result.stdout
    summary = (out / "summary.md").read_text()
    assert "torch" in summary and "(CPU)" in summary and "TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX" in summary
    assert "implicit / no_cot, batch 1" in summary and "icot/hand" in summary
    assert "implicit_compiled / implicit, batch 1" in summary
    assert "| Implicit CoT (emulator + student) |" in summary and "| coupling | 4 |" in summary
    assert "| Stepwise internalization (ICoT-SI) |" in summary and "Bai et al." in summary

    bench = json.loads((out / "bench.json").read_text())
    assert set(bench["tasks"]) == {"4x4"}
    timed = {mode.name for mode in timed_modes()}
    assert {f"{mode}_compiled" for mode in timed} <= set(bench["tasks"]["4x4"]["inference"]["ms_per_token"])
    for stage in ("teacher", "coupling", "stepwise", "coconut", "codi"):
        ds_config = json.loads((out / "run" / stage / "ds_config.json").read_text())
        assert ds_config["zero_optimization"]["stage"] == 2 and ds_config["bf16"]["enabled"] is True
        assert "gradient_checkpointing: true" in (out / "run" / stage / "config.yaml").read_text()

    figures = json.loads((out / "figures.json").read_text())
    assert "(CPU)" in figures["device"]
    every_stage = [spec.name for spec in registry.plan(["icot_kd", "stepwise", "coconut", "codi"])]
    assert sorted(figures["methods"]["stages"]) == sorted(every_stage)
    for name, stage in figures["methods"]["stages"].items():
        assert stage["steps"] == 4 and stage["tokens_per_s"] > 0 and stage["samples_per_s"] > 0, name
        assert "mfu" not in stage   # no peak is known for a CPU
    assert set(figures["methods"]["modes"]) == timed   # the pipeline's methods: the four without SIM-CoT
    assert sorted(figures["reproduction"]["stages"]) == ["no_cot", "stepwise", "teacher"]
    assert set(figures["reproduction"]["modes"]) == {"no_cot", "explicit", "stepwise"}
    # The reproduction keeps its recipe's model (2 layers of the recipe, here overridden to 1 x 32 for the CPU).
    assert "layers: 1" in (out / "repro/run/stepwise/config.yaml").read_text()
    assert figures["bench"]["tasks"]["4x4"]["ms_per_token"]["no_cot_compiled"]["1"] > 0
