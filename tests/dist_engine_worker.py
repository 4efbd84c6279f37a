"""Two-rank checks of `icot.engine.Strategy`, run by tests/test_engine.py as

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/dist_engine_worker.py OUT

Each rank writes OUT/rank<r>.json (and rank 0 the exported weights as OUT/zero<stage>.pt); the test
makes the assertions. The test also imports this file for the model, data and loop, and runs them on
one rank as the reference, so both sides train exactly the same way.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from icot.config import TrainConfig
from icot.engine import Strategy

GLOBAL_BATCH = 8
STEPS = 4
LR = 1e-3


def make_model(seed: int = 0) -> torch.nn.Module:
    # The middle weight has 102,400 elements: above ZeRO-3's default persistence threshold (1e5), so the
    # shipped templates really partition it instead of keeping it whole on every rank.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 400), torch.nn.Tanh(), torch.nn.Linear(400, 256),
                               torch.nn.Tanh(), torch.nn.Linear(256, 1))


def make_data(steps: int = STEPS, seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 1, generator=g))
            for _ in range(steps)]


def train_config(zero_stage: int, micro_batch_size: int | None, **overrides) -> TrainConfig:
    settings = dict(lr=LR, batch_size=GLOBAL_BATCH, micro_batch_size=micro_batch_size, zero_stage=zero_stage,
                    schedule="linear", warmup_steps=1, grad_clip=1.0)
    return TrainConfig(**{**settings, **overrides})


def micro_batches(x: torch.Tensor, y: torch.Tensor, strategy: Strategy):
    """This rank's micro batches of one global batch (each example seen by exactly one rank)."""
    micro = strategy.micro_batch_size
    for m in range(strategy.gradient_accumulation):
        start = (m * strategy.world_size + strategy.rank) * micro
        yield x[start:start + micro].to(strategy.device), y[start:start + micro].to(strategy.device)


def run_steps(strategy: Strategy, engine, data) -> tuple[list[float], list[float | None]]:
    """Optimizer steps over `data`: the global mean loss and the grad norm of each step."""
    losses, norms = [], []
    for x, y in data:
        micro_losses = []
        for xs, ys in micro_batches(x, y, strategy):
            loss = F.mse_loss(engine(xs), ys)
            info = strategy.backward_step(engine, loss)
            micro_losses.append(loss.item())
        assert info.stepped, "the last micro batch of a global batch must step the optimizer"
        losses.append(strategy.all_reduce_mean({"loss": sum(micro_losses) / len(micro_losses)})["loss"])
        norms.append(info.grad_norm)
    return losses, norms


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def check_zero_stage(stage: int, out: Path) -> dict:
    """Train the shared model; under ZeRO-3 also save on every rank and resume into a fresh engine."""
    strategy = Strategy(train_config(stage, micro_batch_size=2)).init_distributed()
    engine = strategy.prepare_trainable(make_model(), total_steps=STEPS + 1)
    data = make_data(STEPS + 1)
    losses, norms = run_steps(strategy, engine, data[:STEPS])
    exported = strategy.state_dict_for_export(engine)
    if strategy.is_main:
        torch.save(exported, out / f"zero{stage}.pt")
    result = {"losses": losses, "grad_norms": norms, "exported_on_rank": exported is not None,
              "ds_config": strategy.ds_config}
    if stage == 3:
        strategy.save_checkpoint(engine, out / "ckpt", "step4", {"step": STEPS})
        fresh = strategy.prepare_trainable(make_model(seed=1), total_steps=STEPS + 1)
        result["resume_client_state"] = strategy.load_checkpoint(fresh, out / "ckpt")
        restored = strategy.state_dict_for_export(fresh)
        if strategy.is_main:
            result["resume_weight_diff"] = max_diff(exported, restored)
        # One more step on both: equal only if the optimizer moments and LR schedule came back too.
        result["resume_next_loss"] = run_steps(strategy, fresh, data[STEPS:])[0]
        result["original_next_loss"] = run_steps(strategy, engine, data[STEPS:])[0]
    return result


def check_frozen_zero3() -> dict:
    strategy = Strategy(train_config(3, micro_batch_size=2)).init_distributed()
    model = make_model()
    reference = copy.deepcopy(model).eval()
    frozen = strategy.prepare_frozen(model)
    x = make_data(1)[0][0][strategy.rank * 4:(strategy.rank + 1) * 4]  # different inputs per rank
    with torch.no_grad():
        got = frozen(x.to(strategy.device)).cpu()
        want = reference(x)
    params = list(frozen.module.parameters())
    # Under ZeRO-3 `engine.optimizer` is DeepSpeed's parameter-partitioning manager, not an optimizer.
    return {"max_diff": float((got - want).abs().max()), "no_optimizer": frozen.basic_optimizer is None,
            "any_requires_grad": any(p.requires_grad for p in params), "training": frozen.module.training,
            "all_ds_id": all(hasattr(p, "ds_id") for p in params),
            "some_partitioned": any(p.ds_tensor.numel() < p.ds_numel for p in params)}


def check_hf_scoped_load(out: Path) -> dict:
    """A tiny GPT-2 from disk, built partitioned under ZeRO-3, loaded correctly and trainable."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    folder, template = out / "tiny_gpt2", out / "zero3_partition_all.json"
    strategy = Strategy(train_config(3, micro_batch_size=2)).init_distributed()
    if strategy.is_main:
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        GPT2LMHeadModel(config).save_pretrained(folder)
        # Tiny weights sit below the persistence threshold; partition all of them for this check.
        settings = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        template.write_text(json.dumps(settings))
    strategy.barrier()

    strategy = Strategy(train_config(3, micro_batch_size=2, ds_config=str(template), lr=1e-3)).init_distributed()
    seen_inside = []

    def loader():
        seen_inside.append(is_deepspeed_zero3_enabled())
        return GPT2LMHeadModel.from_pretrained(folder)

    model = strategy.load_pretrained_scoped(loader)
    params = list(model.parameters())
    result = {"zero3_inside": seen_inside == [True], "zero3_after": is_deepspeed_zero3_enabled(),
              "all_ds_attrs": all(hasattr(p, "ds_id") and hasattr(p, "ds_numel") for p in params),
              "all_partitioned": all(p.ds_tensor.numel() < p.ds_numel for p in params)}
    saved = load_file(str(folder / "model.safetensors"))
    with strategy.gathered_params(model):
        current = model.state_dict()
        result["load_diff"] = max_diff({k: current[k] for k in saved}, saved)

    engine = strategy.prepare_trainable(model, total_steps=3)
    g = torch.Generator().manual_seed(strategy.rank)
    ids = torch.randint(0, 100, (strategy.micro_batch_size, 16), generator=g).to(strategy.device)
    losses = []
    for _ in range(3):
        for _ in range(strategy.gradient_accumulation):  # the same micro batch: the loss must go down
            loss = engine(input_ids=ids, labels=ids).loss
            strategy.backward_step(engine, loss)
        losses.append(strategy.all_reduce_mean({"loss": loss.item()})["loss"])
    result["losses"] = losses
    exported = strategy.state_dict_for_export(engine)
    if strategy.is_main:
        result["train_change"] = max_diff({k: exported[k] for k in saved}, saved)
        fresh = GPT2LMHeadModel(GPT2LMHeadModel.config_class.from_pretrained(folder))
        result["export_loads_strict"] = not fresh.load_state_dict(exported, strict=True).missing_keys
    return result


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {f"zero{stage}": check_zero_stage(stage, out) for stage in (0, 2, 3)}
    results["frozen_zero3"] = check_frozen_zero3()
    results["hf_zero3"] = check_hf_scoped_load(out)
    strategy = Strategy(train_config(0, micro_batch_size=2)).init_distributed()
    results["world_size"] = strategy.world_size
    results["rank_mean"] = strategy.all_reduce_mean({"rank": float(strategy.rank)})["rank"]
    results["rank_sum"] = strategy.all_reduce_sum({"rank": float(strategy.rank), "one": 1.0})
    results["any_rank"] = [strategy.any_rank(strategy.rank == 1), strategy.any_rank(False)]
    (out / f"rank{strategy.rank}.json").write_text(json.dumps(results, indent=1))
    strategy.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
