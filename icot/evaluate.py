"""Evaluation of every mode by one harness (DESIGN.md section 3).

A mode is declared by the stage whose export it evaluates (`icot.registry`): `no_cot` (the no-CoT
baseline), `explicit` (the teacher writes CoT, separator and answer), each method's own (ICoT-KD's
`implicit`: one emulator pass over the prompt, then the student's greedy decoding with the states
injected), and any plug-in's. Its `ModeModel` subclass loads the export and decodes.

Measured on a data file (`INPUT||COT #### ANSWER` lines, through `load_examples` + `tokenize_dataset`):

- accuracy: exact match of the answer after `####`, commas removed (`answers_match`); beside it
  `accuracy_last_number`, the CODI reference's rule (codi:test.py:136-160): the last number in the
  output equals the gold answer as a float (None where no gold answer is one number, e.g. the spaced
  digits of multiplication);
- token accuracy: teacher-forced greedy next-token accuracy on the labelled tokens (everything after the
  first separator) of the view the mode generates (the mode's declared view: with-CoT for explicit,
  without-CoT for the others), through the mode's own forward (`ModeModel.logits`);
- throughput: examples per second over the whole evaluated set, at batch size 1 (the paper's protocol)
  and batched. Only decoding is timed (the generate calls, which for implicit include the emulator pass),
  after one untimed warm-up batch; batches are collated before the clock starts. The CPU time of the
  same span is reported too (`decode_cpu_seconds_by_batch_size`): with one thread per process it is
  what the decoding costs, whatever else runs on a shared machine.

`max_new_tokens` defaults to the longest reference continuation of the mode's view over the evaluated
set (CoT + separator + `#### answer` + separator for explicit, `#### answer` + separator otherwise) plus
MAX_NEW_TOKENS_MARGIN, the cap the training loop's validation uses: a model that has learnt the format
always stops by itself before it, and one that has not cannot run away.

Under several ranks (torchrun) rank r evaluates examples r, r + world, ...; every rank runs the same
number of batches (a rank whose shard is exhausted decodes a padding batch whose output is dropped),
decoding is rank-synchronised (`synced=True`: ranks keep stepping until every rank is done, as ZeRO-3
requires), and counts are summed with one all-reduce. Timed sections start and end with a barrier, so
their length is the wall time of the whole set across ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from icot import registry
from icot.data.collate import IGNORE_INDEX, rank_batches, view_ids
from icot.data.reader import ANSWER_MARKER, normalize_answer
from icot.errors import UserError
from icot.files import check_output_file

MAX_NEW_TOKENS_MARGIN = 4
DEFAULT_BATCH_SIZE = 32


def generated_answer(tokenizer, ids: list[int]) -> str | None:
    """The normalised answer in generated ids, or None where no `####` was written."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if ANSWER_MARKER not in text:
        return None
    return normalize_answer(text)


def answers_match(tokenizer, ids: list[int], reference: str) -> bool:
    return generated_answer(tokenizer, ids) == normalize_answer(reference)


_NUMBER = re.compile(r"-?\d+\.?\d*")


def as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def last_number_matches(tokenizer, ids: list[int], reference: str) -> bool | None:
    """The CODI reference's rule: the last number in the decoded output equals the gold answer read as
    a float; None where the gold answer is not one number."""
    gold = as_number(normalize_answer(reference))
    if gold is None:
        return None
    found = _NUMBER.findall(tokenizer.decode(ids, skip_special_tokens=True).replace(",", ""))
    return bool(found) and as_number(found[-1]) == gold


# --------------------------------------------------------------------------------------------------
# What is evaluated: a mode, its model and tokenizer.


class ModeModel(ABC):
    """A loaded model of one mode: what `icot eval` decodes and teacher-forces. Each mode's subclass
    (named in its registry declaration) says what its export holds and how it decodes."""

    def __init__(self, mode: str, model: torch.nn.Module, tokenizer, folder: Path | None = None):
        self.mode = mode
        self.spec, self.stage = registry.get_mode(mode)
        self.model = model
        self.tokenizer = tokenizer
        self.separator_id = tokenizer.eos_token_id
        self.folder = folder
        self.decoding = "eager"   # how `generate` decodes (icot.models.static_decoding.DECODINGS)

    @property
    def view(self) -> str:
        return self.spec.view

    @property
    def decoder(self) -> torch.nn.Module:
        """The decoder that generates (its positions bound the generated length)."""
        return self.model

    @property
    def added_positions(self) -> int:
        """Positions the mode adds to every prompt before it decodes (continuous thoughts and their
        markers): they count against the decoder's positions beside the prompt and the new tokens."""
        return 0

    @property
    def curriculum(self) -> dict | None:
        """What the export records of its curriculum (`final`: whether it ended; `at`: where it stopped),
        None where it has none."""
        from icot.models.io import read_description

        return read_description(self.folder).get("curriculum") if self.folder is not None else None

    @property
    def unfinished(self) -> str | None:
        """A note where the export stopped before its curriculum's end (it still writes part of its CoT)."""
        curriculum = self.curriculum or {}
        if curriculum.get("final", True):
            return None
        return f"the export is at {curriculum.get('at')}, before its curriculum's end: it still writes part of its CoT"

    @classmethod
    @abstractmethod
    def holds(cls, folder: Path) -> bool:
        """Whether `folder` is an export this mode loads."""

    @classmethod
    @abstractmethod
    def load(cls, folder: Path) -> tuple[torch.nn.Module, object]:
        """(the model, its tokenizer) from an export folder."""

    @classmethod
    def prepare_tokenizer(cls, tokenizer) -> None:
        """Add what this mode's models need to a tokenizer built for `icot bench` (e.g. new tokens)."""

    @classmethod
    @abstractmethod
    def random_model(cls, random_decoder: Callable[[int], torch.nn.Module]) -> torch.nn.Module:
        """A model of this mode built from randomly initialised decoders (`random_decoder(seed)`), in
        inference form, for `icot bench`."""

    @abstractmethod
    def generate(self, batch: dict[str, torch.Tensor], max_new_tokens: int, synced: bool = False) -> list[list[int]]:
        """Greedy continuations of a left-padded prompt batch (`collate_generate`)."""

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher-forced logits on a right-padded training batch of the mode's view (`collate_train`)."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class DecoderModel(ModeModel):
    """A mode whose export is one plain Hugging Face decoder."""

    @classmethod
    def holds(cls, folder: Path) -> bool:
        return (folder / "config.json").is_file()

    @classmethod
    def load(cls, folder: Path):
        from icot.data.tokenizer_build import load_tokenizer
        from icot.models.io import load_component

        return load_component(folder, expect="decoder"), load_tokenizer(folder, "the export")

    @classmethod
    def random_model(cls, random_decoder):
        return random_decoder(0)


def mode_class(mode: str) -> type[ModeModel]:
    spec, _ = registry.get_mode(mode)
    return registry.load_object(spec.model)


def resolve_mode_folder(mode: str, path: str | os.PathLike) -> Path:
    """The export folder of `mode` in `path`: a run folder (`<path>/<stage>/export`), a stage folder
    (`<path>/export`) or the export folder itself."""
    _, stage = registry.get_mode(mode)
    cls = mode_class(mode)
    path = Path(path)
    candidates = (path / stage.name / "export", path / "export", path)
    for folder in candidates:
        if cls.holds(folder):
            check_export_stage(mode, stage.name, folder)
            return folder
    if not path.exists():
        raise UserError(f"{path}: no such folder")
    raise UserError(f"{path}: no {mode} model: looked in {candidates[0]} (a run folder), {candidates[1]} "
                    f"(a stage folder) and {path}; train the {stage.name} stage first")


def check_export_stage(mode: str, stage: str, folder: Path) -> None:
    """An icot export records the stage that wrote it: another stage's export (a CODI or Coconut decoder
    under `--mode stepwise`) would be decoded by the wrong rules and reported under the wrong name."""
    from icot.models.io import read_description

    description = read_description(folder)
    recorded = description.get("stage")
    # Another kind of component (a student where a decoder is expected) is the loader's error to give.
    if recorded is not None and recorded != stage and description.get("kind") == "decoder":
        raise UserError(f"{folder}: an export of the {recorded!r} stage, not of {stage!r}: mode {mode!r} evaluates "
                        f"{stage!r} exports (the mode of {recorded!r} is "
                        f"{stage_mode_name(recorded) or 'none'})")


def stage_mode_name(stage: str) -> str | None:
    try:
        spec = registry.get_stage(stage)
    except UserError:   # a stage this installation does not know
        return None
    return spec.mode.name if spec.mode is not None else None


def load_mode_model(mode: str, folder: str | os.PathLike, device: torch.device | str = "cpu") -> ModeModel:
    """The model and tokenizer of `mode` from its export folder (see `resolve_mode_folder`)."""
    folder = resolve_mode_folder(mode, folder)
    cls = mode_class(mode)
    model, tokenizer = cls.load(folder)
    model.to(device).eval()
    return cls(mode, model, tokenizer, folder)


# --------------------------------------------------------------------------------------------------
# Data, caps, sharding.


def load_eval_set(data_path: str | os.PathLike, tokenizer, max_examples: int | None = None) -> list[dict]:
    """Tokenized examples (cot_ids, nocot_ids, prompt_len, answer) of a data file, the first
    `max_examples` of them when given."""
    from icot.data.reader import load_examples
    from icot.data.views import tokenize_dataset

    examples = load_examples(data_path)
    if max_examples is not None:
        if max_examples < 1:
            raise UserError(f"max_examples must be at least 1, got {max_examples}")
        examples = examples.select(range(min(max_examples, len(examples))))
    return tokenize_dataset(examples, tokenizer, on_unknown="error", source=str(data_path)).to_list()


def check_fits(features: Sequence[dict], mode_model: ModeModel, source) -> None:
    """Every example's view, with what the mode adds to the prompt, must fit the model's positions (the
    teacher-forced pass reads all of it)."""
    from icot.data.reader import DataFormatError
    from icot.models.decoder import position_limit

    limit, view, added = position_limit(mode_model.decoder), mode_model.view, mode_model.added_positions
    for feature in features:
        length = len(view_ids(feature, view)) + added
        if limit is not None and length > limit:
            what = f"the {view} view" + (f" with the mode's {added} added positions" if added else "")
            raise DataFormatError(source, feature.get("line"), f"{what} has {length} tokens, more than the model's "
                                                               f"{limit} positions")


def continuation_length(feature: dict, view: str) -> int:
    """Tokens after the prompt in the reference `view` of an example (through the final separator)."""
    return len(view_ids(feature, view)) - int(feature["prompt_len"])


def default_max_new_tokens(features: Sequence[dict], view: str) -> int:
    """The longest reference continuation of a view, plus MAX_NEW_TOKENS_MARGIN."""
    return max(continuation_length(f, view) for f in features) + MAX_NEW_TOKENS_MARGIN


def fit_positions(decoder: torch.nn.Module, features: Sequence[dict], max_new_tokens: int, given: bool,
                  added: int = 0) -> int:
    """`max_new_tokens`, lowered to what the model's positions leave after the longest prompt (with the
    mode's `added` positions: thoughts, a position shift) when it was derived from the data; a value given
    by the user that does not fit is an error."""
    from icot.models.decoder import position_limit

    limit = position_limit(decoder)
    longest = max(int(f["prompt_len"]) for f in features) + added
    if limit is None or longest + max_new_tokens <= limit:
        return max_new_tokens
    if given or longest >= limit:
        prompt = f"the longest prompt with the mode's {added} added positions" if added else "the longest prompt"
        raise UserError(f"{prompt} ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the model's "
                        f"{limit} positions; lower --max_new_tokens or leave out the longest examples")
    return limit - longest


class _Ranks:
    """Rank, world size and the two collectives the harness needs, from a Strategy or for one process."""

    def __init__(self, strategy=None):
        self.strategy = strategy
        self.rank = strategy.rank if strategy is not None else 0
        self.world_size = strategy.world_size if strategy is not None else 1

    @property
    def synced(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.strategy is not None:
            self.strategy.barrier()

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        return self.strategy.all_reduce_sum(values) if self.strategy is not None else dict(values)

    def gather(self, items: list) -> list:
        if self.world_size == 1:
            return items
        import torch.distributed as dist

        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, items)
        return [item for part in gathered for item in part]


# --------------------------------------------------------------------------------------------------
# The measurements.


@dataclass
class DecodePass:
    generated: dict[int, list[int]]   # example index -> generated ids (this rank's examples)
    seconds: float                    # wall time of the timed decoding (barrier to barrier)
    cpu_seconds: float = 0.0          # this process's CPU time over the same span (all its threads)


def decode_pass(mode_model: ModeModel, features: Sequence[dict], batch_size: int, max_new_tokens: int,
                ranks: _Ranks | None = None, device="cpu", warmup: bool = True) -> DecodePass:
    """Greedy decoding of this rank's shard in batches of `batch_size`, timing only the generate calls."""
    from icot.data.collate import collate_generate, to_device

    ranks = ranks or _Ranks()
    batches = []
    for rows in rank_batches(len(features), batch_size, ranks.rank, ranks.world_size):
        chosen = [features[i] for i in (rows or [0])]
        batches.append((rows, to_device(collate_generate(chosen, mode_model.separator_id), device)))
    if warmup and batches:
        mode_model.generate(batches[0][1], max_new_tokens, ranks.synced)
        if mode_model.decoding == "compiled" and batches[-1][1]["input_ids"].shape != batches[0][1]["input_ids"].shape:
            mode_model.generate(batches[-1][1], max_new_tokens, ranks.synced)   # compiled for its shape too
    outputs = []
    ranks.barrier()
    started, cpu_started = time.perf_counter(), time.process_time()
    for rows, batch in batches:
        outputs.append((rows, mode_model.generate(batch, max_new_tokens, ranks.synced)))
    cpu_seconds = time.process_time() - cpu_started
    ranks.barrier()
    seconds = time.perf_counter() - started
    generated = {index: ids for rows, rows_ids in outputs for index, ids in zip(rows, rows_ids)}
    return DecodePass(generated, seconds, cpu_seconds)


def token_counts(mode_model: ModeModel, features: Sequence[dict], batch_size: int, ranks: _Ranks | None = None,
                 device="cpu") -> tuple[int, int]:
    """(correctly predicted, labelled) next tokens of this rank's shard, teacher forced on the mode's view."""
    from icot.data.collate import collate_train, to_device

    ranks = ranks or _Ranks()
    correct = labelled = 0
    for rows in rank_batches(len(features), batch_size, ranks.rank, ranks.world_size):
        chosen = [features[i] for i in (rows or [0])]
        batch = to_device(collate_train(chosen, mode_model.view, mode_model.separator_id), device)
        predicted = mode_model.logits(batch)[:, :-1].argmax(dim=-1)
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        if rows:
            correct += int((predicted.eq(targets) & mask).sum())
            labelled += int(mask.sum())
    return correct, labelled


def _default_device(strategy=None) -> torch.device:
    if strategy is not None:
        return strategy.device
    from icot.engine import use_cpu

    return torch.device("cpu") if use_cpu() else torch.device("cuda")


def evaluate_loaded(mode_model: ModeModel, features: Sequence[dict],
                    batch_sizes: Sequence[int] = (1, DEFAULT_BATCH_SIZE), strategy=None,
                    max_new_tokens: int | None = None, warmup: bool = True, return_predictions: bool = False,
                    device=None, decoding: str = "eager") -> dict:
    """`evaluate_mode` on a model and tokenized examples already in memory (see `evaluate_mode`)."""
    from icot.models.static_decoding import check_decoding

    started = time.perf_counter()
    mode_model.decoding = check_decoding(decoding, strategy is not None and strategy.world_size > 1)
    ranks = _Ranks(strategy)
    device = device if device is not None else _default_device(strategy)
    if not features:
        raise UserError("no examples to evaluate")
    sizes = sorted(set(int(b) for b in batch_sizes))
    if not sizes or sizes[0] < 1:
        raise UserError(f"batch sizes must be at least 1, got {list(batch_sizes)}")
    given = max_new_tokens is not None
    unfinished = mode_model.unfinished
    if max_new_tokens is None:   # an export before its curriculum's end writes CoT: room for all of it
        max_new_tokens = default_max_new_tokens(features, "cot" if unfinished else mode_model.view)
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    wanted = max_new_tokens
    max_new_tokens = fit_positions(mode_model.decoder, features, max_new_tokens, given, mode_model.added_positions)

    passes = {size: decode_pass(mode_model, features, size, max_new_tokens, ranks, device, warmup) for size in sizes}
    batched = sizes[-1]
    sums = {}
    for size, result in passes.items():
        sums[f"correct_{size}"] = float(sum(answers_match(mode_model.tokenizer, ids, features[i]["answer"])
                                            for i, ids in result.generated.items()))
        sums[f"answered_{size}"] = float(sum(generated_answer(mode_model.tokenizer, ids) is not None
                                             for ids in result.generated.values()))
        sums[f"seconds_{size}"] = result.seconds
        sums[f"cpu_seconds_{size}"] = result.cpu_seconds
    last_number = [last_number_matches(mode_model.tokenizer, ids, features[i]["answer"])
                   for i, ids in passes[batched].generated.items()]
    sums["last_number_correct"] = float(sum(bool(match) for match in last_number))
    sums["last_number_examples"] = float(sum(match is not None for match in last_number))
    sums["examples"] = float(len(passes[batched].generated))
    sums["correct_tokens"], sums["label_tokens"] = (float(c) for c in token_counts(
        mode_model, features, batched, ranks, device))
    totals = ranks.sum(sums)

    examples = int(totals["examples"])
    seconds = {size: totals[f"seconds_{size}"] / ranks.world_size for size in sizes}
    accuracy = {size: totals[f"correct_{size}"] / examples for size in sizes}
    result = {
        "mode": mode_model.mode,
        "model": str(mode_model.folder) if mode_model.folder is not None else None,
        "examples": examples,
        "accuracy": accuracy[batched],
        "token_accuracy": totals["correct_tokens"] / max(totals["label_tokens"], 1.0),
        "accuracy_last_number": (totals["last_number_correct"] / totals["last_number_examples"]
                                 if totals["last_number_examples"] else None),
        "examples_per_s_batch1": examples / seconds[1] if 1 in seconds else None,
        "examples_per_s_batched": examples / seconds[batched],
        "batch_size": batched,
        "seconds": None,  # filled below: the whole evaluation's wall time
        "answered": totals[f"answered_{batched}"] / examples,
        "label_tokens": int(totals["label_tokens"]),
        "accuracy_by_batch_size": {str(size): accuracy[size] for size in sizes},
        "decode_seconds_by_batch_size": {str(size): seconds[size] for size in sizes},
        # CPU time of the decoding, summed over ranks: on a shared machine with one thread per rank
        # it is the better estimate of what the decoding costs when nothing else runs.
        "decode_cpu_seconds_by_batch_size": {str(size): totals[f"cpu_seconds_{size}"] for size in sizes},
        "examples_per_s_by_batch_size": {str(size): examples / seconds[size] for size in sizes},
        "max_new_tokens": max_new_tokens,
        "max_new_tokens_from": "argument" if given else (
            f"data (longest with-CoT reference + {MAX_NEW_TOKENS_MARGIN})" if unfinished else
            f"data (longest reference + {MAX_NEW_TOKENS_MARGIN})" if wanted == max_new_tokens else
            f"data (longest reference + {MAX_NEW_TOKENS_MARGIN} = {wanted}, lowered to fit the model's positions)"),
        "unfinished": unfinished,
        "world_size": ranks.world_size,
        "decoding": decoding,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if return_predictions:
        mine = [(i, generated_answer(mode_model.tokenizer, ids)) for i, ids in passes[batched].generated.items()]
        result["predictions"] = [answer for _, answer in sorted(ranks.gather(mine))]
    result["seconds"] = time.perf_counter() - started
    return result


def evaluate_mode(mode: str, folder_or_run: str | os.PathLike, data_path: str | os.PathLike,
                  batch_sizes: Sequence[int] = (1, DEFAULT_BATCH_SIZE), max_examples: int | None = None,
                  strategy=None, *, max_new_tokens: int | None = None, warmup: bool = True,
                  return_predictions: bool = False, decoding: str = "eager") -> dict:
    """Accuracy, token accuracy and throughput of `mode` on a data file.

    `folder_or_run`: a run folder (the mode's stage export is taken from it), a stage folder or an
    export folder. `batch_sizes`: every size is decoded over the whole set and timed; accuracy and
    `examples_per_s_batched` come from the largest, `examples_per_s_batch1` from size 1 (None if 1 is
    not among them). `decoding`: eager, static or compiled (`icot.models.static_decoding`; the warm-up
    call compiles). `strategy`: an initialised `icot.engine.Strategy` to shard across its ranks (every
    rank must call; every rank gets the gathered result); None evaluates everything in this process.

    Returns a dict with keys accuracy, token_accuracy, examples, examples_per_s_batch1,
    examples_per_s_batched, batch_size, seconds (wall time of the whole call), and details: mode,
    model, answered (fraction of outputs with `####`), accuracy_by_batch_size,
    decode_seconds_by_batch_size, examples_per_s_by_batch_size, max_new_tokens, world_size, device,
    and `predictions` (normalised answer or None per example, in file order) if asked for.
    """
    started = time.perf_counter()
    registry.get_mode(mode)
    if not Path(data_path).exists():
        raise UserError(f"{data_path}: no such data file")
    device = _default_device(strategy)
    mode_model = load_mode_model(mode, folder_or_run, device)
    features = load_eval_set(data_path, mode_model.tokenizer, max_examples)
    check_fits(features, mode_model, data_path)
    result = evaluate_loaded(mode_model, features, batch_sizes, strategy, max_new_tokens=max_new_tokens,
                             warmup=warmup, return_predictions=return_predictions, device=device,
                             decoding=decoding)
    result["data"] = str(data_path)
    result["seconds"] = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------------
# Command line.


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line UserErrors (exit 2 through the icot CLI)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def eval_parser() -> argparse.ArgumentParser:
    from icot.models.static_decoding import DECODINGS

    parser = _Parser(prog="icot eval", description="Accuracy, token accuracy and throughput of one mode.")
    parser.add_argument("--mode", required=True, choices=registry.mode_names(),
                        help="the mode to evaluate (each reads the export of the stage that serves it: " +
                             ", ".join(f"{m.name} <- {registry.get_mode(m.name)[1].name}" for m in registry.modes()) + ")")
    parser.add_argument("--data", required=True, help="a data file of INPUT||COT #### ANSWER lines, a Coconut JSON "
                                                      "list or a dataset folder (icot data convert --help)")
    parser.add_argument("--run_dir", help="a run folder: the mode's stage export is read from it")
    parser.add_argument("--model", help="an export (or stage) folder; overrides --run_dir")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="the batched size (default 32)")
    parser.add_argument("--max_examples", type=int, help="evaluate the first N examples only")
    parser.add_argument("--max_new_tokens", type=int,
                        help=f"generation cap; default: the longest reference continuation of the mode's view "
                             f"in the data + {MAX_NEW_TOKENS_MARGIN}")
    parser.add_argument("--skip_batch1", action="store_true",
                        help="skip the batch-1 pass (examples_per_s_batch1 is then null)")
    parser.add_argument("--out", help="write the JSON result here")
    parser.add_argument("--tb", help="write TensorBoard scalars eval/<mode>/<metric> into this folder")
    parser.add_argument("--step", type=int, default=0, help="the TensorBoard step of the scalars (default 0)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); on a "
                                                    "busy CPU, 1 is often much faster for small models")
    parser.add_argument("--decoding", default="eager", choices=DECODINGS,
                        help="eager: transformers' generate (or the thought loop) with a growing KV cache; "
                             "static: a static KV cache and a one-token step; compiled: that step through "
                             "torch.compile (CUDA graphs on a GPU), compiled in an untimed warm-up call. The "
                             "answers are the same; compiled removes the per-token Python overhead")
    return parser


def write_tensorboard(folder: str | os.PathLike, result: dict, step: int = 0) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for key in ("accuracy", "token_accuracy", "examples_per_s_batch1", "examples_per_s_batched", "answered"):
            if result.get(key) is not None:
                writer.add_scalar(f"eval/{result['mode']}/{key}", result[key], step)
        writer.flush()
    finally:
        writer.close()


def _distributed_strategy():
    """A Strategy over torchrun's ranks, or None in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from icot.config import TrainConfig
    from icot.engine import Strategy

    world = int(os.environ["WORLD_SIZE"])
    return Strategy(TrainConfig(batch_size=world)).init_distributed()


def evaluate_cli(overrides: list[str]) -> None:
    """`icot eval --mode M --data FILE [--run_dir RUN | --model PATH] [...]`: print and write the JSON."""
    args = eval_parser().parse_args(overrides)
    if args.model is None and args.run_dir is None:
        raise UserError("icot eval: give --run_dir RUN or --model PATH")
    for name in ("batch_size", "max_examples", "max_new_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"icot eval: --{name} must be at least 1, got {value}")
    if args.model is not None:
        folder = resolve_mode_folder(args.mode, args.model)
    else:
        stage = registry.get_mode(args.mode)[1].name
        folder = Path(args.run_dir) / stage / "export"
        if not mode_class(args.mode).holds(folder):
            raise UserError(f"{folder}: no {args.mode} export; train the {stage} stage first "
                            f"(icot train {stage}) or pass --model")
    if not Path(args.data).exists():
        raise UserError(f"--data: {args.data}: no such data file")
    if args.out:   # checked now, not after the whole evaluation
        check_output_file(Path(args.out), "--out")
    sizes = (args.batch_size,) if args.skip_batch1 else (1, args.batch_size)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    strategy = _distributed_strategy()
    try:
        result = evaluate_mode(args.mode, folder, args.data, batch_sizes=sizes, max_examples=args.max_examples,
                               strategy=strategy, max_new_tokens=args.max_new_tokens, decoding=args.decoding)
    except BaseException:
        if strategy is not None:  # no barrier: the other ranks may be inside another collective
            import torch.distributed as dist

            dist.destroy_process_group()
        raise
    if strategy is None or strategy.is_main:
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        if args.tb:
            write_tensorboard(args.tb, result, args.step)
    if strategy is not None:
        strategy.shutdown()
        strategy.exit_process()
