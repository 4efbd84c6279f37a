"""Multiplication rendering, parsing, sampling and split generation."""

import random
import re

import numpy as np
import pytest

from icot.data import multiply
from icot.data.multiply import (digits_from_inputs, generate_splits_cli, multiplication_shape,
                                pair_count, parse_operands, render_line, render_rows, sample_pairs)
from icot.data.reader import load_hf_dataset
from icot.errors import UserError

README_EXAMPLE = ("1 3 4 5 * 8 1 9 3||8 4 4 3 4 + 0 1 3 4 5 0 ( 8 5 7 7 9 0 ) + 0 0 9 7 8 8 4 "
                  "( 8 5 6 5 8 9 4 ) + 0 0 0 3 9 2 6 1 #### 8 5 6 8 7 2 1 2")


def oracle_line(a: int, b: int, digits_a: int, digits_b: int, layout: str = "paper") -> str:
    """The format rules written the plain way, with Python integers, as an independent reference."""
    def written(value: int, width: int) -> str:
        return " ".join(str(value).zfill(width)[::-1])

    terms, running_sum = [], 0
    for i, digit in enumerate(int(c) for c in str(b).zfill(digits_b)[::-1]):
        partial = a * digit * 10**i
        running_sum += partial
        term = written(partial, digits_a + 1 + i)
        if 0 < i < digits_b - 1 or (i and layout == "final_sum"):
            term += f" ( {written(running_sum, digits_a + 1 + i)} )"
        terms.append(term)
    cot = " + ".join(terms)
    if layout == "columns":
        # Each column sum padded to the width of the same column for the largest operands (all nines).
        widths = [len(str(c)) for c in oracle_column_sums(10**digits_a - 1, 10**digits_b - 1, digits_a, digits_b)]
        cot = " ".join(str(c).zfill(w) for c, w in zip(oracle_column_sums(a, b, digits_a, digits_b), widths))
    return f"{written(a, digits_a)} * {written(b, digits_b)}||{cot} #### {written(a * b, digits_a + digits_b)}"


def oracle_column_sums(a: int, b: int, digits_a: int, digits_b: int) -> list[int]:
    a_digits = [int(c) for c in str(a).zfill(digits_a)[::-1]]
    b_digits = [int(c) for c in str(b).zfill(digits_b)[::-1]]
    sums, carry = [], 0
    for k in range(digits_a + digits_b - 1):
        column = sum(a_digits[i] * b_digits[k - i] for i in range(digits_a) if 0 <= k - i < digits_b) + carry
        sums.append(column)
        carry = column // 10
    return sums


def random_operands(digits_a: int, digits_b: int, count: int, seed: int) -> list[tuple[int, int]]:
    """`count` (a, b) pairs with exactly digits_a and digits_b digits."""
    rng = random.Random(seed)
    return [(rng.randrange(10 ** (digits_a - 1), 10**digits_a), rng.randrange(10 ** (digits_b - 1), 10**digits_b))
            for _ in range(count)]


def read_operands(path):
    """[(a, b)] of a generated file."""
    return [parse_operands(line)[:2] for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("digits", [4, 5, 7, 9])
def test_reference_files_rerender_byte_for_byte(reference_data, digits):
    files = sorted((reference_data / f"{digits}_by_{digits}_mult").glob("*.txt"))
    assert len(files) == 2, f"expected valid.txt and test_bigbench.txt for {digits} digits"
    for path in files:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        assert len(lines) == 1000
        for number, line in enumerate(lines, 1):
            assert render_line(*parse_operands(line)) == line, f"{path}:{number}"
        # The batch renderer reproduces the whole file, newlines included.
        questions = [line.split("||")[0] for line in lines]
        rows = render_rows(*digits_from_inputs(questions, digits, digits))
        assert rows.tobytes().decode("ascii") == text


def test_readme_example():
    assert render_line(5431, 3918, 4, 4) == README_EXAMPLE
    assert parse_operands(README_EXAMPLE) == (5431, 3918, 4, 4)


@pytest.mark.parametrize("digits_a, digits_b",
                         [(2, 2), (3, 5), (5, 3), (2, 9), (9, 2), (4, 4), (20, 20), (20, 2)])
def test_rendering_follows_the_rules_for_any_shape(digits_a, digits_b):
    for a, b in random_operands(digits_a, digits_b, 50, seed=digits_a * 100 + digits_b):
        line = render_line(a, b, digits_a, digits_b)
        assert line == oracle_line(a, b, digits_a, digits_b)
        assert int(line.split("#### ")[1].replace(" ", "")[::-1]) == a * b
        assert parse_operands(line) == (a, b, digits_a, digits_b)


@pytest.mark.parametrize("digits_a, digits_b", [(3, 2), (2, 3), (4, 4), (9, 2)])
def test_final_sum_layout_writes_the_last_running_sum(digits_a, digits_b):
    for a, b in random_operands(digits_a, digits_b, 30, seed=7 * digits_a + digits_b):
        line = render_line(a, b, digits_a, digits_b, layout="final_sum")
        assert line == oracle_line(a, b, digits_a, digits_b, layout="final_sum")
        # The papers' line with the answer inserted as the last running sum.
        cot_end = line.index(" ( " + line.split("#### ")[1] + " ) #### ")
        assert line[:cot_end] + line[line.index(" #### "):] == render_line(a, b, digits_a, digits_b)
    assert render_line(865, 91, 3, 2, layout="final_sum") == \
        "5 6 8 * 1 9||5 6 8 0 + 0 5 8 7 7 ( 5 1 7 8 7 ) #### 5 1 7 8 7"


@pytest.mark.parametrize("digits_a, digits_b", [(3, 2), (2, 3), (4, 4), (9, 2), (20, 20)])
def test_columns_layout_writes_the_column_sums(digits_a, digits_b):
    for a, b in random_operands(digits_a, digits_b, 30, seed=11 * digits_a + digits_b):
        line = render_line(a, b, digits_a, digits_b, layout="columns")
        assert line == oracle_line(a, b, digits_a, digits_b, layout="columns")
        # Digit k of the answer is column sum k mod 10; the answer is the papers'.
        columns, answer = line.split("||")[1].split(" #### ")
        assert [int(c) % 10 for c in columns.split()] == [int(d) for d in answer.split()][:-1]
        assert answer == render_line(a, b, digits_a, digits_b).split(" #### ")[1]
    assert render_line(865, 91, 3, 2, layout="columns") == "5 6 8 * 1 9||05 051 067 78 #### 5 1 7 8 7"
    assert render_line(99, 99, 2, 2, layout="columns") == "9 9 * 9 9||81 170 98 #### 1 0 8 9"


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout must be one of paper, final_sum, columns, got 'diagonal'"):
        render_line(865, 91, 3, 2, layout="diagonal")


def test_zero_digits_and_leading_zeros_render():
    assert render_line(40, 30, 2, 2) == oracle_line(40, 30, 2, 2)
    assert render_line(7, 5, 2, 2) == oracle_line(7, 5, 2, 2)  # operands with a leading zero digit


def test_render_line_rejects_operands_wider_than_their_digits():
    with pytest.raises(ValueError, match="does not fit in 3 digits"):
        render_line(1000, 12, 3, 2)


def test_multiplication_shape():
    assert multiplication_shape("1 2 * 3 4 5") == (2, 3)
    assert multiplication_shape("12 * 34") is None
    assert multiplication_shape("1 2 *3 4") is None
    assert multiplication_shape("How much is 1 2 * 3 4?") is None


def test_parse_operands_rejects_other_inputs():
    with pytest.raises(UserError, match="not a multiplication input"):
        parse_operands("Janet has 3 ducks||<<3*2=6>> #### 6")


# -------------------------------------------------------------------------------------- sampling

def as_pairs(a_digits, b_digits):
    return {(bytes(a), bytes(b)) for a, b in zip(a_digits, b_digits)}


def test_sampled_pairs_are_distinct_with_exact_digit_counts():
    a_digits, b_digits = sample_pairs(4, 3, 20000, seed=1)
    assert a_digits.shape == (20000, 4) and b_digits.shape == (20000, 3)
    assert len(as_pairs(a_digits, b_digits)) == 20000
    assert a_digits[:, -1].min() >= 1 and b_digits[:, -1].min() >= 1  # no leading zero
    assert a_digits.max() <= 9 and b_digits.max() <= 9


def test_sampling_is_seeded():
    first, again, other = (sample_pairs(5, 5, 1000, seed) for seed in (7, 7, 8))
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_every_pair_can_be_drawn_but_no_more():
    assert pair_count(2, 2) == 8100
    a_digits, b_digits = sample_pairs(2, 2, 8100, seed=0)
    assert len(as_pairs(a_digits, b_digits)) == 8100
    with pytest.raises(UserError, match="asked for 8101 pairs, but only 8100 distinct 2x2-digit pairs"):
        sample_pairs(2, 2, 8101, seed=0)


def test_digit_sampling_redraws_repeats(monkeypatch):
    # Force the large-space path onto a small space, where repeats are frequent.
    monkeypatch.setattr(multiply, "INDEX_SAMPLING_LIMIT", 0)
    a_digits, b_digits = sample_pairs(2, 2, 8000, seed=3)
    assert len(as_pairs(a_digits, b_digits)) == 8000
    assert a_digits[:, -1].min() >= 1 and b_digits[:, -1].min() >= 1


def test_twenty_digit_pairs_use_digit_sampling():
    assert pair_count(20, 20) > multiply.INDEX_SAMPLING_LIMIT
    a_digits, b_digits = sample_pairs(20, 20, 500, seed=0)
    assert len(as_pairs(a_digits, b_digits)) == 500
    assert a_digits[:, -1].min() >= 1 and b_digits[:, -1].min() >= 1


# ------------------------------------------------------------------------------------ generation

def generate(out, **options):
    settings = dict(digits=3, train=300, valid=50, test=40, seed=0, out=str(out))
    settings.update(options)
    generate_splits_cli(**settings)
    return {split: out / f"{split}.txt" for split in ("train", "valid", "test")}


def test_generation_writes_disjoint_splits_of_the_asked_sizes(tmp_path, capsys):
    files = generate(tmp_path / "m3")
    pairs = {split: read_operands(path) for split, path in files.items()}
    assert {split: len(found) for split, found in pairs.items()} == {"train": 300, "valid": 50, "test": 40}
    every_pair = [pair for found in pairs.values() for pair in found]
    assert len(set(every_pair)) == 390  # distinct within and across splits
    assert all(100 <= a <= 999 and 100 <= b <= 999 for a, b in every_pair)
    for path in files.values():
        for line in path.read_text().splitlines():
            assert line == oracle_line(*parse_operands(line))
    summary = capsys.readouterr().out
    assert "3x3-digit multiplication, seed 0" in summary and "train.txt" in summary and "390 lines" in summary


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    first, again, other = (generate(tmp_path / name, seed=seed) for name, seed in
                           (("first", 5), ("again", 5), ("other", 6)))
    for split in first:
        assert first[split].read_bytes() == again[split].read_bytes()
        assert first[split].read_bytes() != other[split].read_bytes()


def test_unequal_digit_lengths(tmp_path):
    files = generate(tmp_path / "m3x5", digits=None, digits_a=3, digits_b=5)
    for a, b in read_operands(files["train"]):
        assert 100 <= a <= 999 and 10_000 <= b <= 99_999
    assert parse_operands(files["test"].read_text().splitlines()[0])[2:] == (3, 5)


def test_digits_sets_both_lengths_and_digits_b_overrides_one(tmp_path):
    files = generate(tmp_path / "m", digits=4, digits_b=2, train=10, valid=0, test=0)
    assert parse_operands(files["train"].read_text().splitlines()[0])[2:] == (4, 2)


@pytest.mark.parametrize("digits", [2, 20])
def test_smallest_and_largest_digit_counts(tmp_path, digits):
    files = generate(tmp_path / f"m{digits}", digits=digits, train=200, valid=20, test=20)
    lines = files["train"].read_text().splitlines()
    assert len(lines) == 200
    for line in lines[:20]:
        a, b, digits_a, digits_b = parse_operands(line)
        assert (digits_a, digits_b) == (digits, digits)
        assert line == oracle_line(a, b, digits, digits)


def test_zero_size_split_writes_no_file_and_removes_a_stale_one(tmp_path):
    out = tmp_path / "m"
    generate(out)
    generate(out, valid=0)
    assert not (out / "valid.txt").exists()
    assert len((out / "test.txt").read_text().splitlines()) == 40


def test_fire_style_numbers_are_accepted(tmp_path):
    files = generate(tmp_path / "m", digits="3", train=20.0, valid="5", test=5)
    assert len(files["train"].read_text().splitlines()) == 20


@pytest.mark.parametrize("options, message", [
    (dict(digits=None), "give --digits N"),
    (dict(digits=1), "--digits_a must be 2..20, got 1"),
    (dict(digits=21), "--digits_a must be 2..20, got 21"),
    (dict(digits_b=30), "--digits_b must be 2..20, got 30"),
    (dict(digits=True), "--digits_a must be a whole number, got True"),
    (dict(train=-1), "--train must be >= 0, got -1"),
    (dict(valid=2.5), "--valid must be a whole number, got 2.5"),
    (dict(seed="x"), "--seed must be a whole number"),
    (dict(train=0, valid=0, test=0), "nothing to generate"),
    (dict(format="csv"), "--format must be one of txt, datasets, got 'csv'"),
    (dict(layout="yes"), "--layout must be one of paper, final_sum, columns, got 'yes'"),
    (dict(digits=2, train=8000, valid=100, test=1), "asked for 8101 pairs, but only 8100"),
])
def test_bad_options_are_user_errors(tmp_path, options, message):
    with pytest.raises(UserError, match=re.escape(message)):
        generate(tmp_path / "m", **options)


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        generate(tmp_path / "file")


def test_datasets_format_saves_a_loadable_dataset(tmp_path):
    out = tmp_path / "m"
    files = generate(out, format="datasets")
    generate(out, format="datasets")  # an earlier saved dataset is replaced, not an error
    for split, size in (("train", 300), ("valid", 50), ("test", 40)):
        dataset = load_hf_dataset(out / "dataset", split)
        assert dataset.column_names == ["question", "cot", "answer"]
        assert dataset.num_rows == size
        first_line = files[split].read_text().splitlines()[0]
        row = dataset[0]
        assert f"{row['question']}||{row['cot']} #### {row['answer']}" == first_line


def test_datasets_format_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "m" / "dataset").mkdir(parents=True)
    (tmp_path / "m" / "dataset" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a saved dataset"):
        generate(tmp_path / "m", format="datasets")
