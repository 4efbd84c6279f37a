"""The one object that owns DeepSpeed: configs, engines, steps, checkpoints, collectives.

Trainers build models and losses; everything DeepSpeed-specific goes through `Strategy` (the role
OpenRLHF gives its strategy). DeepSpeed is imported inside functions, so the pure parts (building a
config, the LR schedule) import and test without it.

The DeepSpeed config is built in code by one function, `build_ds_config`, from the typed `train:`
section and the world size; every key is visible there. A user's own file (`train.ds_config`, e.g. one of
the examples in `ds_configs/`) is the starting point when given: its other keys pass through, a key icot
owns may be left out or say `"auto"` but may not disagree, and no `"auto"` may be left (plain DeepSpeed,
unlike the Hugging Face Trainer, never fills them).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from icot.config import TrainConfig
from icot.errors import UserError

STEPS_PER_PRINT = 1_000_000_000  # DeepSpeed's own step log is noise; the training loop logs
CLIENT_KEY = "icot_client_state"
# Set once this process has started a process group: `icot` then exits without finalization (cli.py).
process_group_started = False
_FINAL_SYNC: list[torch.Tensor] = []  # see Strategy.shutdown
CPU_OFFLOAD = {"device": "cpu", "pin_memory": True}


# --------------------------------------------------------------------------------------------------
# DeepSpeed config: TrainConfig + world size (+ a user's file) -> the dict saved as ds_config.json.


def load_template(path: str | Path) -> dict:
    """A user's DeepSpeed JSON file (`train.ds_config`)."""
    path = Path(path)
    try:
        template = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"train.ds_config: cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(template, dict):
        raise UserError(f"{path}: a DeepSpeed config must be a JSON object")
    return template


def batch_triple(train: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """(micro batch per rank, gradient accumulation steps, global batch), checked to multiply out."""
    batch, micro = train.batch_size, train.micro_batch_size
    if micro is None:
        if batch % world_size:
            raise UserError(f"train.batch_size={batch} is not divisible by the world size {world_size}; "
                            f"set train.micro_batch_size")
        return batch // world_size, 1, batch
    per_step = micro * world_size
    if batch % per_step:
        raise UserError(f"train.batch_size={batch} must equal train.micro_batch_size ({micro}) x gradient "
                        f"accumulation x world size ({world_size}), but {batch} is not a multiple of "
                        f"{micro} x {world_size} = {per_step}")
    return micro, batch // per_step, batch


def build_ds_config(train: TrainConfig, world_size: int, template: str | Path | dict | None = None,
                    frozen: bool = False, cpu: bool = False) -> dict:
    """The DeepSpeed config of one engine. `frozen`: an engine without optimizer for a frozen model
    (partitioned only when training uses ZeRO-3). `template` (default: the file `train.ds_config` names,
    for trainable engines) is the starting point; see the module docstring. `cpu`: the engine runs on
    the CPU, where icot asks for torch's AdamW (see below)."""
    if template is None and train.ds_config and not frozen:
        template = train.ds_config
    if isinstance(template, dict):
        cfg, source = copy.deepcopy(template), "DeepSpeed config"
    elif template is not None:
        cfg, source = load_template(template), str(template)
    else:
        cfg, source = {}, "icot"
    if "scheduler" in cfg:
        raise UserError(f"{source}: remove 'scheduler'; the LR schedule comes from train.schedule")
    if train.offload and train.zero_stage < 2:
        raise UserError(f"train.offload needs train.zero_stage 2 or 3, got {train.zero_stage}")

    micro, accum, batch = batch_triple(train, world_size)
    stage = (3 if train.zero_stage == 3 else 0) if frozen else train.zero_stage
    own = _Owner(cfg, source)
    own("train_batch_size", batch, "train.batch_size")
    own("train_micro_batch_size_per_gpu", micro, "train.micro_batch_size")
    own("gradient_accumulation_steps", accum, "train.batch_size / (micro batch x world size)")
    own("zero_optimization.stage", stage, "train.zero_stage")
    if train.offload and not frozen:   # optimizer state (and under ZeRO-3 the parameters) on the CPU
        own.default("zero_optimization.offload_optimizer", dict(CPU_OFFLOAD))
        if stage == 3:
            own.default("zero_optimization.offload_param", dict(CPU_OFFLOAD))
    own("bf16.enabled", train.precision == "bf16", "train.precision")
    own("fp16.enabled", train.precision == "fp16", "train.precision")
    if not frozen and stage in (1, 2):
        # Optimizer partitions saved world-size independent: a run resumes on another number of ranks.
        own.default("zero_optimization.elastic_checkpoint", True)
    if not frozen:
        own("optimizer.type", "AdamW", "icot (AdamW)")
        if cpu and not train.offload:
            # DeepSpeed's fused CPU Adam keeps running powers of the betas inside the kernel and recomputes
            # them with pow() after a resume: 1-2 ULP apart, so a resumed run drifts from an uninterrupted
            # one. torch's AdamW computes them from the step each time: resumes are bitwise.
            own.default("optimizer.params.torch_adam", True)
            own.default("optimizer.params.foreach", True)   # torch's multi-tensor AdamW: a third faster on a CPU
        own("optimizer.params.lr", train.lr, "train.lr")
        own("optimizer.params.betas", list(train.betas), "train.betas")
        own("optimizer.params.eps", train.eps, "train.eps")
        # Decay on every parameter, as torch's AdamW default did in the paper's runs.
        own("optimizer.params.weight_decay", train.weight_decay, "train.weight_decay")
        own("gradient_clipping", train.grad_clip, "train.grad_clip")  # 0.0 is off in DeepSpeed
    own.default("steps_per_print", STEPS_PER_PRINT)
    own.default("wall_clock_breakdown", False)

    leftover = find_auto(cfg)
    if leftover:
        raise UserError(f"{source}: \"auto\" left at {', '.join(leftover)}; plain DeepSpeed does not fill it, "
                        f"set a value in the file")
    return cfg


class _Owner:
    """Sets keys icot owns; a template may omit them or say "auto", but may not disagree."""

    def __init__(self, cfg: dict, source: str):
        self.cfg, self.source = cfg, source

    def _parent(self, dotted: str) -> tuple[dict, str]:
        *parents, leaf = dotted.split(".")
        node = self.cfg
        for i, part in enumerate(parents):
            if node.get(part) in (None, "auto"):
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise UserError(f"{self.source}: {'.'.join(parents[:i + 1])} must be an object")
        return node, leaf

    def __call__(self, dotted: str, value: Any, owner: str) -> None:
        node, leaf = self._parent(dotted)
        current = node.get(leaf, "auto")
        if current != "auto" and current != value:
            raise UserError(f"{self.source}: {dotted} is {current!r} but {owner} gives {value!r}; "
                            f"remove it from the file (or write \"auto\") and set {owner}")
        node[leaf] = value

    def default(self, dotted: str, value: Any) -> None:
        node, leaf = self._parent(dotted)
        if node.get(leaf, "auto") == "auto":
            node[leaf] = value


def find_auto(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every value still equal to "auto"."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in find_auto(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in find_auto(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "auto" else []


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule: a torch LambdaLR handed to deepspeed.initialize. DeepSpeed's WarmupLR clamps
# warmup to at least 2 steps and starts from warmup_min_lr, so "constant" would open with zero-LR steps.


def warmup_steps(train: TrainConfig, total_steps: int | None) -> int:
    """train.warmup_steps, else train.warmup_ratio of the run's steps (rounded up)."""
    if train.warmup_steps or not train.warmup_ratio or not total_steps:
        return train.warmup_steps
    return math.ceil(train.warmup_ratio * total_steps)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int | None) -> Callable[[int], float]:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then constant/linear/cosine to 0."""
    if schedule != "constant" and not total_steps:
        raise UserError(f"train.schedule={schedule} needs the total number of optimizer steps")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)  # never 0: the first step already learns
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# --------------------------------------------------------------------------------------------------
# Distributed helpers.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_SINGLE_PROCESS_MARK = "ICOT_SINGLE_PROCESS_PID"


def _single_process_env() -> None:
    """Without torchrun, act as rank 0 of 1 on a free port (so parallel runs do not collide).

    The variables are marked with this process's id: a child process that inherits them (a stage
    started from a process that trained in-process) gets a fresh port instead of its parent's, which
    the parent's store still holds."""
    mark = os.environ.get(_SINGLE_PROCESS_MARK, "")
    # Inherited: our own marked values, unchanged (a launcher like torchrun would have set its own port).
    inherited = mark == f"{mark.split(':')[0]}:{os.environ.get('MASTER_PORT')}" and not mark.startswith(f"{os.getpid()}:")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not inherited:
        return
    port = str(_free_port())
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": port, _SINGLE_PROCESS_MARK: f"{os.getpid()}:{port}"})


def use_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


class StepInfo(NamedTuple):
    stepped: bool  # an optimizer step happened (the end of a gradient accumulation cycle)
    grad_norm: float | None  # global gradient norm before clipping, when the step computed one


class _ScopedZero3:
    """What transformers reads through its global weak reference (`is_zero3()`, `config`), for when
    `HfDeepSpeedConfig` cannot be built: in transformers 5.x it insists on `accelerate` being installed."""

    def __init__(self, config: dict):
        from transformers.integrations.deepspeed import set_hf_deepspeed_config

        self.config = config
        set_hf_deepspeed_config(self)

    def is_zero3(self) -> bool:
        return self.config.get("zero_optimization", {}).get("stage") == 3


def _hf_zero3_scope(config: dict):
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    try:
        return HfDeepSpeedConfig(config)
    except ImportError:  # PackageNotFoundError for accelerate is an ImportError
        return _ScopedZero3(config)


def _export_copy(state_dict: dict) -> dict:
    """CPU fp32 copies of floating tensors, keeping tied weights tied."""
    out, seen = {}, {}
    for key, tensor in state_dict.items():
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if ident not in seen:
            copy_ = tensor.detach().to("cpu", copy=True)
            seen[ident] = copy_.float() if copy_.is_floating_point() else copy_
        out[key] = seen[ident]
    return out


def partition_summary(module: torch.nn.Module) -> str | None:
    """How ZeRO-3 has split `module`'s parameters across ranks (None when it has not)."""
    params = list(module.parameters())
    parted = [p for p in params if hasattr(p, "ds_id")]
    if not parted:
        return None
    local, full = sum(p.ds_tensor.numel() for p in parted), sum(p.ds_numel for p in parted)
    return f"{len(parted)} of {len(params)} parameters partitioned by ZeRO-3, {local:,} of {full:,} elements held here"


# --------------------------------------------------------------------------------------------------


class Strategy:
    """Owns DeepSpeed for one stage: call `init_distributed()` first, on every rank."""

    def __init__(self, train: TrainConfig):
        self.train = train
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.ds_config: dict | None = None  # resolved trainable config (saved as ds_config.json)
        self.frozen_ds_config: dict | None = None

    # -- process group ---------------------------------------------------------------------------

    def init_distributed(self) -> "Strategy":
        import deepspeed
        import torch.distributed as dist

        global process_group_started
        process_group_started = True
        if not dist.is_initialized():
            _single_process_env()
            if not use_cpu():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            deepspeed.init_distributed(dist_backend="gloo" if use_cpu() else "nccl", verbose=False)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.ds_config = build_ds_config(self.train, self.world_size, cpu=use_cpu())
        self.frozen_ds_config = build_ds_config(self.train, self.world_size, frozen=True, cpu=use_cpu())
        return self

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if use_cpu() else torch.device("cuda", self.local_rank)

    @property
    def micro_batch_size(self) -> int:
        return batch_triple(self.train, self.world_size)[0]

    @property
    def gradient_accumulation(self) -> int:
        return batch_triple(self.train, self.world_size)[1]

    def shutdown(self) -> None:
        """Tear the process group down before exit (gloo aborts at interpreter exit otherwise)."""
        import torch.distributed as dist

        if dist.is_initialized():
            # The last synchronisation is an all-reduce, not dist.barrier(): a gloo barrier holds the
            # buffers of the collectives still in flight when it starts (e.g. ZeRO-3's gathers) and its
            # worker thread frees them after the barrier has returned. Freeing a tensor made in Python
            # takes the GIL, and a thread that takes the GIL while the interpreter shuts down aborts the
            # process ("terminate called without an active exception", every few ZeRO-3 runs). The
            # tensor stays referenced until exit, so freeing the all-reduce's own work needs no GIL.
            _FINAL_SYNC.append(torch.zeros(1, device=self.device))
            dist.all_reduce(_FINAL_SYNC[-1])
            dist.destroy_process_group()

    def exit_process(self) -> None:
        """End a multi-rank process right after `shutdown`, without interpreter finalization.

        A gloo worker thread can still be releasing the last collective's work object, whose tensors
        hold Python references; if that happens during finalization it takes the GIL from a dying
        interpreter and the process aborts ("terminate called without an active exception", exit -6)
        after a successful run: about 1 run in 10 on a 2-core machine (gdb: ProcessGroupGloo::runLoop ->
        ~AsyncAllreduceWork -> decref_pyobject -> take_gil). Everything is written and flushed by now.
        One-process runs return normally (they may run inside a caller's interpreter); `icot train`
        ends those the same way once the stage returns.
        """
        if self.world_size > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def log(self, message: str) -> None:
        if self.is_main:
            print(f"[icot] {message}", flush=True)

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def _all_reduce(self, values: dict[str, float], op: str) -> dict[str, float]:
        """One collective for a whole dict of scalars; every rank must pass the same keys."""
        import torch.distributed as dist

        keys = sorted(values)
        if self.world_size == 1 or not dist.is_initialized():
            return {k: float(values[k]) for k in keys}
        packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return dict(zip(keys, packed.tolist()))

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        return {k: v / self.world_size for k, v in self._all_reduce(values, "sum").items()}

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        return self._all_reduce(values, "sum")

    def all_equal(self, value: float) -> bool:
        """Whether every rank passed the same value."""
        highest = self._all_reduce({"value": value}, "max")["value"]
        lowest = -self._all_reduce({"value": -value}, "max")["value"]
        return highest == lowest

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is true on any (e.g. a stop signal that reached one rank)."""
        return self._all_reduce({"flag": float(bool(flag))}, "max")["flag"] > 0

    # -- engines ---------------------------------------------------------------------------------

    def _require_init(self) -> None:
        if self.ds_config is None:
            raise RuntimeError("Strategy.init_distributed() must run first")

    def prepare_trainable(self, model: torch.nn.Module, total_steps: int | None = None):
        """One DeepSpeed engine (AdamW + LR schedule) for one independently optimised model."""
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        self._require_init()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise UserError(f"{type(model).__name__} has no trainable parameters; use prepare_frozen")
        factor = lr_lambda(self.train.schedule, warmup_steps(self.train, total_steps), total_steps)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                          config=copy.deepcopy(self.ds_config),
                                          lr_scheduler=lambda optimizer: LambdaLR(optimizer, factor))
        engine.train()
        return engine

    def prepare_frozen(self, model: torch.nn.Module):
        """An engine without optimizer for a frozen model (partitioned under ZeRO-3), in eval mode."""
        import deepspeed

        self._require_init()
        model.eval()
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=copy.deepcopy(self.frozen_ds_config))
        engine.eval()
        summary = partition_summary(engine.module)
        if summary:
            self.log(f"frozen {type(model).__name__} engine: {summary} (rank 0 of {self.world_size})")
        return engine

    def load_pretrained_scoped(self, loader_fn: Callable[[], torch.nn.Module], ds_config: dict | None = None):
        """Run `loader_fn` (e.g. `from_pretrained`) so that under ZeRO-3 the model is built partitioned.

        transformers finds the DeepSpeed config through a global weak reference; the object behind it
        lives only for this load, so no later, unrelated load is partitioned by accident. Pass
        `frozen_ds_config` for a model that will go to `prepare_frozen`.
        """
        config = self.ds_config if ds_config is None else ds_config
        if config is None or config.get("zero_optimization", {}).get("stage") != 3:
            return loader_fn()
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        scope = _hf_zero3_scope(config)
        try:
            model = loader_fn()
        finally:
            del scope
            unset_hf_deepspeed_config()
        if isinstance(model, torch.nn.Module):
            summary = partition_summary(model) or "not partitioned at load"
            self.log(f"loaded {type(model).__name__} under ZeRO-3: {summary} (rank 0 of {self.world_size})")
        return model

    load_pretrained = load_pretrained_scoped  # the shorter name the stage code uses

    def gathered_params(self, module: torch.nn.Module, modify: bool = False):
        """Full parameters inside the block under ZeRO-3 (a no-op otherwise); every rank must enter.

        With `modify`, rank 0's in-place changes (e.g. loading a custom head) are broadcast on exit.
        """
        params = [p for p in module.parameters() if hasattr(p, "ds_id")]  # ZeRO-3 (engine or zero.Init)
        if not params:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    # -- steps -----------------------------------------------------------------------------------

    def backward_step(self, engine, loss: torch.Tensor) -> StepInfo:
        """Backward one micro batch; the optimizer steps at the end of each accumulation cycle."""
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        norm = None
        if boundary and engine.zero_optimization_stage() == 0 and not (engine.fp16_enabled()
                                                                       or engine.bfloat16_enabled()):
            # DeepSpeed records no norm on its plain fp32 path; gradients are already all-reduced here.
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            if grads:
                norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        engine.step()
        if not boundary:
            return StepInfo(False, None)
        if norm is None and engine.get_global_grad_norm() is not None:
            norm = float(engine.get_global_grad_norm())
        return StepInfo(True, norm)

    def current_lr(self, engine) -> float:
        """The learning rate the next optimizer step will use."""
        return float(engine.get_lr()[0])

    def scale_lr(self, engine, factor: float) -> None:
        """Multiply the learning rate of the coming optimizer step by `factor`. The LR scheduler sets each
        step's rate afresh from train.schedule (LambdaLR is not chained), so factors never compound."""
        for group in engine.optimizer.param_groups:
            group["lr"] *= factor

    def reset_optimizer(self, engine) -> None:
        """Start the optimizer afresh, as a newly built one (a curriculum's rule): its moments and step
        counts cleared; the learning rate and its schedule go on."""
        optimizer = engine.optimizer
        basic = getattr(optimizer, "optimizer", optimizer)   # ZeRO wraps the torch optimizer
        basic.state.clear()

    def apply_optimizer_settings(self, engine) -> None:
        """After a resume: this run's lr, betas, eps and weight decay (a checkpoint restores its own) and
        its schedule from the restored step on (the LR scheduler's state holds the step and the old lr)."""
        scheduler = engine.lr_scheduler
        for index, group in enumerate(engine.optimizer.param_groups):
            group.update(initial_lr=self.train.lr, betas=tuple(self.train.betas), eps=self.train.eps,
                         weight_decay=self.train.weight_decay)
            group["lr"] = self.train.lr * scheduler.lr_lambdas[index](scheduler.last_epoch)
        scheduler.base_lrs = [self.train.lr] * len(scheduler.base_lrs)
        scheduler._last_lr = [group["lr"] for group in engine.optimizer.param_groups]

    # -- checkpoints and export ------------------------------------------------------------------

    def save_checkpoint(self, engine, ckpt_dir: str | Path, tag: str, client_state: dict | None = None) -> None:
        """Save on EVERY rank: ZeRO shards are per rank and the save synchronises (rank 0 alone hangs)."""
        # Under its own key: DeepSpeed hands back its bookkeeping (param_shapes, ds_config, ...) beside it.
        engine.save_checkpoint(str(ckpt_dir), tag=str(tag), client_state={CLIENT_KEY: dict(client_state or {})})

    def load_checkpoint(self, engine, ckpt_dir: str | Path, tag: str | None = None) -> dict | None:
        """Restore weights, optimizer and LR schedule on every rank; the client state, or None when
        there is no checkpoint (no `latest` file). Under ZeRO-3, load into a freshly built engine."""
        ckpt_dir = Path(ckpt_dir)
        if tag is None and not (ckpt_dir / "latest").is_file():
            return None
        if tag is not None and not (ckpt_dir / str(tag)).is_dir():
            raise UserError(f"no checkpoint {ckpt_dir / str(tag)}")
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=None if tag is None else str(tag))
        if path is None:
            raise UserError(f"could not load the checkpoint in {ckpt_dir}")
        return client_state.get(CLIENT_KEY, {})

    def state_dict_for_export(self, engine) -> dict | None:
        """Full CPU fp32 weights on rank 0 (None elsewhere); call on every rank (ZeRO-3 gathers)."""
        if engine.zero_optimization_partition_weights():
            state_dict = engine._zero3_consolidated_16bit_state_dict()  # module dtype, despite the name
        else:
            state_dict = engine.module.state_dict() if self.is_main else None
        return _export_copy(state_dict) if self.is_main else None
