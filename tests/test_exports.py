"""Intermediate exports and which one a later stage reads (`inputs.<role>.export`).

- `select_export` picks `last`, `epoch N`, `step N` or `best` (highest validation accuracy, else lowest
  loss; the earliest on a tie) from a stage's `exports.json`, and names the key and what was kept when
  the choice is not there.
- A two-epoch mind-reading run with `train.export_each_epoch` keeps `exports/epoch1` (validated there)
  beside its final export; coupling with `--inputs.student.export="epoch 1"` starts from that epoch's
  weights, not the final ones (with lr 0 its exported student equals them exactly), and its manifest
  records the choice.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.register_assert_rewrite("tests.train_fixtures")
pytest_plugins = ["tests.train_fixtures"]

from icot.errors import UserError  # noqa: E402
from icot.exports import ExportChoice, record_export, select_export  # noqa: E402
from tests.train_fixtures import run_train, stage_folder_problems  # noqa: E402


def test_choices_select_from_the_index(tmp_path):
    # `score`: what the stage made of the validation (Stage.selection_score: accuracy, else -loss).
    entries = [{"name": "epoch1", "path": "exports/epoch1", "step": 10, "epoch": 1, "score": 0.5},
               {"name": "epoch2", "path": "exports/epoch2", "step": 20, "epoch": 2, "score": 0.7},
               {"name": "step25", "path": "exports/step25", "step": 25, "epoch": None, "score": 0.7},
               {"name": "last", "path": "export", "step": 30, "epoch": 3, "score": 0.6}]
    for entry in reversed(entries):
        record_export(tmp_path, entry)
    assert [e["name"] for e in json.loads((tmp_path / "exports.json").read_text())] == \
        ["epoch1", "epoch2", "step25", "last"]   # by step, the final export last

    def chosen(text):
        return select_export(tmp_path, ExportChoice.from_text(text), "inputs.student.export")[0].relative_to(tmp_path)

    assert str(chosen("last")) == "export" and str(chosen("epoch 3")) == "export"
    assert str(chosen("epoch 1")) == "exports/epoch1" and str(chosen("step 25")) == "exports/step25"
    assert str(chosen("step 20")) == "exports/epoch2"
    assert str(chosen("best")) == "exports/epoch2"   # accuracy 0.7 twice: the earlier one
    with pytest.raises(UserError, match=r"inputs\.student\.export: epoch 4: .* kept no such export \(kept: epoch 1, "
                                        r"epoch 2, step 25, epoch 3\)"):
        chosen("epoch 4")
    # Without accuracy, the lowest loss; without any score at all, `best` is an error naming the key.
    losses = tmp_path / "losses"
    losses.mkdir()
    for step, loss in ((1, 3.0), (2, 1.5), (3, 2.0)):
        record_export(losses, {"name": f"step{step}", "path": f"exports/step{step}", "step": step, "epoch": None,
                               "score": -loss})
    assert select_export(losses, ExportChoice("best"), "k")[1]["name"] == "step2"
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UserError, match=r"k: best: no export of .* has a validation score"):
        select_export(bare, ExportChoice("best"), "k")
    assert select_export(bare, ExportChoice("last"), "k")[0] == bare / "export"   # folders from before the index


def test_coupling_reads_the_chosen_epoch_of_a_two_epoch_mind_reading_run(gpt2_chain, tmp_path):
    from safetensors.torch import load_file

    folder, chain = gpt2_chain.parent, gpt2_chain
    run_train(folder, "mind_reading", folder / "recipe.yaml", f"--run_dir={tmp_path}",
              f"--inputs.teacher.dir={chain / 'teacher'}", "--train.max_steps=null", "--train.epochs=2",
              "--train.export_each_epoch=true")
    mind_reading = tmp_path / "mind_reading"
    assert stage_folder_problems(mind_reading, "mind_reading") == []
    index = json.loads((mind_reading / "manifest.json").read_text())["exports"]
    assert [(e["name"], e["step"], e["epoch"]) for e in index] == [("epoch1", 16, 1), ("last", 32, 2)]
    assert index[0]["validation"]["loss"] > 0   # validated where it was exported

    run_train(folder, "coupling", folder / "recipe.yaml", f"--run_dir={tmp_path}", "--train.lr=0",
              "--train.max_steps=1", "--inputs.student.export=epoch 1", f"--inputs.emulator.dir={chain / 'emulation'}")
    manifest = json.loads((tmp_path / "coupling/manifest.json").read_text())
    read = manifest["input_exports"]["mind_reading"]
    assert (read["role"], read["choice"], read["epoch"]) == ("student", "epoch 1", 1)
    assert read["path"] == str((mind_reading / "exports/epoch1").resolve())
    assert manifest["input_exports"]["emulation"]["path"] == str((chain / "emulation/export").resolve())

    def weights(export):
        return {**load_file(str(export / "model.safetensors")), **load_file(str(export / "icot_heads.safetensors"))}

    coupled, epoch1, final = (weights(p) for p in (tmp_path / "coupling/export/student", mind_reading / "exports/epoch1",
                                                   mind_reading / "export"))
    assert coupled.keys() == epoch1.keys()
    assert all(torch.equal(coupled[k], epoch1[k]) for k in epoch1)
    assert not all(torch.equal(final[k], epoch1[k]) for k in epoch1)
