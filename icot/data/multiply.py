"""Multiplication data in the implicit-CoT papers' line format, generated with numpy.

A line for a x b, every number written as digits least-significant first, separated by spaces:

    A * B||P0 + P1 ( S1 ) + P2 ( S2 ) + ... + Pm #### ANSWER

P_i is a times the i-th digit of b, padded to len(a) + 1 digits and shifted by i zeros; S_i is the
running sum P0 + ... + P_i, written with as many digits as P_i (it always fits, since
a * (b mod 10^(i+1)) < 10^(len(a)+1+i)); a running sum follows every partial product except the first
and the last. ANSWER is a * b padded to len(a) + len(b) digits. For equal lengths this reproduces the
reference files byte for byte; for unequal lengths the same rules apply to len(a) and len(b).

That is the "paper" layout. Two more layouts write the same inputs and answers with another CoT:
- "final_sum": the last partial product is followed by its running sum too (`... + Pm ( Sm )`, Sm
  being the answer), so the CoT carries out the final addition instead of leaving it to the answer.
- "columns": the CoT is the schoolbook column sums, least-significant column first, one number (one
  word) each: C_k = sum of a_i * b_j over i + j = k, plus C_(k-1) // 10. The answer's digit k is
  C_k mod 10 and its top digit the last carry. Each C_k is zero-padded to the width of its largest
  possible value, so every line of one shape has the same layout. 865 x 91 reads
  `5 6 8 * 1 9||05 051 067 78 #### 5 1 7 8 7`.

Every line of one operand shape has the same layout, so a batch of lines renders into one uint8
character matrix with digit arithmetic vectorised over the batch: no per-line Python.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from icot.errors import UserError

MIN_DIGITS = 2
MAX_DIGITS = 20
SPLITS = ("train", "valid", "test")
FORMATS = ("txt", "datasets")
LAYOUTS = ("paper", "final_sum", "columns")
# Lines are rendered and written this many at a time, which bounds memory (about 8 MB for 4x4).
RENDER_CHUNK_ROWS = 1 << 16
# Pair indices must fit in int64; larger spaces sample digits directly and drop the (rare) repeats.
INDEX_SAMPLING_LIMIT = 2**62

_ZERO, _SPACE, _NEWLINE = ord("0"), ord(" "), ord("\n")
_MULTIPLICATION_INPUT = re.compile(r"\d(?: \d)* \* \d(?: \d)*")


# ----------------------------------------------------------------------------------------- parsing

def multiplication_shape(question: str) -> tuple[int, int] | None:
    """(digits_a, digits_b) when `question` reads like `1 3 4 5 * 8 1 9 3`, else None."""
    if not _MULTIPLICATION_INPUT.fullmatch(question):
        return None
    left, right = question.split(" * ")
    return (len(left) + 1) // 2, (len(right) + 1) // 2


def parse_operands(line: str) -> tuple[int, int, int, int]:
    """(a, b, digits_a, digits_b) from a line or its input part (`1 3 4 5 * 8 1 9 3` is 5431 x 3918)."""
    question = line.split("||", 1)[0].strip()
    shape = multiplication_shape(question)
    if shape is None:
        raise UserError(f"not a multiplication input: {question[:80]!r}")
    left, right = question.split(" * ")
    return int(left.replace(" ", "")[::-1]), int(right.replace(" ", "")[::-1]), shape[0], shape[1]


def digits_from_inputs(questions: list[str], digits_a: int, digits_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Operand digit rows (n, digits) for inputs that all have the shape digits_a x digits_b."""
    width = 2 * (digits_a + digits_b) + 1  # digits, the spaces between them and " * "
    chars = np.frombuffer("".join(questions).encode("ascii"), np.uint8).reshape(len(questions), width)
    return chars[:, 0:2 * digits_a:2] - _ZERO, chars[:, 2 * digits_a + 2::2] - _ZERO


# --------------------------------------------------------------------------------------- rendering

def render_line(a: int, b: int, digits_a: int, digits_b: int, layout: str = "paper") -> str:
    """The line for a x b, without the trailing newline."""
    rows = render_rows(_digit_row(a, digits_a, "a"), _digit_row(b, digits_b, "b"), layout)
    return rows.tobytes().decode("ascii").rstrip("\n")


def render_rows(a_digits: np.ndarray, b_digits: np.ndarray, layout: str = "paper") -> np.ndarray:
    """Lines for operand digit rows (n, digits_a) and (n, digits_b), least-significant digit first.

    Returns an (n, width) uint8 array of ASCII codes, each row one line ending in a newline.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    # One contiguous row per digit position keeps the per-position arithmetic on contiguous memory.
    a = np.ascontiguousarray(np.asarray(a_digits, np.uint8).T)
    b = np.ascontiguousarray(np.asarray(b_digits, np.uint8).T)
    digits_a, digits_b, rows = len(a), len(b), a.shape[1]
    running_sum = np.zeros((digits_a + digits_b, rows), np.uint8)
    parts: list[str | np.ndarray | _Number] = [a, " * ", b, "||"]
    for i in range(digits_b):
        partial = _times_digit(a, b[i])
        _add_shifted(running_sum, partial, shift=i)
        if layout == "columns":
            continue
        if i:
            parts += [" + ", "0 " * i]
        parts.append(partial)
        if 0 < i < digits_b - 1 or (i and layout == "final_sum"):
            parts += [" ( ", running_sum[:digits_a + 1 + i].copy(), " )"]
    if layout == "columns":
        for k, column_sum in enumerate(_column_sums(a, b)):
            parts += [" "] * (k > 0) + [column_sum]
    parts += [" #### ", running_sum]
    return _assemble(parts, rows)


class _Number(NamedTuple):
    """Digits (width, n), most-significant first, written without spaces: one word per row."""
    digits: np.ndarray


def _column_sums(a: np.ndarray, b: np.ndarray) -> list[_Number]:
    """The column sums C_k (with the carry of C_(k-1)) of a (digits_a, n) times b (digits_b, n)."""
    sums, carry, largest_carry = [], np.zeros(a.shape[1], np.uint16), 0
    for k in range(len(a) + len(b) - 1):
        terms = [(i, k - i) for i in range(len(a)) if 0 <= k - i < len(b)]
        total = carry.copy()
        for i, j in terms:
            total += a[i].astype(np.uint16) * b[j]   # at most 20 * 81 plus a carry: uint16 is safe
        largest = 81 * len(terms) + largest_carry
        width = len(str(largest))
        sums.append(_Number(np.stack([total // 10**(width - 1 - d) % 10 for d in range(width)]).astype(np.uint8)))
        carry, largest_carry = total // 10, largest // 10
    return sums


def _digit_row(value: int, digits: int, name: str) -> np.ndarray:
    if not 0 <= value < 10**digits:
        raise ValueError(f"{name}={value} does not fit in {digits} digits")
    return np.frombuffer(str(value).zfill(digits)[::-1].encode("ascii"), np.uint8)[None, :] - _ZERO


def _times_digit(a: np.ndarray, digit: np.ndarray) -> np.ndarray:
    """a (digits, n) times one digit per row: len(a) + 1 digits, the last being the final carry."""
    product = np.empty((len(a) + 1, a.shape[1]), np.uint8)
    carry = np.zeros(a.shape[1], np.uint8)
    for position, a_digit in enumerate(a):
        carry, product[position] = np.divmod(a_digit * digit + carry, 10)  # at most 9 * 9 + 8: uint8 is safe
    product[-1] = carry
    return product


def _add_shifted(total: np.ndarray, partial: np.ndarray, shift: int) -> None:
    """total += partial * 10^shift, in place; the sum never carries past the partial's top digit."""
    carry = np.zeros(total.shape[1], np.uint8)
    for position, digit in enumerate(partial, start=shift):
        carry, total[position] = np.divmod(total[position] + digit + carry, 10)


def _assemble(parts: list[str | np.ndarray | _Number], rows: int) -> np.ndarray:
    """Lay literal text, digit groups (digits, n) and numbers side by side; the digits of a group are
    space separated, those of a number are not."""
    def span(part) -> int:
        if isinstance(part, str):
            return len(part)
        return len(part.digits) if isinstance(part, _Number) else 2 * len(part) - 1

    chars = np.full((rows, sum(map(span, parts)) + 1), _SPACE, np.uint8)
    column = 0
    for part in parts:
        if isinstance(part, str):
            chars[:, column:column + len(part)] = np.frombuffer(part.encode("ascii"), np.uint8)
        elif isinstance(part, _Number):
            chars[:, column:column + span(part)] = part.digits.T + _ZERO
        else:
            chars[:, column:column + span(part):2] = part.T + _ZERO
        column += span(part)
    chars[:, column] = _NEWLINE
    return chars


# ---------------------------------------------------------------------------------------- sampling

def pair_count(digits_a: int, digits_b: int) -> int:
    """How many (a, b) pairs have exactly digits_a and digits_b digits (no leading zero, as in the papers)."""
    return 9 * 10 ** (digits_a - 1) * 9 * 10 ** (digits_b - 1)


def sample_pairs(digits_a: int, digits_b: int, count: int, seed: int,
                 exclude: set[bytes] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct pairs in random order, as digit rows (count, digits) least-significant first.
    `exclude`: pairs never to draw, as `pair_keys` (e.g. an official test set's)."""
    available = pair_count(digits_a, digits_b) - len(exclude)
    if count > available:
        raise UserError(f"asked for {count} pairs, but only {available} distinct "
                        f"{digits_a}x{digits_b}-digit pairs exist" + (" outside the excluded ones" if exclude else ""))
    rng = np.random.default_rng(seed)
    drawn = count + len(exclude)   # enough that `count` remain once the excluded ones are dropped
    if pair_count(digits_a, digits_b) <= INDEX_SAMPLING_LIMIT:
        a_rows, b_rows = _sample_by_index(rng, digits_a, digits_b, drawn)
    else:
        a_rows, b_rows = _sample_by_digits(rng, digits_a, digits_b, drawn)
    if exclude:
        keep = np.fromiter((key not in exclude for key in pair_keys(a_rows, b_rows)), bool, len(a_rows))
        a_rows, b_rows = a_rows[keep], b_rows[keep]
    return a_rows[:count], b_rows[:count]


def pair_keys(a_rows: np.ndarray, b_rows: np.ndarray) -> list[bytes]:
    """One hashable key per (a, b) pair of digit rows."""
    rows = np.ascontiguousarray(np.concatenate([a_rows, b_rows], axis=1), dtype=np.uint8)
    return [row.tobytes() for row in rows]


def excluded_pairs(files, digits_a: int, digits_b: int) -> set[bytes]:
    """The operand pairs of data files (every line a digits_a x digits_b multiplication), as `pair_keys`."""
    from icot.data.reader import DataFormatError, iter_examples

    questions = []
    for path in files:
        for line_number, example in iter_examples(path):
            if multiplication_shape(example.question) != (digits_a, digits_b):
                raise DataFormatError(path, line_number, f"--exclude: not a {digits_a}x{digits_b}-digit "
                                                         f"multiplication: {example.question[:80]!r}")
            questions.append(example.question)
    return set(pair_keys(*digits_from_inputs(questions, digits_a, digits_b))) if questions else set()


def _sample_by_index(rng: np.random.Generator, digits_a: int, digits_b: int, count: int):
    """Exact sampling without replacement over all pair indices: needed where the space is small."""
    index = rng.choice(pair_count(digits_a, digits_b), size=count, replace=False)
    choices_b = 9 * 10 ** (digits_b - 1)
    a = index // choices_b + 10 ** (digits_a - 1)
    b = index % choices_b + 10 ** (digits_b - 1)
    return _digits_of(a, digits_a), _digits_of(b, digits_b)


def _digits_of(values: np.ndarray, digits: int) -> np.ndarray:
    rows = np.empty((len(values), digits), np.uint8)
    for position in range(digits):
        values, rows[:, position] = np.divmod(values, 10)
    return rows


def _sample_by_digits(rng: np.random.Generator, digits_a: int, digits_b: int, count: int):
    """Uniform digits with a non-zero leading digit; repeats (vanishingly rare at this size) are redrawn."""
    pairs = np.empty((0, digits_a + digits_b), np.uint8)
    while len(pairs) < count:
        fresh = rng.integers(0, 10, size=(count - len(pairs), digits_a + digits_b), dtype=np.uint8)
        for leading in (digits_a - 1, digits_a + digits_b - 1):
            fresh[:, leading] = rng.integers(1, 10, size=len(fresh), dtype=np.uint8)
        pairs = _first_occurrences(np.concatenate([pairs, fresh]))
    return pairs[:, :digits_a], pairs[:, digits_a:]


def _first_occurrences(rows: np.ndarray) -> np.ndarray:
    """Rows without repeats, keeping each row's first occurrence and the original order."""
    keys = np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1]))).ravel()
    _, first = np.unique(keys, return_index=True)
    return rows[np.sort(first)]


# -------------------------------------------------------------------------------------- generation

def write_lines(path: Path, a_digits: np.ndarray, b_digits: np.ndarray, layout: str = "paper") -> None:
    """Render and write the lines chunk by chunk; the file appears only once complete."""
    partial_path = path.with_name(path.name + ".partial")
    with partial_path.open("wb") as handle:
        for start in range(0, len(a_digits), RENDER_CHUNK_ROWS):
            stop = start + RENDER_CHUNK_ROWS
            handle.write(render_rows(a_digits[start:stop], b_digits[start:stop], layout).tobytes())
    os.replace(partial_path, path)


def generate_splits(out: Path, digits_a: int, digits_b: int, sizes: dict[str, int], seed: int,
                    format: str = "txt", layout: str = "paper", exclude=()) -> dict[str, Path]:
    """Write `<out>/<split>.txt` for each split with a non-zero size; splits never share a pair, nor any
    pair of the `exclude` files (an official validation or test set the training data must not hold).

    A zero-size split writes no file and removes a stale one, so the folder matches one run. With
    format="datasets", a `datasets.DatasetDict` of the same lines is also saved to `<out>/dataset`.
    """
    excluded = excluded_pairs(exclude, digits_a, digits_b)
    out.mkdir(parents=True, exist_ok=True)
    a_digits, b_digits = sample_pairs(digits_a, digits_b, sum(sizes.values()), seed, excluded)
    written, start = {}, 0
    for split, size in sizes.items():
        path = out / f"{split}.txt"
        if size:
            write_lines(path, a_digits[start:start + size], b_digits[start:start + size], layout)
            written[split] = path
        elif path.exists():
            path.unlink()
        start += size
    if format == "datasets":
        save_dataset(written, out / "dataset")
    return written


def save_dataset(text_files: dict[str, Path], target: Path) -> None:
    """Save the text files as a DatasetDict (columns question / cot / answer) through the one reader."""
    import datasets

    from icot.data.reader import load_examples

    if target.exists():
        if not (target / "dataset_dict.json").is_file():
            raise UserError(f"{target} exists and is not a saved dataset; move it away first")
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory(prefix="icot-dataset-") as cache_dir:
        splits = datasets.DatasetDict({name: load_examples(path, cache_dir=cache_dir)
                                       for name, path in text_files.items()})
        splits.save_to_disk(str(target))
        del splits  # release the memory-mapped cache files before the folder goes


def layout_label(layout: str) -> str:
    """The words the generators print after the task name for a layout other than the papers'."""
    return {"paper": "", "final_sum": ", final sum in the CoT", "columns": ", column sums as the CoT"}[layout]


def generate_splits_cli(digits=None, digits_a=None, digits_b=None, train=808000, valid=1000, test=1000,
                        seed=0, out="data/mult", format="txt", layout="paper", exclude=()) -> None:
    """`icot data multiply`: check the options, generate, print a short summary."""
    # Fire hands over `a,b` as a tuple or as one string, depending on what the paths look like.
    exclude = [p for p in exclude.split(",") if p] if isinstance(exclude, str) else list(exclude)
    for path in exclude:
        if not Path(str(path)).is_file():
            raise UserError(f"--exclude: no such data file {path}")
    digits_a, digits_b = _operand_lengths(digits, digits_a, digits_b)
    sizes = {name: _whole_number(name, value, minimum=0)
             for name, value in zip(SPLITS, (train, valid, test))}
    if not sum(sizes.values()):
        raise UserError("--train, --valid and --test are all 0: nothing to generate")
    seed = _whole_number("seed", seed, minimum=0)
    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    out = Path(str(out))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    started = time.perf_counter()
    written = generate_splits(out, digits_a, digits_b, sizes, seed, format, layout, exclude=exclude)
    elapsed = time.perf_counter() - started
    print(f"{digits_a}x{digits_b}-digit multiplication{layout_label(layout)}, seed {seed} -> {out}"
          + (f", no pair of {', '.join(map(str, exclude))}" if exclude else ""))
    for split, path in written.items():
        print(f"  {path.name:<10} {sizes[split]:>9} lines")
    if format == "datasets":
        print(f"  {'dataset/':<10} DatasetDict with splits {', '.join(written)}")
    print(f"{sum(sizes.values())} lines in {elapsed:.1f} s")


def _operand_lengths(digits, digits_a, digits_b) -> tuple[int, int]:
    digits_a = digits if digits_a is None else digits_a
    digits_b = digits if digits_b is None else digits_b
    if digits_a is None or digits_b is None:
        raise UserError("give --digits N (both operands), or --digits_a and --digits_b")
    return (_whole_number("digits_a", digits_a, MIN_DIGITS, MAX_DIGITS),
            _whole_number("digits_b", digits_b, MIN_DIGITS, MAX_DIGITS))


def _whole_number(name: str, value, minimum: int, maximum: int | None = None) -> int:
    """Fire hands over ints, floats (`8e5`), strings or True (a bare flag): accept whole numbers only."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"--{name} must be a whole number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise UserError(f"--{name} must be {allowed}, got {value}")
    return value
