"""The results and compare plots: every stage's validation accuracy against its steps, read back from its
TensorBoard scalars, with the steps where its curriculum moved on marked in its colour."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from icot.report import curriculum_changes, plot_validation_curves, scalar_curve  # noqa: E402


def write_scalars(folder, scalars: dict[str, list[tuple[int, float]]]) -> None:
    writer = SummaryWriter(str(folder / "tb"))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_curves_and_curriculum_changes_come_from_the_stage_scalars(tmp_path):
    stepwise, teacher = tmp_path / "stepwise", tmp_path / "teacher"
    write_scalars(stepwise, {"train/removed_tokens": [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, float("inf"))],
                             "valid/accuracy": [(2, 0.75), (4, 0.25), (6, 0.5)]})
    write_scalars(teacher, {"train/loss": [(1, 2.0)], "valid/accuracy": [(3, 0.5)]})
    assert scalar_curve(stepwise) == [(2, 0.75), (4, 0.25), (6, 0.5)]   # binary fractions: float32-exact
    assert scalar_curve(tmp_path / "absent") == []
    assert curriculum_changes(stepwise, "stepwise") == [(3, 1.0), (5, 2.0), (6, float("inf"))]
    assert curriculum_changes(teacher, "teacher") == []   # no curriculum

    figure, axis = plt.subplots()
    plot_validation_curves(axis, tmp_path, ["teacher", "stepwise", "no_cot"])   # no_cot: nothing logged
    curves = [line for line in axis.lines if line.get_marker() == "o"]
    assert [line.get_label() for line in curves] == ["teacher", "stepwise"]
    assert list(curves[1].get_xdata()) == [2, 4, 6] and list(curves[1].get_ydata()) == [75, 25, 50]
    marks = [line for line in axis.lines if line.get_linestyle() == ":"]
    assert [line.get_xdata()[0] for line in marks] == [3, 5, 6]
    assert {line.get_color() for line in marks} == {curves[1].get_color()}
    plt.close(figure)
