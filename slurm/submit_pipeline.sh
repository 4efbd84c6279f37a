#!/usr/bin/env bash
# Submit a whole icot run as chained SLURM jobs and print their ids.
#
#   slurm/submit_pipeline.sh RECIPE RUN_DIR [sbatch options ...]
#
# The stages and their dependencies come from the recipe's methods, as `python -m icot stages --config
# RECIPE` lists them: one job per stage, `afterok` on the stages it reads, then
#   eval          afterok: all of them; one node: python -m icot pipeline --only=eval
#
# Each training stage is slurm/stage.sbatch on ICOT_NODES nodes; it checkpoints and requeues itself
# near its time limit, and a stage whose RUN_DIR/<stage>/DONE exists is not submitted again, so running
# this a second time resumes a half-finished run. If a stage fails, the jobs that depend on it are
# cancelled (--kill-on-invalid-dep=yes). The env file (ICOT_ENV, default slurm/env.sh next to this
# script) is sourced here first, so its SBATCH_* settings apply; sbatch options given here apply to
# every job and win over it. Logs: RUN_DIR/logs/<job name>-<job id>.out.
#
# Environment: ICOT_ENV, ICOT_NODES (2), ICOT_EVAL_GPUS (1), ICOT_SBATCH_ARGS, ICOT_CPU, EXTRA_ARGS
# (more --key=value arguments for every trainer command), ICOT_STAGES (space-separated subset of the
# stages to submit, default all of the run's; eval is always submitted).
set -euo pipefail

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 2 ]] || usage
[[ $1 != -* && $2 != -* ]] || usage

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPE=$(realpath -m -- "$1")
RUN_DIR=$(realpath -m -- "$2")
shift 2
user_opts=("$@")
[[ -f $RECIPE ]] || { echo "submit_pipeline: no recipe file $RECIPE" >&2; exit 2; }

ICOT_ENV=${ICOT_ENV:-$here/env.sh}
if [[ -f $ICOT_ENV ]]; then
    ICOT_ENV=$(realpath -- "$ICOT_ENV")
    set +eu
    # shellcheck disable=SC1090
    source "$ICOT_ENV" || { echo "submit_pipeline: sourcing $ICOT_ENV failed" >&2; exit 2; }
    set -eu
    export ICOT_ENV
else
    echo "submit_pipeline: warning: no env file $ICOT_ENV (copy slurm/env.sh.example); jobs use the current environment" >&2
    unset ICOT_ENV
fi

command -v sbatch >/dev/null || { echo "submit_pipeline: sbatch not found (is SLURM_CONF / the slurm module set?)" >&2; exit 2; }
command -v python >/dev/null || { echo "submit_pipeline: no python on PATH (activate the environment in the env file)" >&2; exit 2; }

# Split on spaces without expanding wildcards (--data.train=data/*.txt stays as written).
read -r -a sbatch_args <<<"${ICOT_SBATCH_ARGS:-}"
read -r -a extra_args <<<"${EXTRA_ARGS:-}"

# The run's stages, in order, and what each reads (from the registry, through the recipe's methods).
plan=$(python -m icot stages --config "$RECIPE" --format tsv "${extra_args[@]}") ||
    { echo "submit_pipeline: python -m icot stages --config $RECIPE failed" >&2; exit 2; }
declare -A after=()
planned=()
while IFS=$'\t' read -r stage _method reads _mode; do
    [[ $reads == - ]] && reads=""
    after[$stage]=$reads
    planned+=("$stage")
done <<<"$plan"

nodes=${ICOT_NODES:-2}
read -r -a stages <<<"${ICOT_STAGES:-${planned[*]}}"
common=(--parsable --export=ALL --kill-on-invalid-dep=yes --output="$RUN_DIR/logs/%x-%j.out" "${sbatch_args[@]}")
mkdir -p "$RUN_DIR/logs"

declare -A job=()
ids=()
# submit STAGE SCRIPT [sbatch options...]: sbatch one job depending on the jobs in $deps
submit() {
    local stage=$1 script=$2 out id
    shift 2
    local dep_ids=() d
    for d in $deps; do [[ -n ${job[$d]:-} ]] && dep_ids+=("${job[$d]}"); done
    local dep_opt=()
    ((${#dep_ids[@]})) && dep_opt=(--dependency="afterok:$(IFS=:; echo "${dep_ids[*]}")")
    out=$(STAGE=$stage RECIPE=$RECIPE RUN_DIR=$RUN_DIR \
        sbatch "${common[@]}" --job-name="icot-$stage" "${dep_opt[@]}" "$@" "$script") ||
        { echo "submit_pipeline: sbatch failed for $stage" >&2; exit 1; }
    id=${out%%;*}
    job[$stage]=$id
    ids+=("$id")
    printf '%-13s %-10s %s\n' "$stage" "$id" "${dep_opt[*]:-}"
}

printf '%-13s %-10s %s\n' stage job_id dependency
for stage in "${stages[@]}"; do
    [[ -v after[$stage] ]] || { echo "submit_pipeline: '$stage' in ICOT_STAGES is not a stage of this run (${planned[*]})" >&2; exit 2; }
    if [[ -e $RUN_DIR/$stage/DONE ]]; then
        printf '%-13s %-10s %s\n' "$stage" "done" "(skipped: $RUN_DIR/$stage/DONE exists)"
        continue
    fi
    deps=${after[$stage]}
    submit "$stage" "$here/stage.sbatch" --nodes="$nodes" "${user_opts[@]}"
done

eval_gpu_opt=()
if [[ ${ICOT_CPU:-0} != 1 && -n ${SBATCH_GPUS_PER_NODE:-} ]]; then
    gpus=${ICOT_EVAL_GPUS:-1}
    # keep a GPU type (h100:8 -> h100:1) when the cluster wants one
    [[ $SBATCH_GPUS_PER_NODE == *:* && $gpus != *:* ]] && gpus=${SBATCH_GPUS_PER_NODE%:*}:$gpus
    eval_gpu_opt=(--gpus-per-node="$gpus")
fi
deps="${stages[*]}"
submit eval "$here/eval.sbatch" "${user_opts[@]}" --nodes=1 "${eval_gpu_opt[@]}"

echo "jobs: ${ids[*]}"
echo "logs: $RUN_DIR/logs/   watch: squeue -j $(IFS=,; echo "${ids[*]}")"
