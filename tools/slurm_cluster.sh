#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for tests, CI and trying the slurm/ templates.
#
#   sudo tools/slurm_cluster.sh start    # install (apt) if needed, start munged, slurmctld, slurmd n1+n2
#   export SLURM_CONF=/tmp/icot-slurm/etc/slurm.conf   # printed by start; or: source /tmp/icot-slurm/env
#   sinfo; sbatch -N 2 ...
#   sudo tools/slurm_cluster.sh status   # daemons, sinfo, squeue (exit 0 running, 3 not running)
#   sudo tools/slurm_cluster.sh stop     # cancel our jobs, stop the daemons started here
#
# Both nodes are the same machine: n1 and n2 (NodeAddr=127.0.0.1, one slurmd each on its own port),
# each claiming all `nproc` CPUs (so the machine is oversubscribed by design), partition `debug`.
# Everything lives in the state folder ICOT_SLURM_DIR (default /tmp/icot-slurm): slurm.conf, munge key
# and socket (a private munged, separate from any system one), state, spool, pid and log files.
# Jobs run as the submitting user; the daemons run as root (SlurmUser=root), so start/stop need root.
#
# Environment:
#   ICOT_SLURM_DIR       state folder                               [/tmp/icot-slurm]
#   ICOT_SLURM_PORT      slurmctld port; slurmd n1/n2 use +1 / +2   [16817]
#   ICOT_SLURM_CPUS      CPUs per node                              [$(nproc)]
#   ICOT_SLURM_TIMEOUT   seconds to wait for both nodes to be idle  [90]
#   ICOT_SLURM_CRED_EXPIRE  credential lifetime = delay before a requeued job may start again [10]
#   ICOT_SLURM_NO_APT=1  never apt-get install; fail if the daemons are missing
#   ICOT_SLURM_UTS       1: run each slurmd in its own UTS namespace (unshare), so `hostname` in a job
#                        prints n1 / n2; 0: never (`hostname` prints this machine's name on both);
#                        auto (default): when `unshare --uts` works here
set -euo pipefail

DIR=${ICOT_SLURM_DIR:-/tmp/icot-slurm}
CTLD_PORT=${ICOT_SLURM_PORT:-16817}
CPUS=${ICOT_SLURM_CPUS:-$(nproc)}
TIMEOUT=${ICOT_SLURM_TIMEOUT:-90}
CRED_EXPIRE=${ICOT_SLURM_CRED_EXPIRE:-10}
NODES=(n1 n2)
CLUSTER=icot

CONF=$DIR/etc/slurm.conf
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
MUNGE_PID=$MUNGE_DIR/munged.pid
CTLD_PID=$DIR/run/slurmctld.pid
export SLURM_CONF=$CONF

log() { printf '[slurm_cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
    [[ $(id -u) == 0 ]] || die "'$1' must run as root (the daemons run as SlurmUser=root); try: sudo $0 $1"
}

slurmd_pid_file() { echo "$DIR/run/slurmd-$1.pid"; }

# alive PIDFILE NAME: the pid in PIDFILE is running and is NAME (guards against a recycled pid)
alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # /proc, not kill -0: `status` also works for users who may not signal root's daemons
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2"* ]]
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sinfo >/dev/null || missing+=(slurm-client)
    ((${#missing[@]})) || return 0
    [[ ${ICOT_SLURM_NO_APT:-0} != 1 ]] || die "missing packages ${missing[*]} and ICOT_SLURM_NO_APT=1"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install SLURM and munge yourself"
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_hosts() {
    local n ok=1
    for n in "${NODES[@]}"; do
        [[ $(getent ahostsv4 "$n" 2>/dev/null | awk 'NR==1{print $1}') == 127.0.0.1 ]] || ok=0
    done
    ((ok)) && return 0
    log "adding '127.0.0.1 ${NODES[*]}' to /etc/hosts"
    printf '127.0.0.1 %s\n' "${NODES[*]}" >>/etc/hosts || die "cannot write /etc/hosts: add '127.0.0.1 ${NODES[*]}' to it yourself"
}

write_conf() {
    local tmp=$CONF.new n i=0
    mkdir -p "$DIR"/{etc,state,log,run} "$MUNGE_DIR"
    for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done
    chmod 0755 "$DIR" "$MUNGE_DIR"   # clients (any user) must reach the munge socket
    cat >"$tmp" <<EOF
# Written by tools/slurm_cluster.sh on every start (edits here are lost; use its ICOT_SLURM_* variables).
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job by that many seconds (Slurm default 120).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
# Schedule often: a requeued job (or one whose dependency ended) starts within seconds.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Trust the node lines below even though both "nodes" share this machine's CPUs.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
MinJobAge=600
EOF
    for n in "${NODES[@]}"; do
        i=$((i + 1))
        echo "NodeName=$n NodeAddr=127.0.0.1 NodeHostname=$n Port=$((CTLD_PORT + i)) CPUs=$CPUS State=UNKNOWN" >>"$tmp"
    done
    local IFS=,
    echo "PartitionName=debug Nodes=${NODES[*]} Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP" >>"$tmp"
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then rm -f "$tmp"; else mv -f "$tmp" "$CONF"; fi
    echo "export SLURM_CONF=$CONF" >"$DIR/env"
}

start_munge() {
    alive "$MUNGE_PID" munged && return 0
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        (umask 077 && dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 0400 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # --force: the state folder may sit under a world-writable /tmp, which munged otherwise refuses.
    munged --force --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_PID" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" ||
        die "munged failed to start: $(tail -n 5 "$MUNGE_DIR/munged.log" 2>/dev/null)"
    local i
    for i in $(seq 50); do
        munge -n --socket="$MUNGE_SOCKET" 2>/dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged does not answer on $MUNGE_SOCKET: $(tail -n 5 "$MUNGE_DIR/munged.log" 2>/dev/null)"
}

tails() {
    local f
    for f in "$MUNGE_DIR/munged.log" "$DIR/log/slurmctld.log" "$DIR"/log/slurmd-*.log; do
        [[ -f $f ]] || continue
        echo "----- tail $f" >&2
        tail -n 15 "$f" >&2
    done
}

daemons_alive() {
    local n
    alive "$MUNGE_PID" munged && alive "$CTLD_PID" slurmctld || return 1
    for n in "${NODES[@]}"; do alive "$(slurmd_pid_file "$n")" slurmd || return 1; done
}

node_states() { sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u; }

wait_idle() {
    local started=$SECONDS deadline=$((SECONDS + TIMEOUT)) states resumed=0
    while :; do
        states=$(node_states || true)
        if [[ $(grep -cE '^n[12] idle$' <<<"$states") == 2 ]]; then
            return 0
        fi
        # ReturnToService=2 revives DOWN nodes on registration, but not DRAINED ones (e.g. left over
        # in the saved state of an earlier run): resume those once.
        if ((!resumed)) && grep -qE ' (drain|drng|drained|down)\*?$' <<<"$states"; then
            scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        # A daemon that exited (e.g. its port is taken) will not come back: fail now, not at the timeout.
        if ((SECONDS >= started + 3)) && ! daemons_alive; then
            log "a daemon exited during start-up; sinfo says:"
            echo "${states:-<no answer from slurmctld>}" >&2
            tails
            do_status >&2 || true
            die "cluster did not come up (a port in use? another ICOT_SLURM_PORT moves all three; state folder $DIR)"
        fi
        if ((SECONDS >= deadline)); then
            log "nodes not idle after ${TIMEOUT}s; sinfo says:"
            echo "${states:-<no answer from slurmctld>}" >&2
            tails
            die "cluster did not come up (see the log tails above; state folder $DIR)"
        fi
        sleep 0.5
    done
}

use_uts() {
    case ${ICOT_SLURM_UTS:-auto} in
        0) return 1 ;;
        1) return 0 ;;
        *) unshare --uts sh -c 'hostname icot-uts-probe' 2>/dev/null ;;
    esac
}

do_start() {
    need_root start
    local t0=$SECONDS n
    install_packages
    ensure_hosts
    write_conf
    if alive "$CTLD_PID" slurmctld && [[ $CONF -nt $DIR/run/started ]]; then
        log "warning: slurm.conf changed while the cluster runs; '$0 restart' applies it"
    fi
    start_munge
    if ! alive "$CTLD_PID" slurmctld; then
        slurmctld -f "$CONF" || { tails; die "slurmctld failed to start"; }
    fi
    for n in "${NODES[@]}"; do
        alive "$(slurmd_pid_file "$n")" slurmd && continue
        if use_uts; then
            # own UTS namespace: `hostname` in a job on n1 says n1
            # shellcheck disable=SC2016
            unshare --uts sh -c 'hostname "$1" && exec slurmd -f "$2" -N "$1"' sh "$n" "$CONF" ||
                { tails; die "slurmd -N $n failed to start"; }
        else
            slurmd -f "$CONF" -N "$n" || { tails; die "slurmd -N $n failed to start"; }
        fi
    done
    touch "$DIR/run/started"
    wait_idle
    log "cluster '$CLUSTER' up in $((SECONDS - t0))s: nodes ${NODES[*]} idle, partition debug, state in $DIR"
    sinfo >&2
    echo "export SLURM_CONF=$CONF"
}

stop_pids() { # stop_pids NAME:PIDFILE ...: TERM all at once, wait up to 10 s, then KILL
    local item name file pid pids=() names=() i
    for item in "$@"; do
        name=${item%%:*} file=${item#*:}
        if alive "$file" "$name"; then
            pids+=("$(<"$file")") names+=("$name")
            kill -TERM "${pids[-1]}" 2>/dev/null || true
        fi
        rm -f "$file"
    done
    for i in $(seq 100); do
        kill -0 "${pids[@]}" 2>/dev/null || break   # true while any is alive
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if kill -0 "${pids[i]}" 2>/dev/null; then
            log "${names[i]} (${pids[i]}) ignored SIGTERM for 10s; killing it"
            kill -KILL "${pids[i]}" 2>/dev/null || true
        fi
        log "stopped ${names[i]} (${pids[i]})"
    done
}

do_stop() {
    need_root stop
    local n i jobs
    if alive "$CTLD_PID" slurmctld; then
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: ${jobs//$'\n'/ }"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for i in $(seq 40); do
                [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    local daemons=("slurmctld:$CTLD_PID" "munged:$MUNGE_PID")
    for n in "${NODES[@]}"; do daemons+=("slurmd:$(slurmd_pid_file "$n")"); done
    stop_pids "${daemons[@]}"
    rm -f "$DIR/run/started"
}

do_status() {
    local rc=0 n
    if alive "$MUNGE_PID" munged; then echo "munged    running (pid $(<"$MUNGE_PID"))"; else echo "munged    stopped"; rc=3; fi
    if alive "$CTLD_PID" slurmctld; then echo "slurmctld running (pid $(<"$CTLD_PID"))"; else echo "slurmctld stopped"; rc=3; fi
    for n in "${NODES[@]}"; do
        if alive "$(slurmd_pid_file "$n")" slurmd; then
            echo "slurmd $n running (pid $(<"$(slurmd_pid_file "$n")"))"
        else
            echo "slurmd $n stopped"; rc=3
        fi
    done
    if ((rc == 0)); then
        echo "export SLURM_CONF=$CONF"
        sinfo || rc=3
        squeue || true
    fi
    return "$rc"
}

case ${1:-} in
    start) do_start ;;
    stop) do_stop ;;
    restart) do_stop; do_start ;;
    status) do_status ;;
    *) echo "usage: $0 {start|stop|restart|status}" >&2; exit 2 ;;
esac
