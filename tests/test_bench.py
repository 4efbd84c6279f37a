"""`icot bench` end to end with tiny shapes: it runs, forces the real lengths, and writes every ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from icot.bench import build_task, parse_task
from icot.errors import UserError


def test_task_lengths_come_from_rendered_lines():
    task = build_task("4x4", examples=3, seed=0)
    # ` a a a a * b b b b <sep>`, then `#### 8 digits <sep>`; the CoT of 4x4 is 46 words.
    assert task.prompt_len == 10
    # Every registered mode, by its view: stepwise internalization, Coconut and CODI write `<sep> #### 8
    # digits <sep>`; Coconut's reference-code decoding is timed on the same length.
    assert task.new_tokens == {"no_cot": 10, "explicit": 57, "implicit": 10, "stepwise": 11, "coconut": 11,
                               "coconut_reference": 11, "codi": 11}
    assert len(task.features) == 3 and task.cot_view_length == 67
    with pytest.raises(UserError, match="expected shapes like 4x4"):
        parse_task("4by4")
    with pytest.raises(UserError, match="digits must be between"):
        parse_task("1x4")


def test_bench_writes_every_ratio(tmp_path):
    out = tmp_path / "docs" / "bench.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "icot", "bench", "--task", "2x2,4x4", "--layers", "2", "--hidden", "32",
               "--heads", "2", "--vocab", "0", "--examples", "4", "--batch_size", "2", "--repeats", "1",
               "--train_batch", "4", "--train_steps", "1", "--train_warmup", "1", "--tiny_layers", "1",
               "--tiny_hidden", "16", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    for task in ("2x2", "4x4"):
        ratios = report["ratios"]["inference"][task]
        modes = ("no_cot", "explicit", "implicit", "stepwise", "coconut", "codi")
        assert set(ratios) == {f"{mode}_over_{reference}_{size}" for mode in ("implicit", "stepwise", "coconut", "codi")
                               for reference in ("no_cot", "explicit") for size in ("batch1", "batched")} | {
            "coconut_batched_over_reference_batch1", "coconut_batch1_over_reference_batch1"} | {
            f"{mode}_compiled_over_{mode}_{size}" for mode in modes for size in ("batch1", "batched")} | {
            f"{mode}_compiled_over_no_cot_compiled_batch1" for mode in modes if mode != "no_cot"} | {
            "no_cot_compiled_ms_per_token_batch1", "implicit_compiled_ms_per_token_batch1"}
        assert all(value > 0 for value in ratios.values())
        eps = report["tasks"][task]["inference"]["examples_per_s"]
        # Every mode eager and compiled (a static KV cache and a compiled step), and Coconut's reference scheme.
        assert set(eps) == {*modes, *(f"{mode}_compiled" for mode in modes), "coconut_reference"}
        assert all(set(v) == {"1", "2"} for v in eps.values())
        per_token = report["tasks"][task]["inference"]["ms_per_token"]
        assert set(per_token) == set(eps) and all(value["1"] > 0 for value in per_token.values())
        assert "ms_per_example" in report["tasks"][task]["profile"]["implicit"]["1"]
    assert set(report["ratios"]["train_step"]) == {"tiny", "2x32"}
    for entry in report["training"].values():
        assert set(entry["ms_per_step"]) == {"hand_step", "icot_strategy_step", "icot_trainer_step"}
    names = {check["name"] for check in report["goals"]}
    assert not any("ms_per_token" in name for name in names)   # the decoding-overhead goals are a GPU's
    assert "implicit_over_explicit_batch1 (4x4)" in names and "implicit_over_explicit_batch1 (2x2)" not in names
    assert "coconut_batched_over_reference_batch1 (4x4)" in names
    assert {"train_step_ratio (tiny)", "train_step_ratio (2x32)"} <= names
    assert "implicit / no_cot, batch 1" in proc.stdout and "icot/hand" in proc.stdout


def test_machine_names_the_cpu_model_and_its_vector_unit():
    """Same-commit timings and round-off differ between CPUs: results and bench JSON name both."""
    import torch

    from icot.bench import machine_info
    from icot.report import machine_description

    capability = f"({torch.backends.cpu.get_cpu_capability()})"
    assert machine_info()["processor"].endswith(capability)
    if not torch.cuda.is_available():
        assert capability in machine_description()


def test_cpu_model_name_comes_from_cpuinfo_and_is_none_without_it(tmp_path):
    from icot.report import cpuinfo_model_name

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: avx2\n")
    assert cpuinfo_model_name(str(cpuinfo)) == "AMD EPYC 7B13"
    cpuinfo.write_text("processor\t: 0\nflags\t: neon\n")
    assert cpuinfo_model_name(str(cpuinfo)) is None
    assert cpuinfo_model_name(str(tmp_path / "absent")) is None


def test_divergence_gap_finds_where_two_decodings_part_and_their_logit_gap():
    import contextlib

    import torch

    from icot.bench import NEAR_TIE, Shape, _batches, divergence_gap, random_decoder
    from icot.models.generation import lean_greedy

    task = build_task("2x2", examples=2, seed=0)
    decoder = random_decoder(Shape("t", "gpt2", layers=2, hidden=32, heads=2, vocab=0), task.tokenizer, seed=0)
    decoder.eval()
    batch = _batches(task, 2, "cpu")[0]
    reference = lean_greedy(decoder, batch, 4, task.separator_id)
    prompt = set(batch["input_ids"].flatten().tolist()) | set(reference.flatten().tolist())
    twin = next(t for t in range(len(task.tokenizer)) if t not in prompt and t != task.separator_id)
    with torch.no_grad():   # another token whose logits equal the chosen one's: an exact tie
        decoder.get_output_embeddings().weight[twin] = decoder.get_output_embeddings().weight[reference[1, 2]]

    other = reference.clone()
    other[0, 3], other[1, 2] = twin, twin   # row 1 parts first, at token 2
    row, step, gap, scale = divergence_gap(decoder, batch, reference, other, contextlib.nullcontext)
    assert (row, step) == (1, 2) and gap <= NEAR_TIE * scale

    # A different token: the gap is the two logits' difference after the shared prefix, computed by hand.
    other[1, 2] = (int(reference[1, 2]) + 1) % twin
    row, step, gap, scale = divergence_gap(decoder, batch, reference, other, contextlib.nullcontext)
    ids = torch.cat((batch["input_ids"][1:], reference[1:, :2]), dim=1)
    mask = torch.cat((batch["attention_mask"][1:], torch.ones(1, 2, dtype=torch.long)), dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = decoder(input_ids=ids, attention_mask=mask, position_ids=positions).logits[0, -1]
    expected = (logits[reference[1, 2]] - logits[other[1, 2]]).abs().item()
    assert (row, step) == (1, 2) and abs(gap - expected) < 1e-5 and gap > NEAR_TIE * scale


def test_bench_trains_every_method_and_reports_throughput_per_stage(tmp_path):
    """`--methods`: every method's stages trained by the real trainer at the shape; each stage's tokens/s,
    samples/s, model TFLOPS and (with a peak given) MFU, as its manifest records them."""
    from icot import registry

    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "icot", "bench", "--layers", "2", "--hidden", "32", "--heads", "2",
               "--skip_inference", "--skip_train", "--methods", "--method_steps", "2", "--method_batch", "4",
               "--peak_tflops", "1.5", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    stages = report["methods"]["stages"]
    assert list(stages) == [spec.name for spec in registry.plan(["icot_kd", "stepwise", "coconut", "codi"])]
    for name, entry in stages.items():
        assert entry["steps"] == 2 and entry["tokens"] > 0, name
        assert entry["tokens_per_s"] > 0 and entry["samples_per_s"] > 0, name
        assert entry["mfu"] == pytest.approx(entry["model_tflops_per_device"] / 1.5), name
    table = proc.stdout.split("training throughput per stage")[1]
    assert all(f" {name} " in table for name in stages)
