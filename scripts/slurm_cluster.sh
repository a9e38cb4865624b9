#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the `slurm`-marked tests (tests/integration/test_slurm.py).
#
#   bash scripts/slurm_cluster.sh start    # install (Debian packages) if needed, configure, start; prints one status line
#   bash scripts/slurm_cluster.sh status   # one line: up (node state) or down (why); exit 0 only when the node takes jobs
#   bash scripts/slurm_cluster.sh stop     # stop the daemons this script started (munged too, if it started it)
#
# Needs root (it installs slurmctld, slurmd, slurm-client and munge with apt-get when they are
# missing, and writes /etc/slurm/slurm.conf). The cluster: one node (`hostname -s`, address
# 127.0.0.1, CPUs from nproc, 1 GiB of memory declared), one partition `debug` (the default, no time
# limit), munge authentication, daemons running as root, no cgroups (proctrack/linuxproc, task/none),
# jobs requeueable (JobRequeue=1) and restartable 5 s after a requeue (AuthInfo=cred_expire=5; the
# default would make a requeued job wait 120 s). Finished jobs stay visible to `scontrol show job`
# for 10 minutes (MinJobAge=600); there is no accounting database (no sacct).
# State, logs and pid files live in $ICL_KERNELS_SLURM_DIR (default /var/lib/icl-kernels-slurm).
# An /etc/slurm/slurm.conf that this script did not write is never replaced: `start` then stops
# with a message. Every wait has a timeout; `start` runs again safely (a running cluster is kept).
set -uo pipefail

DIR=${ICL_KERNELS_SLURM_DIR:-/var/lib/icl-kernels-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by icl-kernels scripts/slurm_cluster.sh"
HOST=$(hostname -s)

say() { echo "slurm_cluster: $*"; }
fail() { say "$*"; exit 1; }

node_state() { timeout 10 sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -1; }

alive() {  # alive NAME: the daemon whose pid file is $DIR/NAME.pid runs
    local pid
    pid=$(cat "$DIR/$1.pid" 2>/dev/null) || return 1
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

status() {
    local state
    if ! command -v sinfo >/dev/null 2>&1; then
        say "down: SLURM is not installed (sinfo not found)"; return 1
    fi
    if ! timeout 10 scontrol ping >/dev/null 2>&1; then
        say "down: no slurmctld answers (scontrol ping)"; return 1
    fi
    state=$(node_state)
    case "$state" in
        idle*|mix*|alloc*|comp*) say "up: node $HOST $state, partition $(timeout 10 sinfo -h -o %P | head -1)"; return 0 ;;
        *) say "down: node $HOST is '${state:-unknown}'"; return 1 ;;
    esac
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
    command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
    command -v sinfo >/dev/null 2>&1 || missing+=(slurm-client)
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    (( ${#missing[@]} )) || return 0
    command -v apt-get >/dev/null 2>&1 || fail "cannot install ${missing[*]}: no apt-get here"
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq >/dev/null 2>&1 || say "apt-get update failed; trying the install anyway"
    timeout 600 apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
        || fail "apt-get install slurmctld slurmd slurm-client munge failed"
}

write_config() {
    local cpus
    cpus=$(nproc)
    if [[ -f "$CONF" ]] && ! grep -qxF "$MARK" "$CONF"; then
        fail "$CONF exists and was not written by this script; not replacing it (use that cluster, or move it away)"
    fi
    mkdir -p /etc/slurm "$DIR/ctld" "$DIR/d"
    cat > "$CONF.tmp" <<EOF
$MARK
ClusterName=icl-kernels
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=5
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerParameters=sched_interval=5
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if cmp -s "$CONF.tmp" "$CONF"; then rm -f "$CONF.tmp"; return 1; fi  # unchanged
    mv "$CONF.tmp" "$CONF"
    return 0
}

start_munge() {
    if timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then return 0; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    [[ -s /etc/munge/munge.key ]] || { timeout 30 mungekey -c >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge 2>/dev/null
    chmod 0400 /etc/munge/munge.key
    timeout 20 runuser -u munge -- munged >/dev/null 2>&1 || timeout 20 munged --force >/dev/null 2>&1
    for _ in $(seq 20); do
        if timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
            mkdir -p "$DIR" && cp /run/munge/munged.pid "$DIR/munged.pid" 2>/dev/null  # ours: `stop` ends it
            return 0
        fi
        sleep 0.5
    done
    fail "munged did not start (munge -n | unmunge fails)"
}

start() {
    local began changed=0
    began=$(date +%s)
    [[ $(id -u) == 0 ]] || fail "start needs root (apt-get, /etc/slurm, daemons)"
    install_packages
    write_config && changed=1
    start_munge
    if (( changed )); then  # a new config: daemons of this script restart with it
        stop_daemons quiet
    fi
    if ! alive slurmctld; then
        timeout 30 slurmctld -i >/dev/null 2>&1 || fail "slurmctld did not start (see $DIR/slurmctld.log)"
    fi
    for _ in $(seq 40); do timeout 5 scontrol ping >/dev/null 2>&1 && break; sleep 0.5; done
    if ! alive slurmd; then
        timeout 30 slurmd >/dev/null 2>&1 || fail "slurmd did not start (see $DIR/slurmd.log)"
    fi
    for _ in $(seq 60); do
        case "$(node_state)" in
            idle*|mix*|alloc*) break ;;
            down*|drain*) timeout 10 scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 ;;
        esac
        sleep 0.5
    done
    status || { tail -n 5 "$DIR/slurmctld.log" "$DIR/slurmd.log" 2>/dev/null; exit 1; }
    say "started in $(( $(date +%s) - began )) s"
}

stop_daemons() {  # stop_daemons [quiet]: SIGTERM the daemons in this script's pid files, wait for them
    local name pid
    local names=(slurmd slurmctld)
    [[ -n "${1:-}" ]] || names+=(munged)  # a restart for a new config keeps munged
    for name in "${names[@]}"; do
        pid=$(cat "$DIR/$name.pid" 2>/dev/null) || continue
        [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || continue
        kill "$pid" 2>/dev/null
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
        [[ -n "${1:-}" ]] || say "stopped $name ($pid)"
    done
}

case "${1:-}" in
    start) start ;;
    status) status ;;
    stop) stop_daemons ;;
    *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
