"""`icot bench`: side-by-side throughput of every registered mode (one per way of decoding: `timed_modes`) and
the training-step overhead, in one run.

Inference. For each task (`4x4`, `5x5`, ...), real lines are rendered (`render_line`) and tokenized with a
word tokenizer built on them (`build_from_segments`), which gives the prompt and the real generated
lengths of each mode's view: the answer (`#### digits <sep>`) for modes that answer without CoT
tokens, CoT + separator + answer + separator for explicit CoT. Each mode's model is built from randomly
initialised decoders (`ModeModel.random_model`) with the shapes asked for (GPT-2 Small by default, with
GPT-2's vocabulary size so that the LM head costs what it costs), and every mode generates exactly its
real length: the separator is suppressed (`generation_config.suppress_tokens`), so greedy decoding runs
to `max_new_tokens` = that length. The timed call is the evaluation harness's
(`icot.evaluate.ModeModel.generate`, i.e. `icot.models.generation`): implicit = emulator pass + the
student's decoding with injected states; explicit = the teacher decoding CoT and answer; no-CoT = the
answer only. Modes are interleaved batch by batch in a rotating order and each pass over the examples
is repeated; the median is kept.

Timing basis. On a CPU with one torch thread (`--threads 1`), ratios come from this process's CPU time,
which other jobs on a shared machine disturb far less than the wall clock; wall-clock numbers are
reported beside them (`--timing` chooses).

A profile splits each mode whose model is an emulator + student pair (ICoT-KD's implicit mode): the emulator pass (with PyTorch's native LSTM kernel, as the harness
runs it, and with the default oneDNN one), its decoder without the per-layer heads, the student's decoding
with precomputed states against the same decoder without injection (= no-CoT), the share of two
possible model-side savings (the emulator's unused last block; the constant mixture half of the first
MLP layers when M = 1), and a lean hand-written KV-cache greedy loop against Hugging Face `generate`.

Training. One optimizer step of the teacher stage through icot (the stage's loss, `Strategy.backward_step`
on a ZeRO-0 DeepSpeed engine, one rank), and the Trainer's whole `optimizer_step` (data selection,
collation, metrics and their all-reduce included), against a minimal PyTorch loop (AdamW with the same
hyper-parameters, the same initial weights, the same batch), for a tiny and a GPT-2-Small-shaped model.
Steps of the three kinds are interleaved after warm-up steps; medians are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from icot import registry
from icot.errors import UserError
from icot.evaluate import ModeModel, _Parser, mode_class

GOALS = {
    "implicit_over_no_cot_batch1": (">=", 0.95),
    "implicit_over_no_cot_batched": (">=", 0.90),
    "implicit_over_explicit_batch1": {"4x4": (">=", 4.0), "5x5": (">=", 5.0)},
    "coconut_batched_over_reference_batch1": (">=", 5.0),
    "train_step_ratio": ("<=", 1.10),
}
# Decoding without Python overhead, on a GPU (a CPU's matmuls, not Python, bound its decoding): compiled
# batch-1 decoding at GPT-2 Small's shape.
GPU_GOALS = {
    "no_cot_compiled_ms_per_token_batch1": ("<=", 1.5),
    "implicit_compiled_ms_per_token_batch1": ("<=", 1.5),
    "implicit_compiled_over_no_cot_compiled_batch1": (">=", 0.95),
}
GPT2_VOCAB = 50257


# --------------------------------------------------------------------------------------------------
# Tasks: real lines, their tokenizer and lengths.


@dataclass
class Task:
    name: str
    digits_a: int
    digits_b: int
    tokenizer: object
    features: list[dict]              # cot_ids, nocot_ids, prompt_len, answer
    separator_id: int
    prompt_len: int = 0
    new_tokens: dict[str, int] = field(default_factory=dict)   # per mode: the continuation of its view
    cot_view_length: int = 0


def parse_task(name: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", name.strip())
    if not match:
        raise UserError(f"--task: expected shapes like 4x4 or 5x3, got {name!r}")
    a, b = int(match.group(1)), int(match.group(2))
    from icot.data.multiply import MAX_DIGITS, MIN_DIGITS

    if not (MIN_DIGITS <= a <= MAX_DIGITS and MIN_DIGITS <= b <= MAX_DIGITS):
        raise UserError(f"--task {name}: digits must be between {MIN_DIGITS} and {MAX_DIGITS}")
    return a, b


def _number(digits) -> int:
    """The integer of a digit row written least-significant digit first."""
    return int("".join(str(int(d)) for d in digits[::-1]))


def build_task(name: str, examples: int, seed: int = 0) -> Task:
    """`examples` rendered lines of the task, tokenized by a word tokenizer built on them."""
    from icot.data.multiply import render_line, sample_pairs
    from icot.data.reader import parse_line
    from icot.data.collate import view_ids
    from icot.data.tokenizer_build import build_from_segments
    from icot.data.views import encode_batch

    digits_a, digits_b = parse_task(name)
    a_rows, b_rows = sample_pairs(digits_a, digits_b, examples, seed)
    lines = [render_line(_number(a), _number(b), digits_a, digits_b) for a, b in zip(a_rows, b_rows)]
    parsed = [parse_line(line) for line in lines]
    tokenizer = build_from_segments([s for e in parsed for s in (e.question, e.cot, e.answer)], kind="word")
    encoded = encode_batch(tokenizer, [e.question for e in parsed], [e.cot for e in parsed],
                           [e.answer for e in parsed])
    features = [{"cot_ids": c, "nocot_ids": n, "prompt_len": p, "step_starts": s, "answer": e.answer, "line": None}
                for c, n, p, s, e in zip(encoded["cot_ids"], encoded["nocot_ids"], encoded["prompt_len"],
                                         encoded["step_starts"], parsed)]
    task = Task(name, digits_a, digits_b, tokenizer, features, tokenizer.eos_token_id)
    lengths = {(len(f["cot_ids"]), len(f["nocot_ids"]), f["prompt_len"]) for f in features}
    if len(lengths) != 1:  # every line of one shape has one layout
        raise RuntimeError(f"{name}: lines of unequal token lengths {sorted(lengths)}")
    cot_len, _, prompt_len = lengths.pop()
    task.prompt_len, task.cot_view_length = prompt_len, cot_len
    task.new_tokens = {mode.name: len(view_ids(features[0], mode.view)) - prompt_len for mode in timed_modes()}
    for mode in list(task.new_tokens):   # a mode's reference-code decoding, timed beside it
        if hasattr(mode_class(mode), "generate_as_reference"):
            task.new_tokens[reference_name(mode)] = task.new_tokens[mode]
    return task


def reference_name(mode: str) -> str:
    return f"{mode}_reference"


def timed_modes() -> list[registry.Mode]:
    """The registered modes, one per way of decoding: a mode that decodes with another's model class (SIM-CoT's
    modes decode as their base method's) would time the same decoding twice."""
    classes = {}
    for mode in registry.modes():
        classes.setdefault(mode.model, mode)
    return list(classes.values())


def compiled_name(mode: str) -> str:
    return f"{mode}_compiled"


def is_variant(name: str) -> bool:
    """A mode decoded another way (its reference code's scheme, or compiled), timed as a mode of its own."""
    return name.endswith(("_reference", "_compiled"))


class CompiledScheme:
    """A mode's model decoding with a static KV cache and a compiled step (`--decoding compiled` of icot
    eval), timed as a mode of its own."""

    def __init__(self, mode_model: ModeModel):
        self.inner = mode_model
        self.mode = compiled_name(mode_model.mode)
        self.model, self.decoder = mode_model.model, mode_model.decoder

    def generate(self, batch, max_new_tokens, synced=False):
        self.inner.decoding = "compiled"
        try:
            return self.inner.generate(batch, max_new_tokens, synced)
        finally:
            self.inner.decoding = "eager"


class ReferenceScheme:
    """A mode's model decoding as its reference code does (`generate_as_reference`: e.g. Coconut's batch-1
    decoding without a KV cache after the thoughts), timed as a mode of its own."""

    def __init__(self, mode_model: ModeModel):
        self.inner = mode_model
        self.mode = reference_name(mode_model.mode)
        self.model, self.decoder = mode_model.model, mode_model.decoder

    def generate(self, batch, max_new_tokens, synced=False):
        return self.inner.generate_as_reference(batch, max_new_tokens)


# --------------------------------------------------------------------------------------------------
# Random models of a given shape.


@dataclass
class Shape:
    name: str
    family: str
    layers: int
    hidden: int
    heads: int
    vocab: int           # 0: the task tokenizer's size
    max_positions: int = 1024

    def describe(self) -> dict:
        return {"family": self.family, "layers": self.layers, "hidden": self.hidden, "heads": self.heads,
                "vocab": self.vocab, "max_positions": self.max_positions}


def random_decoder(shape: Shape, tokenizer, seed: int, dropout: float = 0.0):
    from icot.models.decoder import build_decoder, decoder_config

    torch.manual_seed(seed)
    vocab = shape.vocab or len(tokenizer)
    if vocab < len(tokenizer):
        raise UserError(f"--vocab {vocab} is smaller than the task tokenizer ({len(tokenizer)} tokens)")
    config = decoder_config(shape.family, vocab_size=vocab, layers=shape.layers, hidden=shape.hidden,
                            heads=shape.heads, max_positions=shape.max_positions, dropout=dropout,
                            eos_token_id=tokenizer.eos_token_id)
    return build_decoder(config)


def bench_device() -> torch.device:
    """CUDA when there is a GPU and DS_ACCELERATOR is not `cpu` (as for training), else the CPU."""
    from icot.engine import use_cpu

    return torch.device("cpu") if use_cpu() else torch.device("cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forced_length(decoder, separator_id: int) -> None:
    """Greedy decoding never emits the separator, so it always runs to max_new_tokens."""
    decoder.generation_config.suppress_tokens = [separator_id]


def build_mode_models(shape: Shape, task: Task, seed: int, device: torch.device | str = "cpu",
                      compiled: bool = False) -> dict[str, ModeModel]:
    """Every timed mode's model (`timed_modes`), from random decoders of `shape` (in inference form, as icot eval
    loads them); each generating decoder never emits the separator. `compiled`: each mode's compiled
    decoding beside it."""
    models = {}
    names = [mode.name for mode in timed_modes()]
    for mode in names:
        mode_class(mode).prepare_tokenizer(task.tokenizer)
    for mode in names:
        cls = mode_class(mode)
        model = cls.random_model(lambda offset: random_decoder(shape, task.tokenizer, seed + offset)).to(device).eval()
        models[mode] = cls(mode, model, task.tokenizer)
        forced_length(models[mode].decoder, task.separator_id)
        if hasattr(models[mode], "generate_as_reference"):
            models[reference_name(mode)] = ReferenceScheme(models[mode])
        if compiled:
            models[compiled_name(mode)] = CompiledScheme(models[mode])
            task.new_tokens[compiled_name(mode)] = task.new_tokens[mode]
    return models


# --------------------------------------------------------------------------------------------------
# Timing on a shared machine: fine-grained interleaving, wall and CPU time.


def _median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Timing:
    wall: list[float]   # seconds per repeat (all items)
    cpu: list[float]    # this process's CPU seconds per repeat

    def seconds(self, basis: str) -> float:
        return _median(self.cpu if basis == "cpu" else self.wall)


def interleaved(fns: dict, items: list, repeats: int, warmup: bool = True, device="cpu") -> dict[str, Timing]:
    """Time every function over all items, `repeats` times. Functions are interleaved item by item in a
    rotating order, so that a change of load on a shared machine hits them all alike; one untimed call of
    each function first (warm-up)."""
    names = list(fns)
    if warmup:
        for name in names:
            fns[name](items[0])
    timings = {name: Timing([], []) for name in names}
    for repeat in range(repeats):
        wall = dict.fromkeys(names, 0.0)
        cpu = dict.fromkeys(names, 0.0)
        for index, item in enumerate(items):
            shift = (index + repeat) % len(names)
            for name in names[shift:] + names[:shift]:
                w, c = time.perf_counter(), time.process_time()
                fns[name](item)
                _sync(torch.device(device))
                cpu[name] += time.process_time() - c
                wall[name] += time.perf_counter() - w
        for name in names:
            timings[name].wall.append(wall[name])
            timings[name].cpu.append(cpu[name])
    return timings


def timing_basis(requested: str, device: torch.device) -> str:
    """CPU time where it measures the work (CPU device, one torch thread); wall time otherwise."""
    if requested != "auto":
        return requested
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


# --------------------------------------------------------------------------------------------------
# Inference throughput.


def _batches(task: Task, size: int, device="cpu") -> list[dict[str, torch.Tensor]]:
    from icot.data.collate import collate_generate, to_device

    return [to_device(collate_generate(task.features[i:i + size], task.separator_id), device)
            for i in range(0, len(task.features), size)]


def measure_inference(task: Task, mm: dict[str, ModeModel], batch_sizes: list[int], repeats: int, basis: str, log,
                      device="cpu") -> dict:
    """Examples/s per mode and batch size: the harness's timed call (`ModeModel.generate`, which for implicit
    includes the emulator pass) over the task's examples, modes interleaved batch by batch; median of
    `repeats`."""
    n = len(task.features)
    result = {"examples": n, **{key: {m: {} for m in mm} for key in (
        "examples_per_s", "examples_per_s_wall", "examples_per_s_cpu", "seconds_wall", "seconds_cpu")}}

    def generator(mode):
        def run(batch):
            generated = mm[mode].generate(batch, task.new_tokens[mode])
            if any(len(ids) != task.new_tokens[mode] for ids in generated):
                raise RuntimeError(f"{task.name} {mode}: generated {sorted({len(i) for i in generated})} tokens, "
                                   f"expected {task.new_tokens[mode]} (is the separator suppressed?)")
        return run

    for size in batch_sizes:
        timings = interleaved({mode: generator(mode) for mode in mm}, _batches(task, size, device), repeats,
                              device=device)
        for mode, timing in timings.items():
            b = str(size)
            result["examples_per_s"][mode][b] = n / timing.seconds(basis)
            result["examples_per_s_wall"][mode][b] = n / timing.seconds("wall")
            result["examples_per_s_cpu"][mode][b] = n / timing.seconds("cpu")
            result["seconds_wall"][mode][b] = timing.wall
            result["seconds_cpu"][mode][b] = timing.cpu
            result.setdefault("ms_per_token", {}).setdefault(mode, {})[b] = (
                1000 * timing.seconds(basis) / (n * task.new_tokens[mode]))
            log(f"  {task.name} {mode:10s} batch {size:3d}: {n / timing.seconds('wall'):8.2f} ex/s wall, "
                f"{n / timing.seconds('cpu'):8.2f} ex/s cpu")
    return result


# --------------------------------------------------------------------------------------------------
# Profile of an emulator + student mode.


NEAR_TIE = 1e-4   # a logit gap under this fraction of the logits' scale is float32 round-off (GPU kernels)


@torch.no_grad()
def divergence_gap(decoder, batch: dict, reference_ids: torch.Tensor, other_ids: torch.Tensor, context) -> tuple:
    """Where two greedy decodings of one prompt batch first part (row, token), and how far apart the two
    chosen tokens' logits are there under one teacher-forced forward of the shared prefix (in `context()`,
    e.g. an injection), with the logits' scale. Random weights make near ties, which a GPU's other summation
    order can flip; a real difference in computation shows as a gap far above round-off."""
    differs = (reference_ids != other_ids).any(dim=0)
    step = int(differs.nonzero()[0])
    row = int((reference_ids[:, step] != other_ids[:, step]).nonzero()[0])
    device = batch["input_ids"].device
    prefix = reference_ids[:, :step].to(device)
    mask = torch.cat((batch["attention_mask"], batch["attention_mask"].new_ones(prefix.shape)), dim=1)
    positions = batch["position_ids"]
    positions = torch.cat((positions, positions[:, -1:] + torch.arange(1, step + 1, device=device)), dim=1)
    with context():
        logits = decoder(input_ids=torch.cat((batch["input_ids"], prefix), dim=1), attention_mask=mask,
                         position_ids=positions, use_cache=False).logits[row, -1].float()
    gap = (logits[int(reference_ids[row, step])] - logits[int(other_ids[row, step])]).abs().item()
    return row, step, gap, max(1.0, logits.abs().max().item())


def profile_implicit(task: Task, mode_model: ModeModel, batch_sizes: list[int], repeats: int, basis: str, log,
                     device="cpu") -> dict:
    """Where an emulator + student mode's time goes, in ms per example, per batch size; its student's
    decoder without injection stands for no-CoT decoding (same shape, same cost)."""
    from icot.models.decoder import StopForward, edit_block_inputs
    from icot.models.generation import greedy_decode, lean_greedy

    coupled, sep = mode_model.model, task.separator_id
    emulator, student = coupled.emulator, coupled.student
    decoder = student.decoder
    answer_tokens = task.new_tokens[mode_model.mode]
    layers = len(emulator.state_mlps)
    n = len(task.features)
    result = {}
    for size in batch_sizes:
        batches = _batches(task, size, device)
        with torch.no_grad():
            states = {id(b): emulator(b["input_ids"], b["attention_mask"], b["first_sep"],
                                      position_ids=b["position_ids"]).states for b in batches}

        # The lean loop must decode what `generate` decodes, up to near ties (see divergence_gap).
        first = batches[0]
        hf_ids = torch.tensor(mode_model.generate(first, answer_tokens))

        def injection():   # a fresh context each time: one is entered once
            return student.injection(states[id(first)], first["first_sep"])

        lean_ids = lean_greedy(decoder, first, answer_tokens, sep, injection()).cpu()
        if not torch.equal(hf_ids, lean_ids):
            row, step, gap, scale = divergence_gap(decoder, first, hf_ids, lean_ids, injection)
            if gap > NEAR_TIE * scale:
                raise RuntimeError(f"{task.name}: the lean implicit loop decodes differently from generate (row {row}, "
                                   f"token {step}: logit gap {gap:.3g} between the two choices, logits up to {scale:.3g})")
            log(f"  {task.name}: generate and the lean loop part at row {row}, token {step}, on a near tie (logit gap "
                f"{gap:.2g} of {scale:.2g}): round-off of other kernels, not another computation")

        @torch.no_grad()
        def emulator_pass(b):
            emulator(b["input_ids"], b["attention_mask"], b["first_sep"], position_ids=b["position_ids"])

        @torch.no_grad()
        def emulator_decoder_only(b):
            # The blocks the emulator runs (all but the last, see Emulator.for_inference), nothing else.
            def stop_at_last_block(layer, hidden):
                if layer == layers - 1:
                    raise StopForward
                return hidden

            with contextlib.suppress(StopForward), edit_block_inputs(emulator.decoder, stop_at_last_block):
                emulator.decoder.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                            position_ids=b["position_ids"], use_cache=False)

        @torch.no_grad()
        def student_with_injection(b):
            with student.injection(states[id(b)], b["first_sep"], prompt_pass_only=True):
                greedy_decode(decoder, b, sep, 1, answer_tokens)

        @torch.no_grad()
        def no_cot_generate(b):
            greedy_decode(decoder, b, sep, 1, answer_tokens)

        def implicit_generate(b):
            mode_model.generate(b, answer_tokens)

        def no_cot_lean(b):
            lean_greedy(decoder, b, answer_tokens, sep)

        @torch.no_grad()
        def implicit_lean(b):
            st = emulator(b["input_ids"], b["attention_mask"], b["first_sep"], position_ids=b["position_ids"]).states
            lean_greedy(decoder, b, answer_tokens, sep, student.injection(st, b["first_sep"]))

        parts = {"emulator_pass": emulator_pass,
                 "emulator_decoder_without_recurrence": emulator_decoder_only,
                 "student_decode_with_injection": student_with_injection, "no_cot_decode": no_cot_generate,
                 "implicit_total": implicit_generate, "no_cot_lean_loop": no_cot_lean,
                 "implicit_lean_loop": implicit_lean}
        timings = interleaved(parts, batches, repeats, device=device)
        ms = {name: 1000 * timing.seconds(basis) / n for name, timing in timings.items()}
        ms["student_injection"] = ms["student_decode_with_injection"] - ms["no_cot_decode"]
        ms["emulator_heads"] = ms["emulator_pass"] - ms["emulator_decoder_without_recurrence"]
        ms["hf_generate_overhead_no_cot"] = ms["no_cot_decode"] - ms["no_cot_lean_loop"]
        ratios = {
            "implicit_over_no_cot": ms["no_cot_decode"] / ms["implicit_total"],
            "implicit_over_no_cot_lean_loops": ms["no_cot_lean_loop"] / ms["implicit_lean_loop"],
            "implicit_without_emulator_heads_over_no_cot":   # what the heads' bytes cost, at most
                ms["no_cot_decode"] / (ms["implicit_total"] - ms["emulator_heads"] - ms["student_injection"]),
        }
        result[str(size)] = {"ms_per_example": ms, "throughput_ratios": ratios}
        log(f"  {task.name} profile batch {size} (ms/example, {basis}): "
            + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
    return result


# --------------------------------------------------------------------------------------------------
# Training-step overhead.


def measure_training(shape: Shape, task: Task, batch_size: int, steps: int, warmup: int, seed: int, basis: str,
                     log, lr: float = 5e-5) -> dict:
    """ms per optimizer step: icot (stage loss + Strategy.backward_step), the Trainer's whole step, and a
    minimal PyTorch AdamW loop; same model initialisation, same batches."""
    import datasets

    from icot.config import ModelConfig, Paths, TrainConfig, stage_config
    from icot.data.collate import collate_train, to_device
    from icot.data.views import tokenized_features
    from icot.engine import Strategy
    from icot.loop import Trainer, batch_order

    train = TrainConfig(lr=lr, batch_size=batch_size, zero_stage=0, max_steps=10 ** 6, log_every=10 ** 6,
                        seed=seed)
    config = stage_config("teacher", model=ModelConfig(family=shape.family, layers=shape.layers,
                                                       hidden=shape.hidden, heads=shape.heads,
                                                       max_positions=shape.max_positions), train=train)
    strategy = Strategy(train).init_distributed()
    stage = registry.get_stage("teacher").load()(config, strategy, task.tokenizer)
    model = random_decoder(shape, task.tokenizer, seed).train()
    device = strategy.device
    hand_model = copy.deepcopy(model).to(device).train()
    features = task.features
    if len(features) < batch_size:
        raise UserError(f"the training benchmark needs at least {batch_size} examples, got {len(features)}")
    train_set = datasets.Dataset.from_list(features, features=tokenized_features())
    with tempfile.TemporaryDirectory(prefix="icot-bench-") as scratch:
        trainer = Trainer(stage, config, strategy, Paths.for_stage(scratch, "teacher"), train_set)
        trainer.engine = strategy.prepare_trainable(model, total_steps=trainer.steps)
        optimizer_name = type(trainer.engine.optimizer).__name__
        hand_optimizer = torch.optim.AdamW(hand_model.parameters(), lr=train.lr, betas=tuple(train.betas),
                                           eps=train.eps, weight_decay=train.weight_decay)
        order = batch_order(len(train_set), batch_size, seed, 0)
        batches = [to_device(collate_train([features[i] for i in rows], "cot", task.separator_id), device)
                   for rows in order]

        def icot_step(batch):
            metrics = stage.loss(trainer.engine, {"cot": batch})
            strategy.backward_step(trainer.engine, metrics["loss"])

        def trainer_step(batch):
            _, tokens, flops = trainer.optimizer_step()
            trainer.progress.add_step(batch_size, tokens, flops, 0.0)   # the next step takes the next batch

        def hand_step(batch):
            output = hand_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=batch["labels"])
            output.loss.backward()
            hand_optimizer.step()
            hand_optimizer.zero_grad(set_to_none=True)

        kinds = {"icot_strategy_step": icot_step, "icot_trainer_step": trainer_step, "hand_step": hand_step}
        names = list(kinds)
        wall: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        for step in range(warmup + steps):
            batch = batches[step % len(batches)]
            shift = step % len(names)
            for name in names[shift:] + names[:shift]:
                w, c = time.perf_counter(), time.process_time()
                kinds[name](batch)
                _sync(device)
                if step >= warmup:
                    cpu[name].append(time.process_time() - c)
                    wall[name].append(time.perf_counter() - w)
    chosen = cpu if basis == "cpu" else wall
    ms = {name: 1000 * _median(values) for name, values in chosen.items()}
    ms_wall = {name: 1000 * _median(values) for name, values in wall.items()}
    log(f"  training {shape.name} ({basis} time): " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
        + "; wall: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms_wall.items())
        + f" (DeepSpeed optimizer {optimizer_name})")
    parameters = sum(p.numel() for p in hand_model.parameters())
    sequence_length = int(batches[0]["input_ids"].size(1))
    del trainer, model, hand_model, hand_optimizer
    gc.collect()
    return {
        "shape": shape.describe(), "parameters": parameters, "batch_size": batch_size,
        "sequence_length": sequence_length, "steps_timed": steps, "warmup_steps": warmup, "basis": basis,
        "ms_per_step": ms, "ms_per_step_wall": ms_wall,
        "ms_per_step_all_wall": {k: [1000 * v for v in vs] for k, vs in wall.items()},
        "ms_per_step_all_cpu": {k: [1000 * v for v in vs] for k, vs in cpu.items()},
        "deepspeed_optimizer": optimizer_name,
        "ratio_icot_strategy_over_hand": ms["icot_strategy_step"] / ms["hand_step"],
        "ratio_icot_trainer_over_hand": ms["icot_trainer_step"] / ms["hand_step"],
        "device": str(device),
        "ratio_icot_strategy_over_hand_wall": ms_wall["icot_strategy_step"] / ms_wall["hand_step"],
    }


# --------------------------------------------------------------------------------------------------
# Every method's training throughput.


def measure_methods(args: argparse.Namespace, device: torch.device, log) -> dict:
    """Every method's stages trained `--method_steps` steps at the benchmark's shape by the real trainer
    (`icot demo --method all` on its 3x2 task, the no-CoT baseline alone, bf16 on a GPU), then each
    stage's throughput as its manifest records it: tokens/s, samples/s, model TFLOPS per device and MFU
    over the optimizer steps (icot.flops). The vocabulary is the task's word tokenizer's, not GPT-2's."""
    import subprocess
    import sys

    steps, batch = args.method_steps, args.method_batch
    if steps < 1 or batch < 1:
        raise UserError("icot bench: --method_steps and --method_batch must be at least 1")
    precision = "bf16" if device.type == "cuda" else "fp32"
    with tempfile.TemporaryDirectory(prefix="icot-bench-methods-") as scratch:
        out = Path(scratch) / "methods"
        command = [sys.executable, "-m", "icot", "demo", "--method", "all", "--out", str(out), "--noparallel_baseline",
                   "--train", str(max(64, 2 * batch * steps)), "--valid", "16", "--test", "16",
                   "--eval_max_examples", "16", f"--model.family={args.family}", f"--model.layers={args.layers}",
                   f"--model.hidden={args.hidden}", f"--model.heads={args.heads}",
                   f"--model.max_positions={args.max_positions}", f"--train.batch_size={batch}",
                   f"--train.max_steps={steps}", f"--train.log_every={steps}", "--train.eval_examples=4",
                   f"--train.precision={precision}", "--stepwise.steps_per_token=1", "--coconut.steps_per_stage=1",
                   "--coconut.max_latent_stage=2"]
        if args.peak_tflops:
            command.append(f"--train.peak_tflops={args.peak_tflops}")
        if args.threads:
            command.append(f"--train.threads={args.threads}")
        log(f"[icot bench] training every method's stages, {steps} steps of {batch} at the shape ({precision})")
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"icot bench --methods: the training run failed (exit {result.returncode}):\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        stages = {}
        for manifest_path in sorted((out / "run").glob("*/manifest.json")):
            manifest = json.loads(manifest_path.read_text())
            stages[manifest["stage"]] = {"method": manifest["method"], "steps": manifest["steps"],
                                         "tokens": manifest["tokens"], **manifest.get("throughput", {})}
    order = [spec.name for spec in registry.plan([m.name for m in registry.methods() if not m.shared])]
    return {"precision": precision, "steps": steps, "batch_size": batch,
            "stages": {name: stages[name] for name in order if name in stages}}


# --------------------------------------------------------------------------------------------------
# Ratios, goals, table.


def reference_modes() -> list[str]:
    """The modes every other is compared with: those of the shared stages (no-CoT, explicit CoT)."""
    shared = {m.name for m in registry.methods() if m.shared}
    return [spec.mode.name for spec in registry.stages() if spec.mode is not None and spec.method in shared]


def inference_ratios(inference: dict, batched: int, key: str = "examples_per_s") -> dict:
    """`<mode>_over_<reference>_batch1` / `_batched` throughput ratios of every mode to each reference."""
    eps = inference[key]
    references = reference_modes()
    ratios = {}
    for mode in eps:
        if compiled_name(mode) in eps:   # compiled decoding against the same mode's eager decoding
            for suffix, size in (("batch1", "1"), ("batched", str(batched))):
                ratios[f"{compiled_name(mode)}_over_{mode}_{suffix}"] = eps[compiled_name(mode)][size] / eps[mode][size]
        if mode.endswith("_compiled") and mode != compiled_name("no_cot") and compiled_name("no_cot") in eps:
            ratios[f"{mode}_over_{compiled_name('no_cot')}_batch1"] = eps[mode]["1"] / eps[compiled_name("no_cot")]["1"]
        if mode in references or reference_name(mode) in references or is_variant(mode):
            continue
        for reference in references:
            for suffix, size in (("batch1", "1"), ("batched", str(batched))):
                ratios[f"{mode}_over_{reference}_{suffix}"] = eps[mode][size] / eps[reference][size]
        if reference_name(mode) in eps:   # batched decoding against the reference code's batch-1 scheme
            ratios[f"{mode}_batched_over_reference_batch1"] = eps[mode][str(batched)] / eps[reference_name(mode)]["1"]
            ratios[f"{mode}_batch1_over_reference_batch1"] = eps[mode]["1"] / eps[reference_name(mode)]["1"]
    return ratios


def _met(op: str, value: float, goal: float) -> bool:
    return value >= goal if op == ">=" else value <= goal


def goal_checks(ratios: dict, gpu: bool = False) -> list[dict]:
    """Each goal against its value; the decoding-overhead goals on a GPU only."""
    goals = {**GOALS, **(GPU_GOALS if gpu else {})}
    checks = []
    for task, values in ratios.get("inference", {}).items():
        for key in (k for k in values if k in goals):
            goal = goals[key]
            if isinstance(goal, dict):
                goal = goal.get(task)
                if goal is None:
                    continue
            op, target = goal
            checks.append({"name": f"{key} ({task})", "value": values[key], "goal": f"{op} {target}",
                           "met": _met(op, values[key], target)})
    for shape, value in ratios.get("train_step", {}).items():
        op, target = GOALS["train_step_ratio"]
        checks.append({"name": f"train_step_ratio ({shape})", "value": value, "goal": f"{op} {target}",
                       "met": _met(op, value, target)})
    return checks


def format_table(report: dict) -> str:
    lines = []
    tasks = list(report.get("tasks", {}))
    if tasks:
        batched = report["settings"]["batch_size"]
        basis = report["timing_basis"]
        lines.append(f"examples/s from {basis} time (median of {report['settings']['repeats']}); "
                     f"wall-clock in brackets")
        lines.append(f"{'task':6s} {'mode':18s} {'new tokens':>10s} {'batch 1':>18s} {'batch ' + str(batched):>18s} "
                     f"{'ms/token b1':>12s}")
        for task in tasks:
            entry = report["tasks"][task]
            for mode in entry["inference"]["examples_per_s"]:
                eps = entry["inference"]["examples_per_s"][mode]
                wall = entry["inference"]["examples_per_s_wall"][mode]
                per_token = entry["inference"].get("ms_per_token", {}).get(mode, {}).get("1")
                lines.append(f"{task:6s} {mode:18s} {entry['new_tokens'][mode]:10d} "
                             f"{eps['1']:8.2f} ({wall['1']:7.2f}) {eps[str(batched)]:8.2f} ({wall[str(batched)]:7.2f}) "
                             + (f"{per_token:12.3f}" if per_token is not None else ""))
        lines.append("")
        lines.append(f"{'ratio':48s}" + "".join(f"{t:>9s}" for t in tasks) + "   goal")
        keys = list(report["ratios"]["inference"][tasks[0]])
        names = {key: key.replace("_over_", " / ").replace("_batch1", ", batch 1")
                 .replace("_batched", f", batch {batched}") for key in keys}
        goals = {key: ", ".join(f"{op} {value}" + (f" ({t})" if t else "") for t, (op, value) in
                                (GOALS[key].items() if isinstance(GOALS[key], dict) else [("", GOALS[key])]))
                 for key in keys if key in GOALS}
        goals.update({key: f"{op} {value} (on a GPU)" for key, (op, value) in GPU_GOALS.items() if key in keys})
        for key, label in names.items():
            values = "".join(f"{report['ratios']['inference'][t][key]:9.2f}" for t in tasks)
            lines.append(f"{label:48s}{values}   {goals.get(key, '')}")
        if basis != "wall":
            for key, label in names.items():
                if any(key not in report["ratios"]["inference_wall"][t] for t in tasks):
                    continue
                values = "".join(f"{report['ratios']['inference_wall'][t][key]:9.2f}" for t in tasks)
                lines.append(f"{'  wall-clock: ' + label:48s}{values}")
    if report.get("methods"):
        methods = report["methods"]
        lines.append("")
        lines.append(f"training throughput per stage ({methods['steps']} steps of {methods['batch_size']}, "
                     f"{methods['precision']}; MFU where the device's peak is known)")
        lines.append(f"{'method':10s} {'stage':14s} {'tokens/s':>10s} {'samples/s':>10s} {'TFLOPS/dev':>11s} {'MFU':>7s}")
        for stage, entry in methods["stages"].items():
            mfu = f"{100 * entry['mfu']:6.1f}%" if entry.get("mfu") is not None else f"{'n/a':>7s}"
            lines.append(f"{entry['method']:10s} {stage:14s} {entry['tokens_per_s']:10.1f} {entry['samples_per_s']:10.2f} "
                         f"{entry['model_tflops_per_device']:11.4f} {mfu}")
    if report.get("training"):
        lines.append("")
        lines.append(f"{'training step (ms, ' + report['timing_basis'] + ')':22s} {'hand':>9s} {'icot':>9s} "
                     f"{'trainer':>9s} {'icot/hand':>10s} {'trainer/hand':>13s}   goal")
        for shape, entry in report["training"].items():
            ms = entry["ms_per_step"]
            lines.append(f"{shape:22s} {ms['hand_step']:9.1f} {ms['icot_strategy_step']:9.1f} "
                         f"{ms['icot_trainer_step']:9.1f} {entry['ratio_icot_strategy_over_hand']:10.3f} "
                         f"{entry['ratio_icot_trainer_over_hand']:13.3f}   <= 1.10")
    if report.get("goals"):
        lines.append("")
        for check in report["goals"]:
            verdict = "MET " if check["met"] else "MISS"
            lines.append(f"{verdict} {check['name']}: {check['value']:.3f} (goal {check['goal']})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line.


def bench_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="icot bench", description="Throughput of every registered mode and the training-step overhead.")
    p.add_argument("--task", action="append", help="task shape(s), e.g. 4x4; repeat or comma-separate "
                                                   "(default 4x4,5x5)")
    p.add_argument("--family", default="gpt2", choices=("gpt2", "llama", "mistral", "qwen2"))
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=GPT2_VOCAB, help="vocabulary size of the random models; "
                                                                 "0 = the task tokenizer's (default GPT-2's 50257)")
    p.add_argument("--max_positions", type=int, default=1024)
    p.add_argument("--examples", type=int, default=16, help="examples per task and timed pass")
    p.add_argument("--batch_size", type=int, default=16, help="the batched size")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per mode and batch size (median kept)")
    p.add_argument("--train_batch", type=int, default=8)
    p.add_argument("--train_steps", type=int, default=3, help="timed optimizer steps per kind")
    p.add_argument("--train_warmup", type=int, default=1)
    p.add_argument("--tiny_layers", type=int, default=2)
    p.add_argument("--tiny_hidden", type=int, default=64)
    p.add_argument("--tiny_heads", type=int, default=2)
    p.add_argument("--skip_inference", action="store_true")
    p.add_argument("--skip_profile", action="store_true")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_compiled", action="store_true",
                   help="time eager decoding only (default: every mode also with a static KV cache and a compiled "
                        "one-token step, as icot eval --decoding compiled; the compilation runs in the warm-up)")
    p.add_argument("--methods", action="store_true",
                   help="also train every method's stages a few steps at the shape (icot demo --method all, the "
                        "no-CoT baseline alone) and report each stage's tokens/s, samples/s, model TFLOPS and MFU")
    p.add_argument("--method_steps", type=int, default=4, help="optimizer steps per stage with --methods")
    p.add_argument("--method_batch", type=int, default=8, help="batch size per stage with --methods")
    p.add_argument("--peak_tflops", type=float,
                   help="the device's peak dense TFLOPS for MFU (default: icot's table of known GPUs; none on a CPU)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--timing", default="auto", choices=("auto", "wall", "cpu"),
                   help="what the ratios are computed from: wall-clock time, or this process's CPU time (robust "
                        "on a shared machine; meaningful with one thread on a CPU). auto: cpu on a CPU with "
                        "--threads 1, else wall")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/bench.json")
    p.add_argument("--quiet", action="store_true")
    return p


def machine_info() -> dict:
    from icot.report import cpu_model

    info = {"platform": platform.platform(), "processor": cpu_model(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = list(os.getloadavg())
    return info


def run_bench(args: argparse.Namespace, log=print) -> dict:
    tasks = [t for value in (args.task or ["4x4,5x5"]) for t in value.split(",") if t.strip()]
    for name in ("layers", "hidden", "heads", "examples", "batch_size", "repeats", "train_batch", "train_steps",
                 "tiny_layers", "tiny_hidden", "tiny_heads", "max_positions"):
        if getattr(args, name) < 1:
            raise UserError(f"icot bench: --{name} must be at least 1, got {getattr(args, name)}")
    if args.vocab < 0 or args.train_warmup < 0:
        raise UserError("icot bench: --vocab and --train_warmup must not be negative")
    for name in tasks:
        parse_task(name)
    shape = Shape("model", args.family, args.layers, args.hidden, args.heads, args.vocab, args.max_positions)
    batch_sizes = sorted({1, args.batch_size})
    device = bench_device()
    basis = timing_basis(args.timing, device)
    report = {"machine": machine_info(), "settings": {**vars(args), "tasks": tasks, "shape": shape.describe()},
              "timing_basis": basis, "device": str(device), "tasks": {}, "training": {},
              "ratios": {"inference": {}, "inference_wall": {}, "train_step": {}, "train_step_wall": {}}}
    built = {}
    for name in tasks:
        task = build_task(name, args.examples, args.seed)
        built[name] = task
        if task.prompt_len + max(task.new_tokens.values()) > args.max_positions:
            raise UserError(f"--task {name}: {task.prompt_len + max(task.new_tokens.values())} positions needed, "
                            f"--max_positions is {args.max_positions}")
    if not args.skip_inference:
        for name, task in built.items():
            log(f"[icot bench] {name}: prompt {task.prompt_len} tokens, new tokens {task.new_tokens}")
            mm = build_mode_models(shape, task, args.seed, device, compiled=not args.skip_compiled)
            entry = {"prompt_tokens": task.prompt_len, "new_tokens": task.new_tokens,
                     "inference": measure_inference(task, mm, batch_sizes, args.repeats, basis, log, device)}
            if not args.skip_profile:
                from icot.models.coupled import CoupledModel

                entry["profile"] = {mode: profile_implicit(task, model, batch_sizes, args.repeats, basis, log, device)
                                    for mode, model in mm.items() if isinstance(model.model, CoupledModel)}
            report["tasks"][name] = entry
            report["ratios"]["inference"][name] = inference_ratios(entry["inference"], args.batch_size)
            for mode in ("no_cot", "implicit"):   # the GPU goals' per-token times
                if compiled_name(mode) in entry["inference"]["ms_per_token"]:
                    report["ratios"]["inference"][name][f"{compiled_name(mode)}_ms_per_token_batch1"] = (
                        entry["inference"]["ms_per_token"][compiled_name(mode)]["1"])
            report["ratios"]["inference_wall"][name] = inference_ratios(entry["inference"], args.batch_size,
                                                                        "examples_per_s_wall")
            del mm
            gc.collect()
    if not args.skip_train:
        import torch.distributed as dist

        had_group = dist.is_available() and dist.is_initialized()
        first = built[tasks[0]]
        steps = args.train_steps + args.train_warmup
        train_task = build_task(tasks[0], max(args.train_batch * steps, args.train_batch), args.seed + 7)
        tiny = Shape("tiny", args.family, args.tiny_layers, args.tiny_hidden, args.tiny_heads, 0, args.max_positions)
        big = Shape(f"{args.layers}x{args.hidden}", args.family, args.layers, args.hidden, args.heads, args.vocab,
                    args.max_positions)
        try:
            for s in (tiny, big):
                log(f"[icot bench] training step, {s.name} shape, task {first.name} with-CoT view")
                entry = measure_training(s, train_task, args.train_batch, args.train_steps, args.train_warmup,
                                         args.seed, basis, log)
                report["training"][s.name] = entry
                report["ratios"]["train_step"][s.name] = entry["ratio_icot_strategy_over_hand"]
                report["ratios"]["train_step_wall"][s.name] = entry["ratio_icot_strategy_over_hand_wall"]
        finally:
            if not had_group and dist.is_initialized():
                dist.destroy_process_group()
    if args.methods:
        report["methods"] = measure_methods(args, device, log)
    report["goals"] = goal_checks(report["ratios"], gpu=device.type == "cuda")
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
    return report


def bench_cli(overrides: list[str]) -> None:
    """`icot bench [--task 4x4,5x5] [--layers 12 --hidden 768 ...] [--out docs/bench.json]`."""
    args = bench_parser().parse_args(overrides)
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"icot bench: --threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    try:
        report = run_bench(args, log)
    finally:
        torch.set_num_threads(previous_threads)
    report["table"] = format_table(report)
    print(report["table"])
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"[icot bench] wrote {out}")
