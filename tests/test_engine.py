"""DeepSpeed ownership: config filling (pure), one-rank engines, and a two-rank torchrun run.

Tolerances (fp32 on CPU; the differences come from summation order only): losses and grad norms rel 1e-5
(observed <= 7e-7), weights after 4 AdamW steps at lr 1e-3 abs 2e-5 (observed 2.5e-6), forward outputs
abs 1e-6 (observed 0), a resumed run's next loss rel 1e-6 (observed 0).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed in this process

import pytest
import torch
import torch.nn.functional as F

from icot.config import TrainConfig
from icot.engine import (CPU_OFFLOAD, Strategy, StepInfo, batch_triple, build_ds_config, find_auto, load_template,
                         lr_lambda, warmup_steps)
from icot.errors import UserError

WORKER_PATH = Path(__file__).with_name("dist_engine_worker.py")
_spec = importlib.util.spec_from_file_location("dist_engine_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

REL, WEIGHT_ABS, OUTPUT_ABS = 1e-5, 2e-5, 1e-6
EXAMPLES = Path(__file__).resolve().parents[1] / "ds_configs"   # example files for train.ds_config


def assert_close_list(got, want, rel=REL):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=rel), (got, want)


def assert_state_close(got: dict, want: dict, atol=WEIGHT_ABS):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=key)


# --------------------------------------------------------------------------------------------------
# build_ds_config: pure, no DeepSpeed import.


@pytest.mark.parametrize("batch, micro, world, triple", [
    (32, None, 1, (32, 1, 32)),
    (32, None, 2, (16, 1, 32)),
    (32, 4, 2, (4, 4, 32)),
    (8, 8, 1, (8, 1, 8)),
    (12, 2, 3, (2, 2, 12)),
])
def test_batch_triple_derivation(batch, micro, world, triple):
    train = TrainConfig(batch_size=batch, micro_batch_size=micro)
    assert batch_triple(train, world) == triple
    cfg = build_ds_config(train, world)
    got = (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"])
    assert got == triple
    assert cfg["train_batch_size"] == triple[0] * triple[1] * world


def test_batch_mismatch_errors_name_the_numbers():
    with pytest.raises(UserError, match=r"train\.batch_size=32 must equal train\.micro_batch_size \(5\) x gradient "
                                        r"accumulation x world size \(2\), but 32 is not a multiple of 5 x 2 = 10"):
        build_ds_config(TrainConfig(batch_size=32, micro_batch_size=5), 2)
    with pytest.raises(UserError, match=r"train\.batch_size=33 is not divisible by the world size 2"):
        build_ds_config(TrainConfig(batch_size=33), 2)


@pytest.mark.parametrize("precision, bf16, fp16", [("fp32", False, False), ("bf16", True, False),
                                                   ("fp16", False, True)])
def test_precision_sections(precision, bf16, fp16):
    cfg = build_ds_config(TrainConfig(precision=precision), 1)
    assert cfg["bf16"] == {"enabled": bf16} and cfg["fp16"] == {"enabled": fp16}


def test_optimizer_clipping_and_logging_keys():
    train = TrainConfig(lr=1e-3, betas=[0.8, 0.95], eps=1e-6, weight_decay=0.1, grad_clip=1.5, zero_stage=2)
    cfg = build_ds_config(train, 1)
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.8, 0.95], "eps": 1e-6,
                                                            "weight_decay": 0.1}}
    assert cfg["gradient_clipping"] == 1.5 and cfg["zero_optimization"]["stage"] == 2
    assert cfg["steps_per_print"] >= 10**9 and cfg["wall_clock_breakdown"] is False
    assert "scheduler" not in cfg  # the schedule is a torch LambdaLR, see test_lr_schedules
    assert build_ds_config(TrainConfig(), 1)["gradient_clipping"] == 0.0  # 0 = off in DeepSpeed


def test_frozen_config_has_no_optimizer():
    cfg = build_ds_config(TrainConfig(zero_stage=3, grad_clip=1.0), 2, frozen=True)
    assert "optimizer" not in cfg and "gradient_clipping" not in cfg
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["train_batch_size"] == 32
    assert build_ds_config(TrainConfig(zero_stage=2), 1, frozen=True)["zero_optimization"]["stage"] == 0


def test_leftover_auto_raises_naming_its_path():
    template = {"zero_optimization": {"stage": 0, "reduce_bucket_size": "auto"}, "flops": [{"x": "auto"}]}
    with pytest.raises(UserError, match=r'"auto" left at zero_optimization\.reduce_bucket_size, flops\.0\.x'):
        build_ds_config(TrainConfig(), 1, template)
    assert find_auto({"a": {"b": "auto", "c": 1}}) == ["a.b"]


def test_auto_in_owned_keys_is_filled():
    template = {"train_batch_size": "auto", "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"},
                "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "gradient_clipping": "auto",
                "zero_optimization": {"stage": "auto"}}
    cfg = build_ds_config(TrainConfig(lr=3e-4, batch_size=4), 2, template)
    assert cfg["train_batch_size"] == 4 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["optimizer"]["params"]["lr"] == 3e-4 and cfg["bf16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 0 and not find_auto(cfg)


def test_template_that_disagrees_or_schedules_is_rejected(tmp_path):
    with pytest.raises(UserError, match=r"train_batch_size is 64 but train\.batch_size gives 32"):
        build_ds_config(TrainConfig(), 1, {"train_batch_size": 64})
    with pytest.raises(UserError, match=r"zero_optimization\.stage is 3 but train\.zero_stage gives 0"):
        build_ds_config(TrainConfig(), 1, {"zero_optimization": {"stage": 3}})
    with pytest.raises(UserError, match=r"remove 'scheduler'"):
        build_ds_config(TrainConfig(), 1, {"scheduler": {"type": "WarmupLR"}})
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization":\n {"stage": 0,}}')
    with pytest.raises(UserError, match=r"bad\.json:2: invalid JSON"):
        build_ds_config(TrainConfig(), 1, bad)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_every_example_file_loads_and_builds_what_the_typed_config_builds(path):
    template = load_template(path)
    assert not {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
                "scheduler"} & set(template), "examples carry no batch, optimizer or scheduler keys"
    stage = template["zero_optimization"]["stage"]
    train = TrainConfig(zero_stage=stage, offload="offload" in path.stem, batch_size=8, micro_batch_size=2)
    cfg = build_ds_config(train, 2, path)
    got = (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"])
    assert got == (8, 2, 2)
    assert not find_auto(cfg) and "optimizer" in cfg
    assert cfg == build_ds_config(train, 2)   # the example says what the code builds from the config alone
    json.dumps(cfg)  # what gets saved as ds_config.json


def test_the_config_is_built_from_the_typed_config_and_a_users_file_passes_through(tmp_path):
    assert build_ds_config(TrainConfig(), 1)["zero_optimization"] == {"stage": 0}
    # ZeRO 1-2: optimizer partitions saved elastic, so a run resumes on another number of ranks.
    assert build_ds_config(TrainConfig(zero_stage=2, offload=True), 1)["zero_optimization"] == {
        "stage": 2, "offload_optimizer": CPU_OFFLOAD, "elastic_checkpoint": True}
    assert build_ds_config(TrainConfig(zero_stage=1), 1)["zero_optimization"] == {"stage": 1, "elastic_checkpoint": True}
    assert build_ds_config(TrainConfig(zero_stage=3, offload=True), 1)["zero_optimization"] == {
        "stage": 3, "offload_optimizer": CPU_OFFLOAD, "offload_param": CPU_OFFLOAD}
    # Frozen engines: partitioned only under ZeRO-3, never offloaded, never from the user's file.
    mine = tmp_path / "mine.json"
    mine.write_text('{"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1000}, "flops_profiler": {}}')
    train = TrainConfig(zero_stage=3, ds_config=str(mine))
    assert build_ds_config(train, 1)["zero_optimization"] == {"stage": 3, "stage3_max_live_parameters": 1000}
    assert build_ds_config(train, 1)["flops_profiler"] == {}
    assert build_ds_config(train, 1, frozen=True)["zero_optimization"] == {"stage": 3}
    assert build_ds_config(TrainConfig(zero_stage=2, offload=True), 1, frozen=True)["zero_optimization"] == {"stage": 0}
    with pytest.raises(UserError, match=r"train\.ds_config: cannot read nope\.json"):
        build_ds_config(TrainConfig(ds_config="nope.json"), 1)
    with pytest.raises(UserError, match=r"train\.offload needs train\.zero_stage 2 or 3"):
        build_ds_config(TrainConfig(offload=True), 1)


def test_lr_schedules():
    constant = lr_lambda("constant", 0, None)
    assert [constant(s) for s in (0, 5, 1000)] == [1.0, 1.0, 1.0]
    warm = lr_lambda("constant", 3, None)
    assert [warm(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = lr_lambda("linear", 1, 5)
    assert [linear(s) for s in range(6)] == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.25, 0.0])
    cosine = lr_lambda("cosine", 0, 4)
    assert [cosine(s) for s in range(5)] == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                                           (1 + math.cos(3 * math.pi / 4)) / 2, 0.0])
    with pytest.raises(UserError, match=r"train\.schedule=cosine needs the total number of optimizer steps"):
        lr_lambda("cosine", 0, None)


def test_warmup_as_a_ratio_of_the_run_rounds_up_where_no_step_count_is_given():
    assert warmup_steps(TrainConfig(warmup_ratio=0.03), 1000) == 30
    assert warmup_steps(TrainConfig(warmup_ratio=0.03), 1001) == 31   # ceil, as Hugging Face's Trainer
    assert warmup_steps(TrainConfig(warmup_ratio=0.03, warmup_steps=7), 1000) == 7
    assert warmup_steps(TrainConfig(warmup_ratio=0.03), None) == 0


# --------------------------------------------------------------------------------------------------
# One rank, in this process.


@pytest.fixture(scope="module")
def strategy():
    """ZeRO-0, global batch 8 as 2 micro batches of 4 (accumulation is exercised)."""
    return Strategy(worker.train_config(0, micro_batch_size=4)).init_distributed()


def test_single_process_defaults(strategy):
    assert (strategy.rank, strategy.world_size, strategy.is_main) == (0, 1, True)
    assert (strategy.micro_batch_size, strategy.gradient_accumulation) == (4, 2)
    assert strategy.ds_config == build_ds_config(strategy.train, 1, cpu=True)
    # On a CPU, torch's multi-tensor AdamW (DeepSpeed's fused CPU Adam drifts by an ULP after a resume).
    assert strategy.ds_config["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in build_ds_config(strategy.train, 1)["optimizer"]["params"]   # on a GPU: fused
    assert strategy.all_reduce_mean({"b": 2.0, "a": torch.tensor(1.5)}) == {"a": 1.5, "b": 2.0}
    assert strategy.all_reduce_sum({"n": 3}) == {"n": 3.0}
    assert strategy.any_rank(True) and not strategy.any_rank(False)
    strategy.barrier()
    assert Strategy(TrainConfig()).init_distributed().world_size == 1  # idempotent


def test_zero0_matches_hand_written_adamw(strategy):
    data = worker.make_data()
    reference = worker.make_model()
    engine = strategy.prepare_trainable(worker.make_model(), total_steps=worker.STEPS)
    losses, norms = worker.run_steps(strategy, engine, data)

    optimizer = torch.optim.AdamW(reference.parameters(), lr=worker.LR, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.01)
    want_losses, want_norms = [], []
    for (x, y), factor in zip(data, [0.5, 1.0, 2 / 3, 1 / 3]):  # linear, 1 warmup step, 4 steps
        for group in optimizer.param_groups:
            group["lr"] = worker.LR * factor
        loss = F.mse_loss(reference(x), y)
        optimizer.zero_grad()
        loss.backward()
        want_norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)))
        optimizer.step()
        want_losses.append(loss.item())

    assert want_norms[0] > 1.0, "clipping should be active in this test"
    assert_close_list(losses, want_losses)
    assert_close_list(norms, want_norms)
    assert_state_close(strategy.state_dict_for_export(engine), reference.state_dict())


def test_backward_step_reports_the_accumulation_boundary(strategy):
    engine = strategy.prepare_trainable(worker.make_model(), total_steps=2)
    x, y = worker.make_data(1)[0]
    assert strategy.current_lr(engine) == pytest.approx(worker.LR / 2)  # warmup: step 0 of linear, 1 warmup
    first = strategy.backward_step(engine, F.mse_loss(engine(x[:4]), y[:4]))
    second = strategy.backward_step(engine, F.mse_loss(engine(x[4:]), y[4:]))
    assert first == StepInfo(False, None)
    assert second.stepped and second.grad_norm > 0
    assert engine.global_steps == 1
    assert strategy.current_lr(engine) == pytest.approx(worker.LR)
    assert engine.lr_scheduler.get_last_lr() == pytest.approx([worker.LR])


def test_frozen_engine_has_no_optimizer_and_no_grads(strategy):
    model = worker.make_model()
    reference = copy.deepcopy(model)
    frozen = strategy.prepare_frozen(model)
    x = worker.make_data(1)[0][0]
    out = frozen(x)
    assert frozen.optimizer is None and frozen.basic_optimizer is None and frozen.lr_scheduler is None
    assert not frozen.module.training
    assert not out.requires_grad
    assert all(not p.requires_grad and p.grad is None for p in frozen.module.parameters())
    torch.testing.assert_close(out, reference(x).detach(), atol=OUTPUT_ABS, rtol=0)


def test_checkpoint_restores_weights_optimizer_and_schedule(strategy, tmp_path):
    data = worker.make_data(6)
    engine = strategy.prepare_trainable(worker.make_model(), total_steps=6)
    worker.run_steps(strategy, engine, data[:3])
    strategy.save_checkpoint(engine, tmp_path / "ckpt", "step3", {"step": 3, "examples": 24})
    weights = strategy.state_dict_for_export(engine)
    optimizer_state = copy.deepcopy(engine.optimizer.state_dict()["state"])
    continued, _ = worker.run_steps(strategy, engine, data[3:])

    fresh = strategy.prepare_trainable(worker.make_model(seed=7), total_steps=6)
    client_state = strategy.load_checkpoint(fresh, tmp_path / "ckpt")
    assert client_state == {"step": 3, "examples": 24}
    assert_state_close(strategy.state_dict_for_export(fresh), weights, atol=0)
    restored = fresh.optimizer.state_dict()["state"]
    assert restored.keys() == optimizer_state.keys()
    for index, state in optimizer_state.items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(restored[index][name], state[name], atol=0, rtol=0)
    assert fresh.lr_scheduler.last_epoch == engine.lr_scheduler.last_epoch - 3
    resumed, _ = worker.run_steps(strategy, fresh, data[3:])
    assert_close_list(resumed, continued, rel=1e-6)


def test_load_checkpoint_when_there_is_none(strategy, tmp_path):
    engine = strategy.prepare_trainable(worker.make_model(), total_steps=1)
    assert strategy.load_checkpoint(engine, tmp_path / "empty") is None
    with pytest.raises(UserError, match=r"no checkpoint .*missing_tag"):
        strategy.load_checkpoint(engine, tmp_path, tag="missing_tag")


def test_export_is_an_fp32_cpu_snapshot_and_gathering_is_a_no_op(strategy):
    engine = strategy.prepare_trainable(worker.make_model(), total_steps=2)
    before = strategy.state_dict_for_export(engine)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in before.values())
    kept = {k: v.clone() for k, v in before.items()}
    worker.run_steps(strategy, engine, worker.make_data(1))
    assert_state_close(before, kept, atol=0)  # training did not write through the export
    assert not torch.equal(strategy.state_dict_for_export(engine)["0.weight"], before["0.weight"])
    with strategy.gathered_params(engine.module, modify=True):
        engine.module[0].bias.data.zero_()  # without ZeRO-3 the parameters are simply there
    assert not engine.module[0].bias.any()


def test_hf_deepspeed_config_is_scoped_to_one_load(strategy):
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    zero3 = Strategy(worker.train_config(3, micro_batch_size=None)).init_distributed()
    seen = []

    def loader():
        seen.append((is_deepspeed_zero3_enabled(), (deepspeed_config() or {}).get("train_batch_size")))
        return "model"

    assert zero3.load_pretrained_scoped(loader) == "model"
    assert seen == [(True, 8)] and not is_deepspeed_zero3_enabled()

    def failing():
        raise OSError("no such model")

    with pytest.raises(OSError):
        zero3.load_pretrained_scoped(failing)
    assert not is_deepspeed_zero3_enabled()  # cleared even when the load fails

    assert strategy.load_pretrained_scoped(loader) == "model"  # ZeRO-0: transformers sees no DeepSpeed
    assert seen[-1] == (False, None)
    assert Strategy.load_pretrained is Strategy.load_pretrained_scoped


# --------------------------------------------------------------------------------------------------
# Two ranks: one torchrun of tests/dist_engine_worker.py, compared with the same loop on one rank.


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER_PATH), str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, results


@pytest.fixture(scope="module")
def one_rank_reference(strategy):
    """The same loop and global batch (8) on one rank: one micro batch of 8, no accumulation."""
    single = Strategy(worker.train_config(0, micro_batch_size=None)).init_distributed()
    engine = single.prepare_trainable(worker.make_model(), total_steps=worker.STEPS + 1)
    losses, norms = worker.run_steps(single, engine, worker.make_data(worker.STEPS))
    return losses, norms, single.state_dict_for_export(engine)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_match_one_rank(two_ranks, one_rank_reference, stage):
    out, results = two_ranks
    losses, norms, weights = one_rank_reference
    for rank, result in enumerate(results):
        got = result[f"zero{stage}"]
        assert got["ds_config"]["gradient_accumulation_steps"] == 2 and got["ds_config"]["train_batch_size"] == 8
        assert_close_list(got["losses"], losses)
        assert_close_list(got["grad_norms"], norms)
        assert got["exported_on_rank"] == (rank == 0)
    assert_state_close(torch.load(out / f"zero{stage}.pt"), weights)


def test_zero3_checkpoint_saved_and_resumed_on_every_rank(two_ranks):
    _, results = two_ranks
    for result in results:
        zero3 = result["zero3"]
        assert zero3["resume_client_state"] == {"step": worker.STEPS}
        assert_close_list(zero3["resume_next_loss"], zero3["original_next_loss"], rel=1e-6)
    assert results[0]["zero3"]["resume_weight_diff"] == 0.0


def test_frozen_zero3_engine_forward(two_ranks):
    _, results = two_ranks
    for result in results:
        frozen = result["frozen_zero3"]
        assert frozen["max_diff"] <= OUTPUT_ABS
        assert frozen["no_optimizer"] and not frozen["any_requires_grad"] and not frozen["training"]
        assert frozen["all_ds_id"] and frozen["some_partitioned"]


def test_hf_model_loaded_partitioned_under_scoped_zero3(two_ranks):
    _, results = two_ranks
    for result in results:
        hf = result["hf_zero3"]
        assert hf["zero3_inside"] and not hf["zero3_after"]
        assert hf["all_ds_attrs"] and hf["all_partitioned"]
        assert hf["load_diff"] == 0.0  # the saved weights, not a fresh random init
        assert hf["losses"][-1] < hf["losses"][0]
    assert results[0]["hf_zero3"]["train_change"] > 0 and results[0]["hf_zero3"]["export_loads_strict"]


def test_collectives_on_two_ranks(two_ranks):
    _, results = two_ranks
    for result in results:
        assert result["world_size"] == 2 and result["rank_mean"] == 0.5
        assert result["rank_sum"] == {"one": 2.0, "rank": 1.0}
        assert result["any_rank"] == [True, False]  # rank 1's flag reached rank 0
