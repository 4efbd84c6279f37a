"""`icot_kd.teacher_state_cache`: the teacher's states computed once over the training set.

- Mind-reading and emulation with the cache log the same per-step losses (and validation) as the
  shared five-stage run that computes the states at every step; the two stages share one cache file
  beside the teacher, and each cached row equals the states of that example computed alone.
- On two ranks the shards are merged into the same cache as one rank writes, and the losses match.
"""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.register_assert_rewrite("tests.train_fixtures")
pytest_plugins = ["tests.train_fixtures"]

from tests.train_fixtures import read_scalars, run_train, stage_folder_problems  # noqa: E402

REL = 1e-5


def copy_teacher(chain, folder):
    """The shared run's teacher, copied so the cache written beside it stays in this test."""
    target = folder / "teacher-copy"
    shutil.copytree(chain / "teacher", target, ignore=shutil.ignore_patterns("ckpt", "tb"))
    return target


def assert_same_curves(reference: dict, cached: dict, label: str) -> None:
    for tag in ("train/loss", "valid/loss"):
        want, got = dict(reference[tag]), dict(cached[tag])
        assert sorted(got) == sorted(want), (label, tag)
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=REL), (label, tag, step, want, got)


def cache_files(teacher):
    return sorted(p.name for p in (teacher / "state_cache").iterdir())


def test_cached_states_give_the_same_training(gpt2_chain, tmp_path):
    from icot.data.collate import collate_train
    from icot.data.views import tokenize_dataset
    from icot.data.reader import load_examples
    from icot.models.io import load_component
    from icot.models.teacher_states import teacher_states
    from transformers import AutoTokenizer

    folder = gpt2_chain.parent
    teacher = copy_teacher(gpt2_chain, tmp_path)
    for stage in ("mind_reading", "emulation"):
        run_train(folder, stage, folder / "recipe.yaml", f"--run_dir={tmp_path / 'cached'}",
                  f"--inputs.teacher.dir={teacher}", "--icot_kd.teacher_state_cache=true")
        root = tmp_path / "cached" / stage
        assert stage_folder_problems(root, stage) == []
        assert_same_curves(read_scalars(gpt2_chain / stage / "tb"), read_scalars(root / "tb"), stage)
        # One file for both stages (same data, delta and teacher), no shard or partial file left.
        names = cache_files(teacher)
        assert len(names) == 1 and names[0].endswith(".pt"), names
    cache = torch.load(teacher / "state_cache" / names[0])

    tokenizer = AutoTokenizer.from_pretrained(str(teacher / "export"))
    examples = load_examples(str(folder / "data" / "train.txt"))
    features = tokenize_dataset(examples, tokenizer)
    assert cache.shape[0] == len(features)
    model = load_component(teacher / "export", expect="decoder").eval()
    for row in (0, 7, len(features) - 1):
        cot = collate_train([features[row]], "cot", tokenizer.eos_token_id)
        with torch.no_grad():
            alone = teacher_states(model, cot["input_ids"], cot["attention_mask"], cot["first_sep"],
                                   cot["second_sep"], "dynamic")
        torch.testing.assert_close(cache[row], alone[0], rtol=1e-5, atol=1e-5)


def test_two_ranks_build_the_same_cache(gpt2_chain, tmp_path):
    folder = gpt2_chain.parent
    one_rank, two_ranks = copy_teacher(gpt2_chain, tmp_path / "one"), copy_teacher(gpt2_chain, tmp_path / "two")
    for teacher, nproc in ((one_rank, 1), (two_ranks, 2)):
        run_train(folder, "mind_reading", folder / "recipe.yaml", f"--run_dir={teacher.parent / 'run'}",
                  f"--inputs.teacher.dir={teacher}", "--icot_kd.teacher_state_cache=true", nproc=nproc)
    # The key names the teacher's folder, so the two copies' files differ in name only.
    (one_name,), (two_name,) = cache_files(one_rank), cache_files(two_ranks)
    torch.testing.assert_close(torch.load(two_ranks / "state_cache" / two_name),
                               torch.load(one_rank / "state_cache" / one_name), rtol=1e-6, atol=1e-6)
    assert_same_curves(read_scalars(gpt2_chain / "mind_reading" / "tb"),
                       read_scalars(tmp_path / "two" / "run" / "mind_reading" / "tb"), "two ranks")
