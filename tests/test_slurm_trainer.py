"""Issue 6 acceptance with the REAL trainer on a SLURM cluster (``ICOT_SLURM=1``; skipped otherwise).

CI starts the local two-node cluster first (``tools/slurm_cluster.sh start``, then the SLURM_CONF it
prints). Every job sources an env file written here: ``ICOT_CPU=1`` plus slurm/env.sh.example (so
DS_ACCELERATOR=cpu, one rank per node, gloo) and the folder of the Python running pytest put first on
PATH, so the jobs use this interpreter (a CI virtualenv included) whatever the nodes' PATH says.

1. slurm/stage.sbatch trains the teacher on 2 nodes x 1 rank: it completes, writes every output, and
   its per-step TensorBoard losses match a single-node single-rank run with the same global batch
   (relative tolerance LOSS_RTOL).
2. The same job sent USR1 mid-training (as Slurm does ``--signal=B:USR1@120`` before the time limit)
   checkpoints, requeues itself, resumes and finishes with the same per-step losses as the
   uninterrupted two-node run (RESUME_RTOL), its TensorBoard curve continuing in the same folder.
3. A job that finds the newest checkpoint of its stage truncated (what a requeued job sees after a
   crash in the middle of a save) skips it, says why, resumes from the one before and ends with the
   uninterrupted run's losses.
4. slurm/submit_pipeline.sh runs every stage to the end on the cluster, in dependency order, then the
   evaluation job.

Shell syntax (``bash -n``) of every script is checked, always, by tests/test_slurm_cluster.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_slurm_cluster import ROOT, _slurm, cluster, job_info, stage_log, submit_stage, wait_for, wait_job  # noqa: F401

pytestmark = pytest.mark.skipif(
    os.environ.get("ICOT_SLURM") != "1",
    reason="needs a SLURM cluster and ICOT_SLURM=1 (locally: tools/slurm_cluster.sh start as root, "
    "then export the SLURM_CONF line it prints and ICOT_SLURM=1)",
)

STAGES = ["teacher", "no_cot", "mind_reading", "emulation", "coupling"]
STEPS = 60          # teacher steps for the comparison runs (the USR1 must land mid-run)
SAVE_EVERY = 10     # a periodic checkpoint too, so resume picks the newest of several
SIGNAL_AFTER = 2    # send USR1 once the job logged this many steps to TensorBoard
# 2 ranks x 8 examples vs 1 rank x 16: the same loss in exact arithmetic (every example has the same
# number of label tokens); only float summation order differs (gloo all-reduce of gradients, 2 means).
LOSS_RTOL = 1e-5
# The preempted two-node run vs the uninterrupted two-node run: same ranks and reductions, restored
# model/optimizer/scheduler/RNG/data position, and torch's AdamW on the CPU (DeepSpeed's fused CPU Adam
# drifted by float rounding after a reload): bit-identical.
RESUME_RTOL = 0.0


def _run(cmd, cwd, env=None, timeout=300):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def _recipe(path: Path, ws: Path, run_dir: Path, **train) -> Path:
    train_items = ", ".join(f"{k}: {v}" for k, v in {"lr": "1.0e-3", "batch_size": 16, "log_every": 1,
                                                      "eval_examples": 4, **train}.items())
    path.write_text(
        f"run_dir: {run_dir}\n"
        f"model: {{family: gpt2, layers: 2, hidden: 32, heads: 2, tokenizer: {ws / 'tok'}, max_positions: 128}}\n"
        f"data: {{train: {ws / 'data/train.txt'}, valid: {ws / 'data/valid.txt'}, test: {ws / 'data/test.txt'}}}\n"
        f"train: {{{train_items}}}\n")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Data, tokenizer, recipes and the job env file, in a folder the jobs also run in."""
    ws = tmp_path_factory.mktemp("slurm_trainer")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    py = sys.executable
    _run([py, "-m", "icot", "data", "multiply", "--digits", "3", "--train", "512", "--valid", "32",
          "--test", "32", "--out", "data"], ws, env)
    _run([py, "-m", "icot", "tokenizer", "build", "data/train.txt", "--kind", "word", "--out", "tok"], ws, env)
    env_file = ws / "env.sh"
    env_file.write_text(
        "export ICOT_CPU=1\n"
        f"source {ROOT / 'slurm' / 'env.sh.example'}\n"
        "# the interpreter running the tests (a CI virtualenv: .venv/bin), whatever PATH the job got\n"
        f"export PATH={Path(py).parent}:$PATH\n")
    return ws, env_file


def tb_scalars(tb_dir: Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard tag, as TensorBoard shows it (all event files, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(tb_dir).is_dir():
        return []
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def _check_stage_outputs(sdir: Path, steps: int, world: int) -> dict:
    for name in ("DONE", "config.yaml", "ds_config.json", "manifest.json", "ckpt/latest"):
        assert (sdir / name).exists(), f"{sdir / name} missing: {sorted(p.name for p in sdir.iterdir())}"
    # export/ is a Hugging Face folder; coupling writes two (export/student, export/emulator)
    exports = ["export/student", "export/emulator"] if sdir.name == "coupling" else ["export"]
    for export in exports:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (sdir / export / name).exists(), f"{sdir / export / name} missing"
    assert not (sdir / "PREEMPTED").exists(), "a finished stage still has PREEMPTED"
    assert list((sdir / "tb").glob("events.out.tfevents.*")), f"no TensorBoard events in {sdir / 'tb'}"
    manifest = json.loads((sdir / "manifest.json").read_text())
    assert manifest["steps"] == steps and manifest["world_size"] == world, manifest
    ds = json.loads((sdir / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 16 // world, ds
    return manifest


def _job_header(log: str) -> list[str]:
    return re.findall(r"^\[icot-slurm [^]]*\] job \d+ .*$", log, re.M)


@pytest.fixture(scope="module")
def teacher_runs(cluster, workspace, pipeline_jobs):
    """Three teacher runs of one recipe, started together to share the waiting: a single-rank run on
    this machine (the reference), an uninterrupted 2-node job, and a 2-node job preempted with USR1."""
    ws, env_file = workspace
    recipe = _recipe(ws / "teacher.yaml", ws, ws / "unused", max_steps=STEPS, save_every=SAVE_EVERY)
    exports = {"ICOT_ENV": str(env_file)}
    t0 = time.monotonic()
    straight, _, _ = submit_stage("teacher", recipe, ws / "two_nodes", exports=exports, cwd=ws, wait=False)
    preempted, _, _ = submit_stage("teacher", recipe, ws / "preempted", exports=exports, cwd=ws, wait=False)

    # the reference: one process, no torchrun (the trainer acts as rank 0 of 1), same global batch
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    single = subprocess.Popen([sys.executable, "-m", "icot", "train", "teacher", "--config", str(recipe),
                               f"--run_dir={ws / 'single'}"], cwd=ws, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # USR1 once training is under way (what --signal=B:USR1@120 does before the time limit)
    pdir = ws / "preempted" / "teacher"

    def started():
        if job_info(preempted).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            return True
        return len(tb_scalars(pdir / "tb")) >= SIGNAL_AFTER

    wait_for(started, 240, f"the preempted job to log {SIGNAL_AFTER} steps")
    steps_at_signal = len(tb_scalars(pdir / "tb"))
    _slurm("scancel", "--signal=USR1", "--batch", preempted)
    signalled = time.monotonic() - t0

    out, _ = single.communicate(timeout=300)
    assert single.returncode == 0, out[-4000:]
    infos = {"straight": wait_job(straight, timeout=300), "preempted": wait_job(preempted, timeout=300)}
    return {
        "ws": ws, "recipe": recipe, "jobs": {"straight": straight, "preempted": preempted}, "infos": infos,
        "logs": {"straight": stage_log(ws / "two_nodes", "teacher", straight),
                 "preempted": stage_log(ws / "preempted", "teacher", preempted)},
        "dirs": {"single": ws / "single" / "teacher", "straight": ws / "two_nodes" / "teacher",
                 "preempted": pdir},
        "steps_at_signal": steps_at_signal, "signalled_s": signalled, "wall_s": time.monotonic() - t0,
    }


def test_teacher_two_nodes_matches_single_rank(teacher_runs):
    runs = teacher_runs
    info, log = runs["infos"]["straight"], runs["logs"]["straight"]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, log[-4000:])
    assert info["NumNodes"] == "2", info
    header = _job_header(log)
    assert header and "ranks/node=1" in header[0] and "(2)" in header[0], log[-4000:]
    # the job ran the tests' interpreter (the env file put its folder first on PATH)
    assert f"python={sys.executable}" in header[0] or f"python={Path(sys.executable).parent}" in header[0], header
    assert "stage teacher finished (DONE)" in log, log[-4000:]

    _check_stage_outputs(runs["dirs"]["single"], STEPS, world=1)
    _check_stage_outputs(runs["dirs"]["straight"], STEPS, world=2)
    single = tb_scalars(runs["dirs"]["single"] / "tb")
    two = tb_scalars(runs["dirs"]["straight"] / "tb")
    assert [s for s, _ in single] == list(range(1, STEPS + 1)), single
    assert [s for s, _ in two] == list(range(1, STEPS + 1)), two
    rel = _max_rel([v for _, v in two], [v for _, v in single])
    print(f"\n2 nodes x 1 rank vs 1 rank, {STEPS} steps: max relative loss difference {rel:.3g} "
          f"(tolerance {LOSS_RTOL:g}); first {two[0][1]:.6f} vs {single[0][1]:.6f}, "
          f"last {two[-1][1]:.6f} vs {single[-1][1]:.6f}")
    assert rel <= LOSS_RTOL, list(zip(two, single))
    # the losses actually moved (a run that never stepped would match too)
    assert two[-1][1] < two[0][1] - 0.05, two


def test_teacher_usr1_checkpoint_requeue_resume(teacher_runs):
    runs = teacher_runs
    info, log = runs["infos"]["preempted"], runs["logs"]["preempted"]
    tail = log[-6000:]
    assert info["JobState"] == "COMPLETED", (info, tail)
    assert info["Restarts"] == "1", (info, tail)
    # where the trainer stopped, and where the second run resumed: the same step, mid-run
    stopped = re.findall(r"stop requested: checkpoint written at step (\d+)", log)
    resumed = re.findall(r"resumed from \S+/ckpt/step(\d+) at step (\d+)", log)
    assert len(stopped) == 1 and len(resumed) == 1, tail
    stop_step = int(stopped[0])
    assert 0 < stop_step < STEPS, f"USR1 did not land mid-run (stopped at {stop_step} of {STEPS}): {tail}"
    assert int(resumed[0][0]) == int(resumed[0][1]) == stop_step, (stopped, resumed)
    assert stop_step >= runs["steps_at_signal"], (stop_step, runs["steps_at_signal"])
    headers = _job_header(log)
    assert [re.search(r"restart=(\d+)", h).group(1) for h in headers] == ["0", "1"], headers
    assert "USR1: asking the trainer to checkpoint" in log and "requeueing job" in log, tail
    assert "stage teacher finished (DONE)" in log, tail

    sdir = runs["dirs"]["preempted"]
    _check_stage_outputs(sdir, STEPS, world=2)
    # one TensorBoard folder, written by both runs, one curve without gaps or repeats
    assert len(list((sdir / "tb").glob("events.out.tfevents.*"))) >= 2, list((sdir / "tb").iterdir())
    pre = tb_scalars(sdir / "tb")
    straight = tb_scalars(runs["dirs"]["straight"] / "tb")
    single = tb_scalars(runs["dirs"]["single"] / "tb")
    assert [s for s, _ in pre] == list(range(1, STEPS + 1)), pre
    rel = _max_rel([v for _, v in pre], [v for _, v in straight])
    rel_single = _max_rel([v for _, v in pre], [v for _, v in single])
    print(f"\nUSR1 after {runs['signalled_s']:.0f}s ({runs['steps_at_signal']} steps logged), stopped at step "
          f"{stop_step}, resumed there; vs uninterrupted 2-node run: max relative loss difference {rel:.3g} "
          f"(tolerance {RESUME_RTOL:g}); vs single rank {rel_single:.3g}; all three runs took "
          f"{runs['wall_s']:.0f}s")
    assert rel <= RESUME_RTOL, list(zip(pre, straight))
    assert rel_single <= LOSS_RTOL, list(zip(pre, single))
    for tag in ("train/lr", "train/grad_norm"):
        assert [s for s, _ in tb_scalars(sdir / "tb", tag)] == list(range(1, STEPS + 1)), tag


def test_a_job_resumes_from_the_checkpoint_before_a_truncated_newest_one(teacher_runs):
    import shutil

    runs = teacher_runs
    ws, env_file = runs["ws"], runs["recipe"].parent / "env.sh"
    source, target = runs["dirs"]["preempted"], ws / "truncated" / "teacher"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("DONE", "export", "exports.json", "manifest.json",
                                                                   "LOCK"))
    checkpoints = sorted(p.name for p in (target / "ckpt").glob("step*"))
    assert checkpoints[-1] == f"step{STEPS:08d}", checkpoints
    newest, before = target / "ckpt" / checkpoints[-1], int(checkpoints[-2][len("step"):])
    states = newest / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    job, info, log = submit_stage("teacher", runs["recipe"], ws / "truncated", exports={"ICOT_ENV": str(env_file)},
                                  cwd=ws, timeout=300)
    assert info["JobState"] == "COMPLETED", (info, log[-4000:])
    assert f"skipped checkpoint {newest}: mp_rank_00_model_states.pt has 1000 bytes" in log, log[-4000:]
    assert f"resumed from {target / 'ckpt' / checkpoints[-2]} at step {before}" in log, log[-4000:]
    _check_stage_outputs(target, STEPS, world=2)
    resumed, straight = tb_scalars(target / "tb"), tb_scalars(runs["dirs"]["straight"] / "tb")
    assert [s for s, _ in resumed] == list(range(1, STEPS + 1))
    assert _max_rel([v for _, v in resumed], [v for _, v in straight]) <= RESUME_RTOL


@pytest.fixture(scope="module")
def pipeline_jobs(cluster, workspace):
    """slurm/submit_pipeline.sh with a tiny recipe, submitted before the teacher runs start so that
    its jobs use the time those spend waiting; checked by the last test."""
    ws, env_file = workspace
    run_dir = ws / "pipeline"
    recipe = _recipe(ws / "tiny.yaml", ws, run_dir, max_steps=3)
    env = dict(os.environ, ICOT_ENV=str(env_file))
    res = _slurm(str(ROOT / "slurm" / "submit_pipeline.sh"), str(recipe), str(run_dir), "--time=15",
                 env=env, cwd=ws)
    return res, recipe, run_dir, env, time.monotonic()


def test_submit_pipeline_runs_every_stage_in_order(pipeline_jobs, workspace):
    ws, _ = workspace
    res, recipe, run_dir, env, t0 = pipeline_jobs
    ids = dict(re.findall(r"^(\w+)\s+(\d+)\b", res.stdout, re.M))
    assert set(ids) == {*STAGES, "eval"}, res.stdout
    infos = {stage: wait_job(job, timeout=420) for stage, job in ids.items()}
    logs = {p.name: p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.out"))}
    every_log = "".join(f"\n===== {name}\n{text[-3000:]}" for name, text in logs.items())
    for stage in STAGES:
        assert infos[stage]["JobState"] == "COMPLETED", (stage, infos[stage], every_log)
        assert infos[stage]["NumNodes"] == "2", infos[stage]
        _check_stage_outputs(run_dir / stage, 3, world=2)

    # dependency order, from the files themselves: a stage writes config.yaml once its inputs were
    # checked (after it started), DONE last
    began = {s: (run_dir / s / "config.yaml").stat().st_mtime for s in STAGES}
    done = {s: (run_dir / s / "DONE").stat().st_mtime for s in STAGES}
    for stage, needs in {"mind_reading": ["teacher"], "emulation": ["teacher"],
                         "coupling": ["mind_reading", "emulation"]}.items():
        for need in needs:
            assert began[stage] > done[need], (stage, need, began, done)
    print(f"\npipeline: every stage DONE {max(done.values()) - min(began.values()):.0f}s after the first began, "
          f"checked {time.monotonic() - t0:.0f}s after submission; " + ", ".join(
        f"{s} {began[s] - min(began.values()):.0f}-{done[s] - min(began.values()):.0f}s" for s in STAGES))

    ev = infos["eval"]
    if importlib.util.find_spec("icot.pipeline") is None:
        # `icot pipeline` (which eval.sbatch runs with --only=eval) is not written yet
        pytest.xfail(f"icot/pipeline.py does not exist yet; the eval job {ids['eval']} ended {ev['JobState']}")
    eval_log = logs.get(f"icot-eval-{ids['eval']}.out", "")
    assert ev["JobState"] == "COMPLETED" and ev["NumNodes"] == "1", (ev, eval_log[-4000:])
    assert (f"python -m icot pipeline --config {recipe} --run_dir={run_dir} --only=eval" in eval_log
            and "eval finished with exit code 0" in eval_log), eval_log[-4000:]
    # `icot pipeline --only=eval` evaluated the finished stages and wrote results.{json,md} into RUN_DIR
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["modes"]) == {"no_cot", "explicit", "implicit"}, results
    first_results = (run_dir / "results.md").stat().st_mtime
    assert first_results > max(done.values())

    # submitting the finished run again skips every stage and only evaluates
    again = _slurm(str(ROOT / "slurm" / "submit_pipeline.sh"), str(recipe), str(run_dir), "--time=15",
                   env=env, cwd=ws)
    assert again.stdout.count("skipped") == len(STAGES), again.stdout
    ids2 = dict(re.findall(r"^(\w+)\s+(\d+)\b", again.stdout, re.M))
    assert set(ids2) == {"eval"}, again.stdout
    ev2 = wait_job(ids2["eval"], timeout=240)
    assert ev2["JobState"] == "COMPLETED", (ev2, stage_log(run_dir, "eval", ids2["eval"])[-4000:])
    assert (run_dir / "results.md").stat().st_mtime > first_results
    assert all((run_dir / s / "DONE").stat().st_mtime == done[s] for s in STAGES)
