#!/usr/bin/env bash
# A throw-away one-node SLURM cluster for the tests (Debian's slurmctld, slurmd, slurm-client, munge).
#
#   scripts/slurm_test_cluster.sh install        # apt-get install the packages if missing (needs root)
#   scripts/slurm_test_cluster.sh start DIR      # write DIR/slurm.conf, start munged + slurmctld + slurmd
#   scripts/slurm_test_cluster.sh stop DIR       # stop exactly the daemons that `start DIR` started (by pid)
#   scripts/slurm_test_cluster.sh env DIR        # print `export SLURM_CONF=...` for this cluster
#
# Everything (config, munge key and socket, state, spool, logs, pid files) lives in DIR; no system file is
# touched and no system service is started. Clients find the cluster through SLURM_CONF=DIR/slurm.conf
# (jobs inherit it). Exit status 77 means "cannot run here" (not root, no packages, no apt): callers skip.
set -euo pipefail

SKIP=77
PKGS=(slurmctld slurmd slurm-client munge)
BINS=(munged slurmctld slurmd sbatch squeue scontrol)

die() { echo "slurm_test_cluster: $*" >&2; exit 1; }
skip() { echo "slurm_test_cluster: SKIP: $*" >&2; exit $SKIP; }

have_bins() {
    local b
    for b in "${BINS[@]}"; do
        command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || return 1
    done
}

cmd_install() {
    export PATH="$PATH:/usr/sbin:/sbin"
    if have_bins; then
        echo "slurm_test_cluster: ${PKGS[*]} already installed"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || skip "SLURM packages missing and not root: cannot apt-get install ${PKGS[*]}"
    command -v apt-get >/dev/null 2>&1 || skip "SLURM packages missing and no apt-get (not Debian/Ubuntu)"
    echo "slurm_test_cluster: installing ${PKGS[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d 101: the packages' post-install scripts must not start system daemons
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
    fi
    local ok=0
    if apt-get install -y --no-install-recommends "${PKGS[@]}" >/tmp/slurm_test_cluster_apt.log 2>&1; then
        ok=1
    elif apt-get update >>/tmp/slurm_test_cluster_apt.log 2>&1 &&
        apt-get install -y --no-install-recommends "${PKGS[@]}" >>/tmp/slurm_test_cluster_apt.log 2>&1; then
        ok=1
    fi
    [[ $created_policy -eq 1 ]] && rm -f "$policy"
    [[ $ok -eq 1 ]] || skip "apt-get install ${PKGS[*]} failed (see /tmp/slurm_test_cluster_apt.log)"
    have_bins || skip "installed ${PKGS[*]} but the binaries are not found"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local t=$1 what=$2
    shift 2
    local i
    for ((i = 0; i < t * 10; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    return 1
}

cmd_start() {
    local dir=${1:?usage: start DIR}
    export PATH="$PATH:/usr/sbin:/sbin"
    [[ $(id -u) -eq 0 ]] || skip "not root: slurmd and munged must run as root here"
    have_bins || skip "SLURM packages missing: run '$0 install' (as root)"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [[ ! -e $dir/pids ]] || die "$dir already holds a cluster (stop it first: $0 stop $dir)"
    chmod 700 "$dir"
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
    chmod 700 "$dir/munge"
    : >"$dir/pids"

    # munge: private key and socket
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    local sock=$dir/munge/munge.socket
    munged --foreground --force --socket="$sock" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed" >>"$dir/log/munged.out" 2>&1 &
    echo "munged $!" >>"$dir/pids"
    wait_for 20 munge test -S "$sock" || { cat "$dir/log/munged.log" >&2 || true; die "munged did not start"; }

    # slurm.conf: one node = this machine, as slurmd -C sees it
    local node cpus sockets cores threads mem
    node=$(hostname -s)
    read -r cpus sockets cores threads mem < <(slurmd -C | awk '
        /^NodeName/ { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } }
        END { print v["CPUs"], v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"] }')
    mem=$((mem / 2))
    cat >"$dir/slurm.conf" <<EOF
# one-node test cluster written by scripts/slurm_test_cluster.sh
ClusterName=cortextest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock,cred_expire=10   # a requeued job may restart after 10 s (default 120)
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=kill_invalid_depend,sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MaxArraySize=1001
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$dir/slurm.conf

    slurmctld -D -i -f "$dir/slurm.conf" >>"$dir/log/slurmctld.out" 2>&1 &
    echo "slurmctld $!" >>"$dir/pids"
    wait_for 30 slurmctld scontrol ping ||
        { tail -20 "$dir/log/slurmctld.log" >&2 || true; die "slurmctld did not answer"; }
    slurmd -D -f "$dir/slurm.conf" -N "$node" >>"$dir/log/slurmd.out" 2>&1 &
    echo "slurmd $!" >>"$dir/pids"
    wait_for 60 slurmd bash -c "sinfo -h -N -o '%T' | grep -Eq '^(idle|mixed|allocated)'" || {
        sinfo -N -l >&2 || true
        tail -20 "$dir/log/slurmd.log" >&2 || true
        die "the node did not come up"
    }
    echo "slurm_test_cluster: running in $dir (node $node, $cpus CPUs); export SLURM_CONF=$dir/slurm.conf"
}

cmd_stop() {
    local dir=${1:?usage: stop DIR}
    [[ -f $dir/pids ]] || { echo "slurm_test_cluster: nothing started in $dir"; return 0; }
    export SLURM_CONF=$dir/slurm.conf
    # the jobs of this cluster (their processes belong to slurmd's steps), then the daemons, newest first
    if [[ -f $dir/slurm.conf ]] && command -v scancel >/dev/null 2>&1; then
        timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
    fi
    local name pid
    tac "$dir/pids" | while read -r name pid; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            if kill -0 "$pid" 2>/dev/null; then
                echo "slurm_test_cluster: $name ($pid) ignored SIGTERM; SIGKILL" >&2
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
    done
    mv "$dir/pids" "$dir/pids.stopped"
    echo "slurm_test_cluster: stopped the daemons of $dir"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start "${2:-}" ;;
    stop) cmd_stop "${2:-}" ;;
    env) echo "export SLURM_CONF=$(cd "${2:?usage: env DIR}" && pwd)/slurm.conf" ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
esac
