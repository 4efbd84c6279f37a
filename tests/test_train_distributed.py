"""Two ranks (`torchrun --nproc_per_node 2 -m icot train ...`, gloo on CPU) against one rank.

- Teacher and coupling stages under ZeRO 0, 2 and 3 on two ranks log the same per-step train/loss
  (read back from TensorBoard) as one rank with the same global batch. The one-rank reference is the
  shared five-stage GPT-2 run (ZeRO 0): global batch 16, micro batch 8, so one rank accumulates two
  micro batches and two ranks take one each, and every loss term sees the same examples.
  Tolerance (fp32; only the order of summation differs): rel 1e-5 on train/loss (observed: identical
  at float32), on train/grad_norm (DeepSpeed's own norm under ZeRO 2 / 3 against the plain one; observed
  <= 1.2e-7) and on valid/loss (observed <= 1e-7); the same validation token and exact-match accuracy.
- A tiny Llama saved to a local folder trains the mind-reading stage on two ranks under ZeRO-3: the
  teacher export and the student (`--model.name_or_path`, the same folder) load partitioned through the
  scoped HfDeepSpeedConfig, the teacher runs as a frozen ZeRO-3 engine, the student export loads.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

pytest.register_assert_rewrite("tests.train_fixtures")
pytest_plugins = ["tests.train_fixtures"]  # the session fixtures (five-stage runs), shared with other modules

from tests.train_fixtures import read_scalars, run_train, stage_folder_problems  # noqa: E402

REL = 1e-5


def compare_to_one_rank(one: dict, two: dict, label: str) -> None:
    loss_1, loss_2 = dict(one["train/loss"]), dict(two["train/loss"])
    assert sorted(loss_2) == sorted(loss_1) == [1, 2, 3, 4], label
    for step in loss_1:
        assert loss_2[step] == pytest.approx(loss_1[step], rel=REL), (label, step, loss_1, loss_2)
    for tag, tolerance in (("train/grad_norm", dict(rel=REL)), ("valid/loss", dict(rel=REL)),
                           ("valid/token_accuracy", dict(abs=1e-9)), ("valid/accuracy", dict(abs=1e-9))):
        want, got = dict(one[tag]), dict(two[tag])
        assert sorted(got) == sorted(want), (label, tag)
        for step in want:
            assert got[step] == pytest.approx(want[step], **tolerance), (label, tag, step, want, got)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
@pytest.mark.parametrize("stage", ["teacher", "coupling"])
def test_two_ranks_match_one_rank(gpt2_chain, stage, zero_stage):
    folder = gpt2_chain.parent
    run_dir = f"two-ranks-zero{zero_stage}"
    inputs = ([f"--inputs.student.dir={gpt2_chain / 'mind_reading'}", f"--inputs.emulator.dir={gpt2_chain / 'emulation'}"]
              if stage == "coupling" else [])
    run_train(folder, stage, folder / "recipe.yaml", f"--run_dir={run_dir}", f"--train.zero_stage={zero_stage}",
              *inputs, nproc=2)
    root = folder / run_dir / stage
    assert stage_folder_problems(root, stage) == []
    assert json.loads((root / "manifest.json").read_text())["world_size"] == 2
    ds_config = json.loads((root / "ds_config.json").read_text())
    assert (ds_config["zero_optimization"]["stage"], ds_config["train_micro_batch_size_per_gpu"],
            ds_config["gradient_accumulation_steps"], ds_config["train_batch_size"]) == (zero_stage, 8, 1, 16)
    compare_to_one_rank(read_scalars(gpt2_chain / stage / "tb"), read_scalars(root / "tb"),
                        f"{stage} zero {zero_stage}")


def test_llama_from_a_local_folder_mind_reading_zero3(llama_chain):
    from icot.models.io import load_component

    folder = llama_chain.parent
    teacher = llama_chain / "teacher"
    result = run_train(folder, "mind_reading", folder / "recipe.yaml", "--run_dir=zero3", "--train.zero_stage=3",
                       f"--inputs.teacher.dir={teacher}", f"--model.name_or_path={teacher / 'export'}", nproc=2)
    root = folder / "zero3" / "mind_reading"
    assert stage_folder_problems(root, "mind_reading") == []

    # Partitioned at load (zero.Init under the scoped HfDeepSpeedConfig): the frozen teacher and the student
    # decoder, each split in two; and the teacher engine is a frozen ZeRO-3 engine.
    loads = re.findall(r"\[icot\] loaded LlamaForCausalLM under ZeRO-3: (\d+) of (\d+) parameters partitioned "
                       r"by ZeRO-3, ([\d,]+) of ([\d,]+) elements held here", result.stdout)
    frozen = re.findall(r"\[icot\] frozen LlamaForCausalLM engine: (\d+) of (\d+) parameters partitioned by "
                        r"ZeRO-3, ([\d,]+) of ([\d,]+) elements held here", result.stdout)
    assert len(loads) == 2 and len(frozen) == 1, result.stdout[-3000:]
    for parted, total, held, full in loads + frozen:
        held, full = int(held.replace(",", "")), int(full.replace(",", ""))
        # Each rank holds ceil(numel / 2) of every parameter: about half of the whole.
        assert parted == total and 0 < 2 * held <= full + int(parted), (parted, total, held, full)

    losses = [value for _, value in read_scalars(root / "tb")["train/loss"]]
    assert len(losses) == 4 and all(math.isfinite(value) for value in losses), losses
    student = load_component(root / "export", expect="student")
    assert type(student.decoder).__name__ == "LlamaForCausalLM"
    state = student.state_dict()
    assert all(torch.isfinite(t).all() for t in state.values())
    # The student started from the teacher's weights and trained: its decoder moved away from them.
    start = load_component(teacher / "export", expect="decoder").state_dict()
    moved = [key for key, value in start.items() if not torch.equal(state[f"decoder.{key}"], value)]
    assert moved, "the exported student equals the teacher it started from"
