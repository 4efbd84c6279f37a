"""The SLURM side: shell syntax of the scripts, the pipeline submitter, and (with a real cluster) jobs.

Always run: `bash -n` over slurm/*.sh, slurm/*.sbatch, slurm/env.sh.example and tools/*.sh, and
slurm/submit_pipeline.sh against a fake `sbatch` (dependency chain, skipping finished stages).

With a cluster (``ICOT_SLURM=1``; CI starts one with ``sudo tools/slurm_cluster.sh start`` and exports
the SLURM_CONF it prints): a two-node job, torchrun + gloo all_reduce across the two nodes, USR1 ->
trap -> ``scontrol requeue`` -> second run, and slurm/stage.sbatch end to end with a fake trainer (a
stand-in ``icot`` package found first on sys.path because the job runs in its folder): preemption
(with a USR1 sent while the ranks still ignore it), checkpoint, requeue and resume; a finished stage
never requeues; a failing trainer fails the job. The same with the real trainer, and
slurm/submit_pipeline.sh on the cluster: tests/test_slurm_trainer.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from icot.registry import plan

ROOT = Path(__file__).resolve().parents[1]
STAGE_SBATCH = ROOT / "slurm" / "stage.sbatch"

SHELL_SCRIPTS = sorted(
    [*ROOT.glob("slurm/*.sh"), *ROOT.glob("slurm/*.sbatch"), *ROOT.glob("slurm/*.sh.example"),
     *ROOT.glob("tools/*.sh")]
)

needs_slurm = pytest.mark.skipif(
    os.environ.get("ICOT_SLURM") != "1",
    reason="needs a SLURM cluster and ICOT_SLURM=1 (locally: sudo tools/slurm_cluster.sh start, "
    "then export the SLURM_CONF line it prints and ICOT_SLURM=1)",
)

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


# ---------------------------------------------------------------------------------------------------
# always: syntax and the submitter


def test_scripts_present():
    names = {p.relative_to(ROOT).as_posix() for p in SHELL_SCRIPTS}
    for needed in ("tools/slurm_cluster.sh", "slurm/stage.sbatch", "slurm/eval.sbatch",
                   "slurm/submit_pipeline.sh", "slurm/env.sh.example"):
        assert needed in names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_bash_syntax(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


FAKE_SBATCH = r"""#!/usr/bin/env bash
# records its arguments and the variables the templates read, answers like `sbatch --parsable`
n=$(( $(cat "$FAKE_SBATCH_LOG.n" 2>/dev/null || echo 100) + 1 ))
echo "$n" >"$FAKE_SBATCH_LOG.n"
python3 - "$n" "$@" >>"$FAKE_SBATCH_LOG" <<'EOF'
import json, os, sys
keys = ("STAGE", "RECIPE", "RUN_DIR", "ICOT_ENV", "SBATCH_GPUS_PER_NODE")
print(json.dumps({"id": sys.argv[1], "args": sys.argv[2:], "env": {k: os.environ.get(k) for k in keys}}))
EOF
echo "$n;cluster"
"""


def _run_submitter(tmp_path, env_text, *extra, done=()):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    env_file = tmp_path / "env.sh"
    env_file.write_text(env_text)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("# fake\n")
    run_dir = tmp_path / "run"
    for stage in done:
        (run_dir / stage).mkdir(parents=True, exist_ok=True)
        (run_dir / stage / "DONE").touch()
    log = tmp_path / "sbatch.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "ICOT_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_SBATCH_LOG=str(log), ICOT_ENV=str(env_file))
    res = subprocess.run([str(ROOT / "slurm" / "submit_pipeline.sh"), str(recipe), str(run_dir), *extra],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return res.stdout, {c["env"]["STAGE"] or "eval": c for c in calls}, run_dir


def _opt(call, name):
    """The last value of --name=VALUE among the sbatch arguments (sbatch lets the last one win)."""
    vals = [a.split("=", 1)[1] for a in call["args"] if a.startswith(f"--{name}=")]
    return vals[-1] if vals else None


def test_submit_pipeline_chain(tmp_path):
    out, calls, run_dir = _run_submitter(
        tmp_path, "export SBATCH_GPUS_PER_NODE=h100:8\nexport ICOT_NODES=3\n", "--partition=gpu", "--qos=high")
    # The order and the dependencies come from the registry (`icot stages`), the shared stages first.
    assert list(calls) == [*(spec.name for spec in plan(["icot_kd"])), "eval"]
    ids = {stage: c["id"] for stage, c in calls.items()}
    deps = {stage: _opt(c, "dependency") for stage, c in calls.items()}
    assert deps["teacher"] is None and deps["no_cot"] is None
    assert deps["mind_reading"] == f"afterok:{ids['teacher']}"
    assert deps["emulation"] == f"afterok:{ids['teacher']}"
    assert deps["coupling"] == f"afterok:{ids['mind_reading']}:{ids['emulation']}"
    assert set(deps["eval"].removeprefix("afterok:").split(":")) == {
        ids[s] for s in ("teacher", "no_cot", "mind_reading", "emulation", "coupling")}
    for stage, call in calls.items():
        assert call["args"][-1].endswith("eval.sbatch" if stage == "eval" else "stage.sbatch")
        assert "--partition=gpu" in call["args"] and "--qos=high" in call["args"]
        assert "--parsable" in call["args"] and "--kill-on-invalid-dep=yes" in call["args"]
        assert _opt(call, "job-name") == f"icot-{stage}"
        assert _opt(call, "output") == f"{run_dir}/logs/%x-%j.out"
        assert call["env"]["RUN_DIR"] == str(run_dir) and call["env"]["RECIPE"] == str(tmp_path / "recipe.yaml")
        assert call["env"]["ICOT_ENV"] == str(tmp_path / "env.sh")
        assert call["env"]["SBATCH_GPUS_PER_NODE"] == "h100:8"
        assert _opt(call, "nodes") == ("1" if stage == "eval" else "3")
    assert _opt(calls["eval"], "gpus-per-node") == "h100:1"
    assert (run_dir / "logs").is_dir()
    for stage, i in ids.items():
        assert re.search(rf"^{stage}\s+{i}\b", out, re.M), out


def test_submit_pipeline_skips_done_stages_and_cpu_mode(tmp_path):
    out, calls, _ = _run_submitter(tmp_path, "export ICOT_CPU=1\n", done=("teacher", "no_cot"))
    assert list(calls) == ["mind_reading", "emulation", "coupling", "eval"]
    assert _opt(calls["mind_reading"], "dependency") is None
    assert _opt(calls["coupling"], "dependency") == (
        f"afterok:{calls['mind_reading']['id']}:{calls['emulation']['id']}")
    assert _opt(calls["eval"], "gpus-per-node") is None
    assert "skipped" in out


# ---------------------------------------------------------------------------------------------------
# cluster helpers


def _slurm(*cmd, check=True, **kw):
    res = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res


def sbatch(script, *args, script_args=(), env=None, cwd=None, wait=False, timeout=300):
    """Submit `script` with sbatch options `args`; returns the job id (with wait=True once it ended)."""
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args, str(script), *script_args]
    res = _slurm(*cmd, check=not wait, env=env, cwd=cwd, timeout=timeout)
    job_id = res.stdout.strip().splitlines()[0].split(";")[0] if res.stdout.strip() else ""
    assert job_id.isdigit(), res.stdout + res.stderr
    return job_id


def job_info(job_id):
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = _slurm("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job_id, timeout=300, until=TERMINAL):
    """Poll until the job state is in `until`; returns the job_info dict."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        if info.get("JobState") in until:
            return info
        if time.monotonic() > deadline:
            _slurm("scancel", job_id, check=False)
            raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout}s: {info}")
        time.sleep(1)


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def submit_stage(stage, recipe, run_dir, *trainer_args, exports=None, sbatch_args=(), cwd=None,
                 wait=True, timeout=600):
    """Submit slurm/stage.sbatch for `stage` like slurm/submit_pipeline.sh does.

    `exports` are extra environment variables for the job (ICOT_ENV, EXTRA_ARGS, GPUS_PER_NODE, ...),
    `sbatch_args` extra sbatch options, `trainer_args` go to the trainer after EXTRA_ARGS. The log is
    RUN_DIR/logs/icot-<stage>-<jobid>.out. With wait=True, returns (job_id, job_info, log text) once the
    job reached a final state (requeues included); else (job_id, None, None).
    """
    run_dir = Path(run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, STAGE=stage, RECIPE=str(recipe), RUN_DIR=str(run_dir), **(exports or {}))
    job_id = sbatch(STAGE_SBATCH, f"--job-name=icot-{stage}", f"--output={run_dir}/logs/%x-%j.out",
                    "--export=ALL", *sbatch_args, script_args=trainer_args, env=env, cwd=cwd)
    if not wait:
        return job_id, None, None
    info = wait_job(job_id, timeout=timeout)
    return job_id, info, stage_log(run_dir, stage, job_id)


def stage_log(run_dir, stage, job_id):
    path = Path(run_dir) / "logs" / f"icot-{stage}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""  # tqdm bars of 2 ranks interleave


@pytest.fixture(scope="module")
def cluster():
    if not shutil.which("sbatch"):
        pytest.fail("ICOT_SLURM=1 but sbatch is not on PATH")
    res = _slurm("sinfo", "-h", "-N", "-o", "%N %t", check=False)
    nodes = dict(line.split() for line in res.stdout.splitlines() if line.strip())
    up = [n for n, state in nodes.items() if state.rstrip("*") in ("idle", "mix", "alloc")
          and not state.endswith("*")]
    if res.returncode != 0 or len(up) < 2:
        pytest.fail(f"ICOT_SLURM=1 but no two usable nodes (SLURM_CONF={os.environ.get('SLURM_CONF')}):\n"
                    f"{res.stdout}{res.stderr}")
    return up


ALLREDUCE_PY = """\
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"ALLREDUCE rank={dist.get_rank()} world={dist.get_world_size()} "
      f"node={os.environ['SLURMD_NODENAME']} sum={t.item()}", flush=True)
dist.destroy_process_group()
"""


# ---------------------------------------------------------------------------------------------------
# cluster: raw SLURM behaviour the templates rely on


@needs_slurm
def test_two_node_job(cluster, tmp_path):
    script = tmp_path / "hosts.sbatch"
    script.write_text(textwrap.dedent("""\
        #!/bin/bash
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        srun bash -c 'echo "NODE $SLURMD_NODENAME $(hostname) $SLURM_PROCID"'
        """))
    job = sbatch(script, f"--output={tmp_path}/%j.out", wait=True, cwd=tmp_path)
    out = (tmp_path / f"{job}.out").read_text()
    nodes = {line.split()[1] for line in out.splitlines() if line.startswith("NODE ")}
    assert len(nodes) == 2, out
    if set(cluster) == {"n1", "n2"}:
        assert nodes == {"n1", "n2"}
    assert job_info(job)["JobState"] == "COMPLETED"


@needs_slurm
def test_torchrun_gloo_allreduce_two_nodes(cluster, tmp_path):
    (tmp_path / "allreduce.py").write_text(ALLREDUCE_PY)
    script = tmp_path / "torchrun.sbatch"
    script.write_text(textwrap.dedent("""\
        #!/bin/bash
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
        PORT=$((10000 + (SLURM_JOB_ID % 5000) * 4))
        srun torchrun --nnodes 2 --nproc_per_node 1 --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d \\
            --rdzv_endpoint "$MASTER_ADDR:$PORT" allreduce.py
        echo "SRUN_RC=$?"
        """))
    job = sbatch(script, f"--output={tmp_path}/%j.out", wait=True, cwd=tmp_path)
    out = (tmp_path / f"{job}.out").read_text()
    lines = [line for line in out.splitlines() if line.startswith("ALLREDUCE ")]
    assert len(lines) == 2, out
    assert all("world=2" in line and "sum=3.0" in line for line in lines), out
    assert len({re.search(r"node=(\S+)", line).group(1) for line in lines}) == 2, out
    assert "SRUN_RC=0" in out
    assert job_info(job)["JobState"] == "COMPLETED"


@needs_slurm
def test_usr1_trap_and_requeue(cluster, tmp_path):
    script = tmp_path / "requeue.sbatch"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --nodes=1
        #SBATCH --requeue
        #SBATCH --open-mode=append
        run=${{SLURM_RESTART_COUNT:-0}}
        echo "RUN $run"
        if [ "$run" != 0 ]; then echo SECOND_RUN_DONE; exit 0; fi
        trap 'echo GOT_USR1; scontrol requeue "$SLURM_JOB_ID"; echo "REQUEUE_RC=$?"; exit 0' USR1
        touch {tmp_path}/ready
        for i in $(seq 600); do sleep 0.2; done
        echo NO_SIGNAL
        """))
    job = sbatch(script, f"--output={tmp_path}/%j.out", cwd=tmp_path)
    wait_for(lambda: (tmp_path / "ready").exists(), 60, "the job to start")
    _slurm("scancel", "--signal=USR1", "--batch", job)
    info = wait_job(job, timeout=180)
    out = (tmp_path / f"{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", (info, out)
    assert info["Restarts"] == "1", (info, out)
    assert "GOT_USR1" in out and "REQUEUE_RC=0" in out and "SECOND_RUN_DONE" in out, out
    assert "NO_SIGNAL" not in out


# ---------------------------------------------------------------------------------------------------
# cluster: slurm/stage.sbatch with a fake trainer

FAKE_TRAINER = """\
import json, os, signal, sys, time
from pathlib import Path
import torch, torch.distributed as dist

args = sys.argv[1:]
if args[:1] == ["pipeline"]:  # the eval job
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--run_dir=")))
    (run_dir / "eval.json").write_text(json.dumps(dict(argv=args, time=time.time(),
                                                       nodes=os.environ.get("SLURM_JOB_NUM_NODES"))))
    sys.exit(0)
assert args[:1] == ["train"], args
stage = args[1]
run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--run_dir=")))
sdir = run_dir / stage
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
mode = os.environ.get("FAKE_MODE", "preempt")
start = time.time()
got = []


def install_handlers():
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))


if mode != "late":
    install_handlers()

def finish(code):
    dist.destroy_process_group()
    sys.exit(code)


dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
resumed = (sdir / "ckpt").exists()
rec = dict(start=start, rank=rank, world=world, node=os.environ.get("SLURMD_NODENAME"), restart=restart, argv=args,
           sum=t.item(), resumed=resumed, ds_accelerator=os.environ.get("DS_ACCELERATOR"),
           env_hook=os.environ.get("FAKE_ENV_SOURCED"))
(sdir / f"rank{rank}-run{restart}.json").write_text(json.dumps(rec))
if mode == "fail":
    finish(3)
if resumed or mode == "done":
    if rank == 0:
        (sdir / "DONE").touch()
    finish(0)
if mode == "late":  # like the real trainer: USR1 is honoured only once training runs
    (sdir / f"starting-rank{rank}-run{restart}").touch()
    time.sleep(4)  # "start-up": USR1 is still ignored here (the launcher's `trap "" USR1`)
    install_handlers()
(sdir / f"ready-rank{rank}-run{restart}").touch()
for _ in range(1200):
    if got:
        break
    time.sleep(0.1)
else:
    finish(4)
rec["signals"] = got
(sdir / f"rank{rank}-run{restart}.json").write_text(json.dumps(rec))
if mode == "done_on_signal":
    if rank == 0:
        (sdir / "DONE").touch()
    finish(0)
(sdir / "ckpt").mkdir(exist_ok=True)
if rank == 0:
    (sdir / "PREEMPTED").touch()
finish(0)
"""


@pytest.fixture
def fake_trainer(tmp_path):
    """A folder with a stand-in `icot` package and an env file for jobs run in that folder."""
    work = tmp_path / "work"
    (work / "icot").mkdir(parents=True)
    (work / "icot" / "__init__.py").write_text("")
    (work / "icot" / "__main__.py").write_text(FAKE_TRAINER)
    env_file = work / "env.sh"
    env_file.write_text(f"export ICOT_CPU=1\nexport FAKE_ENV_SOURCED=yes\nexport PYTHONPATH={work}\n")
    recipe = work / "recipe.yaml"
    recipe.write_text("# fake\n")
    return work, env_file, recipe


def _records(sdir):
    return {p.stem: json.loads(p.read_text()) for p in sorted(sdir.glob("rank*-run*.json"))}


def _wait_ready(sdir, job, run):
    wait_for(lambda: len(list(sdir.glob(f"ready-rank*-run{run}"))) == 2 or
             job_info(job).get("JobState") in TERMINAL, 180, "both fake trainer ranks to start")
    assert len(list(sdir.glob(f"ready-rank*-run{run}"))) == 2, job_info(job)


@needs_slurm
def test_stage_template_preempt_requeue_resume(cluster, fake_trainer, tmp_path):
    """USR1 -> every rank -> checkpoint -> requeue -> resume. The USR1 arrives while the ranks still
    ignore it (the real trainer installs its handler when training starts), so this also checks that
    the batch shell repeats it (every ICOT_USR1_REPEAT s) until the step ends."""
    work, env_file, recipe = fake_trainer
    run_dir = tmp_path / "run"
    sdir = run_dir / "teacher"
    job, _, _ = submit_stage("teacher", recipe, run_dir, "--pos.arg=1", cwd=work, wait=False,
                             exports={"ICOT_ENV": str(env_file), "EXTRA_ARGS": "--train.lr=0.5 --x=y",
                                      "FAKE_MODE": "late", "ICOT_USR1_REPEAT": "2"})
    wait_for(lambda: len(list(sdir.glob("starting-rank*-run0"))) == 2 or
             job_info(job).get("JobState") in TERMINAL, 180, "both fake trainer ranks to start")
    # what --signal=B:USR1@120 does near the time limit
    _slurm("scancel", "--signal=USR1", "--batch", job)
    info = wait_job(job, timeout=240)
    log = stage_log(run_dir, "teacher", job)
    assert info["JobState"] == "COMPLETED", (info, log)
    assert info["Restarts"] == "1", (info, log)
    assert (sdir / "DONE").exists() and (sdir / "PREEMPTED").exists()
    recs = _records(sdir)
    assert set(recs) == {"rank0-run0", "rank1-run0", "rank0-run1", "rank1-run1"}, (recs, log)
    for name, rec in recs.items():
        assert rec["world"] == 2 and rec["sum"] == 2.0
        assert rec["ds_accelerator"] == "cpu" and rec["env_hook"] == "yes"
        assert rec["argv"][:4] == ["train", "teacher", "--config", str(recipe)]
        assert rec["argv"][4:] == [f"--run_dir={run_dir}", "--train.resume=auto", "--train.lr=0.5", "--x=y",
                                   "--pos.arg=1"]
        assert rec["resumed"] == name.endswith("run1")
    assert recs["rank0-run0"]["signals"][:1] == [10] and recs["rank1-run0"]["signals"][:1] == [10], recs
    assert len({recs["rank0-run0"]["node"], recs["rank1-run0"]["node"]}) == 2
    assert "requeueing job" in log and "finished (DONE)" in log, log


@needs_slurm
def test_stage_template_done_never_requeues(cluster, fake_trainer, tmp_path):
    work, env_file, recipe = fake_trainer
    run_dir = tmp_path / "run"
    sdir = run_dir / "no_cot"
    job, _, _ = submit_stage("no_cot", recipe, run_dir, cwd=work, wait=False,
                             exports={"ICOT_ENV": str(env_file), "FAKE_MODE": "done_on_signal"})
    _wait_ready(sdir, job, 0)
    _slurm("scancel", "--signal=USR1", "--batch", job)
    info = wait_job(job, timeout=120)
    log = stage_log(run_dir, "no_cot", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, log)
    assert (sdir / "DONE").exists() and "requeueing" not in log, log
    # a finished stage submitted again does nothing
    job2, info2, log2 = submit_stage("no_cot", recipe, run_dir, cwd=work, timeout=60,
                                     exports={"ICOT_ENV": str(env_file)})
    assert info2["JobState"] == "COMPLETED" and "already finished" in log2, (info2, log2)


@needs_slurm
def test_stage_template_failing_trainer_fails_job(cluster, fake_trainer, tmp_path):
    work, env_file, recipe = fake_trainer
    run_dir = tmp_path / "run"
    job, info, log = submit_stage("emulation", recipe, run_dir, cwd=work, timeout=120,
                                  exports={"ICOT_ENV": str(env_file), "FAKE_MODE": "fail"})
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, log)
    assert not (run_dir / "emulation" / "DONE").exists()
    assert "step failed" in log, log
