"""tools/gpu_check.sh, shortened (ICOT_CHECK_SHORT=1), on the CPU: every step runs and the summary holds
the device, the bench table and the results table of a bf16, ZeRO-2, activation-checkpointed pipeline."""

from __future__ import annotations

import json
import subprocess

from tests.train_fixtures import ROOT, icot_env


def test_the_gpu_check_runs_shortened_on_a_cpu(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), str(out)], cwd=tmp_path,
                            env=icot_env(ICOT_CHECK_SHORT="1", DS_ACCELERATOR="cpu", TORCH_CUDA_ARCH_LIST="8.0;9.0a+PTX"),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # DeepSpeed's FusedAdam build cannot parse architecture suffixes; the script drops them first.
    assert "TORCH_CUDA_ARCH_LIST '8.0;9.0a+PTX' without its suffixes" in result.stdout
    summary = (out / "summary.md").read_text()
    assert "torch" in summary and "(CPU)" in summary and "TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX" in summary
    assert "implicit / no_cot, batch 1" in summary and "icot/hand" in summary
    assert "| Implicit CoT (emulator + student) |" in summary and "| coupling | 4 |" in summary
    bench = json.loads((out / "bench.json").read_text())
    assert set(bench["tasks"]) == {"4x4", "5x5"}
    for stage in ("teacher", "coupling"):
        ds_config = json.loads((out / "run" / stage / "ds_config.json").read_text())
        assert ds_config["zero_optimization"]["stage"] == 2 and ds_config["bf16"]["enabled"] is True
    assert "gradient_checkpointing: true" in (out / "run/teacher/config.yaml").read_text()
