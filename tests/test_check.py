"""`icot data check`, through the real command line where the exit status matters."""

import subprocess
import sys

import pytest

from icot.data import check
from icot.data.check import check_file, check_files_cli
from icot.data.multiply import generate_splits_cli
from icot.errors import UserError

GSM8K_LINE = "Tom has 1,000 apples and buys 234 more.||<<1000+234=1234>> #### 1,234"


def icot(*args):
    return subprocess.run([sys.executable, "-m", "icot", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A small generated 3x3 set: train (200 lines), valid and test."""
    out = tmp_path_factory.mktemp("m3")
    generate_splits_cli(digits=3, train=200, valid=30, test=30, seed=0, out=str(out))
    return out


def copy_with_line_changed(source, target, line_number, change):
    lines = source.read_text().splitlines(keepends=True)
    lines[line_number - 1] = change(lines[line_number - 1])
    target.write_text("".join(lines))
    return target


def change_digit(text: str, position: int) -> str:
    """Bump the digit at `position` of text, which must be a digit."""
    assert text[position].isdigit()
    return text[:position] + str((int(text[position]) + 1) % 10) + text[position + 1:]


def cot_digit(line: str) -> int:
    return line.index("||") + 2


def answer_digit(line: str) -> int:
    return line.index("####") + 5


def test_generation_then_check_on_the_command_line(tmp_path):
    made = icot("data", "multiply", "--digits", "3", "--digits_b", "4", "--train", "500", "--valid", "50",
                "--test", "50", "--seed", "1", "--out", str(tmp_path))
    assert made.returncode == 0, made.stderr
    checked = icot("data", "check", *(str(tmp_path / f"{split}.txt") for split in ("train", "valid", "test")))
    assert checked.returncode == 0, checked.stderr
    summary = f"ok: {tmp_path / 'train.txt'}: 500 examples, 500 multiplication lines re-derived"
    assert summary in checked.stdout


def generate_checked_3x2(tmp_path, layout: str, label: str):
    """300 3x2 lines in `layout` through the CLI; every line re-derives in that layout."""
    made = icot("data", "multiply", "--digits_a", "3", "--digits_b", "2", "--train", "300", "--valid", "0",
                "--test", "0", "--layout", layout, "--out", str(tmp_path))
    assert made.returncode == 0, made.stderr
    assert label in made.stdout
    path = tmp_path / "train.txt"
    assert check_file(path).summary() == f"ok: {path}: 300 examples, 300 multiplication lines re-derived"
    return path


def test_final_sum_files_are_re_derived_in_their_own_layout(tmp_path):
    path = generate_checked_3x2(tmp_path, "final_sum", "final sum in the CoT")
    assert all(line.split(" #### ")[0].endswith(" )") for line in path.read_text().splitlines())
    # A wrong digit inside the final sum is caught like any other CoT digit.
    line = path.read_text().splitlines()[41]
    bad = copy_with_line_changed(path, tmp_path / "bad.txt", 42,
                                 lambda text: change_digit(text, text.index(" ( ") + 3))
    report = check_file(bad)
    assert [number for number, _ in report.problems] == [42]
    assert "CoT does not match the operands at term 2 of 2" in report.problems[0][1]
    assert line != bad.read_text().splitlines()[41]


def test_columns_files_are_re_derived_in_their_own_layout(tmp_path):
    path = generate_checked_3x2(tmp_path, "columns", "column sums as the CoT")
    # A wrong digit in the third column sum is named as that term.
    bad = copy_with_line_changed(path, tmp_path / "bad.txt", 7,
                                 lambda text: change_digit(text, text.index("||") + 2 + 3 + 4))
    report = check_file(bad)
    assert [number for number, _ in report.problems] == [7]
    assert "CoT does not match the operands at term 3 of 4" in report.problems[0][1]


def test_multiply_command_reports_too_many_pairs_as_one_line(tmp_path):
    made = icot("data", "multiply", "--digits", "2", "--train", "9000", "--out", str(tmp_path))
    assert made.returncode == 2
    assert made.stderr.strip() == ("icot: error: asked for 11000 pairs, but only 8100 distinct 2x2-digit "
                                   "pairs exist")


def test_reference_gsm8k_files_pass(reference_data):
    checked = icot("data", "check", *(str(reference_data / "gsm8k_aug" / name) for name in ("valid.txt",
                                                                                            "test.txt")))
    assert checked.returncode == 0, checked.stderr
    assert "ok:" in checked.stdout and "1319 examples" in checked.stdout


def test_reference_multiplication_files_pass(reference_data):
    files = sorted(reference_data.glob("*_mult/*.txt"))
    assert len(files) == 8
    for path in files:
        report = check_file(path)
        assert report.problems == [] and report.multiplication_lines == 1000, path


def test_one_changed_cot_digit_on_line_77_fails_naming_line_77(generated, tmp_path):
    bad = copy_with_line_changed(generated / "train.txt", tmp_path / "bad.txt", 77,
                                 lambda line: change_digit(line, cot_digit(line)))
    checked = icot("data", "check", str(generated / "valid.txt"), str(bad))
    assert checked.returncode == 1
    assert checked.stderr.startswith(f"{bad}:77: CoT does not match the operands at term 1 of 3 (expected '")
    assert f"ok: {generated / 'valid.txt'}" in checked.stdout
    assert f"FAILED (1 problem(s)): {bad}" in checked.stdout


def test_a_changed_answer_digit_is_named(generated, tmp_path):
    bad = copy_with_line_changed(generated / "train.txt", tmp_path / "bad.txt", 77,
                                 lambda line: change_digit(line, answer_digit(line)))
    [problem] = check_file(bad).problem_lines()
    assert problem.startswith(f"{bad}:77: answer does not match the operands (expected '")


def test_a_changed_operand_no_longer_matches_its_cot(generated, tmp_path):
    bad = copy_with_line_changed(generated / "train.txt", tmp_path / "bad.txt", 5,
                                 lambda line: change_digit(line, 0))
    [problem] = check_file(bad).problem_lines()
    assert problem.startswith(f"{bad}:5: CoT does not match the operands")


def test_only_the_first_mismatch_is_reported_even_across_batches(generated, tmp_path, monkeypatch):
    monkeypatch.setattr(check, "CHECK_BATCH_LINES", 7)
    bad = copy_with_line_changed(generated / "train.txt", tmp_path / "bad.txt", 77,
                                 lambda line: change_digit(line, answer_digit(line)))
    copy_with_line_changed(bad, bad, 150, lambda line: change_digit(line, cot_digit(line)))
    report = check_file(bad)
    assert [line for line, _ in report.problems] == [77]
    assert report.multiplication_lines == 76 and report.examples == 200


def test_files_mixing_shapes_and_tasks_are_checked_line_by_line(generated, tmp_path, monkeypatch):
    monkeypatch.setattr(check, "CHECK_BATCH_LINES", 16)
    other = tmp_path / "m2x4"
    generate_splits_cli(digits_a=2, digits_b=4, train=40, valid=0, test=0, seed=0, out=str(other))
    mixed = tmp_path / "mixed.txt"
    mixed.write_text((generated / "valid.txt").read_text() + (other / "train.txt").read_text()
                     + GSM8K_LINE + "\n" + (generated / "test.txt").read_text())
    report = check_file(mixed)
    assert report.problems == []
    assert (report.examples, report.multiplication_lines) == (101, 100)


def test_malformed_lines_are_each_named_unless_skipped(generated, tmp_path):
    lines = (generated / "valid.txt").read_text().splitlines()
    lines[3] = "no separators at all"
    lines[9] = lines[9].split(" ####")[0]
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(lines) + "\n")
    checked = icot("data", "check", str(bad))
    assert checked.returncode == 1
    assert checked.stderr.splitlines() == [
        f"{bad}:4: no '||' between the question and the CoT",
        f"{bad}:10: no '####' before the answer",
    ]
    skipped = icot("data", "check", "--skip_bad", str(bad))
    assert skipped.returncode == 0, skipped.stderr
    summary = f"ok: {bad}: 28 examples, 28 multiplication lines re-derived, 2 malformed lines skipped"
    assert summary in skipped.stdout


def test_many_malformed_lines_are_summarised(tmp_path, monkeypatch):
    monkeypatch.setattr("icot.data.reader.MAX_RECORDED_BAD_LINES", 3)
    bad = tmp_path / "bad.txt"
    bad.write_text(GSM8K_LINE + "\n" + "broken\n" * 10)
    problems = check_file(bad).problem_lines()
    assert problems[:3] == [f"{bad}:{line}: no '||' between the question and the CoT" for line in (2, 3, 4)]
    assert problems[3:] == [f"{bad}: 7 more malformed lines after line 4"]


def test_missing_and_empty_files_fail_but_the_rest_are_checked(generated, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SystemExit) as exited:
        check_files_cli([str(tmp_path / "missing.txt"), str(empty), str(generated / "test.txt")])
    assert exited.value.code == 1
    output = capsys.readouterr()
    assert output.err.splitlines() == [f"{tmp_path / 'missing.txt'}: no such data file",
                                       f"{empty}: no examples (the file is empty)"]
    assert f"ok: {generated / 'test.txt'}: 30 examples" in output.out


@pytest.mark.parametrize("flag, files, expected", [
    (True, ["a"], (True, ["a"])),
    ("false", ["a"], (False, ["a"])),
    ("True", ["a"], (True, ["a"])),
    ("a", ["b"], (True, ["a", "b"])),  # `--skip_bad a b`: Fire took the first file as the flag's value
])
def test_skip_bad_as_fire_hands_it_over(flag, files, expected):
    assert check.skip_bad_and_files(flag, files) == expected


def test_no_files_is_a_user_error():
    with pytest.raises(UserError, match="give at least one data file"):
        check_files_cli([])
    checked = icot("data", "check")
    assert checked.returncode == 2 and "give at least one data file" in checked.stderr
