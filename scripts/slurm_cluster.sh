#!/usr/bin/env bash
# A one-node SLURM cluster on 127.0.0.1 for tests of slurm/: munged, slurmctld and slurmd, all of their
# files (config, key, state, logs, PID files) in DIR, and nothing written to /etc or /run.
#
#   scripts/slurm_cluster.sh start DIR   # then: export SLURM_CONF=DIR/slurm.conf
#   scripts/slurm_cluster.sh stop DIR    # cancels its jobs, stops the three daemons by their PID files
#
# The node has 2 CPUs and GRES gpu:2 backed by placeholder character devices (DIR/dev/nvidia[0-1]), so
# `--gpus-per-node=2` jobs run and see CUDA_VISIBLE_DEVICES=0,1 on a machine without GPUs.
# Needs the Debian packages slurmctld, slurmd, slurm-client and munge (scripts/setup.sh installs them),
# and root: slurmd starts job tasks as the submitting user. DIR's parents must be searchable by all
# (munged checks its socket's path), so make DIR with `mktemp -d` under /tmp rather than in a 0700 folder.
set -Eeuo pipefail
export PATH=$PATH:/usr/sbin

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}
[ $# -eq 2 ] || usage
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)

# A free TCP port on loopback, below the range slurm/train.sbatch takes MASTER_PORT from (20000-39999).
# bash's /dev/tcp connects only if something listens there.
free_port() {
    local port
    for _ in $(seq 100); do
        port=$((10000 + RANDOM % 10000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    echo "no free port found" >&2
    return 1
}

stop_pid_file() {
    local name=$1 pid_file=$2 pid
    [ -s "$pid_file" ] || return 0
    pid=$(cat "$pid_file")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$name (pid $pid) still running after 10 s: killing it" >&2
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pid_file"
}

stop() {
    # Jobs first: their tasks would outlive slurmd.
    if [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        export SLURM_CONF=$dir/slurm.conf
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs || true
            for _ in $(seq 300); do
                [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
                sleep 0.1
            done
        fi
    fi
    # slurmd first, so it does not keep trying to reach slurmctld; munged last, both need it.
    stop_pid_file slurmd "$dir/slurmd.pid"
    stop_pid_file slurmctld "$dir/slurmctld.pid"
    stop_pid_file munged "$dir/munge/munged.pid"
}

start() {
    for tool in munged slurmctld slurmd scontrol sbatch srun; do
        command -v "$tool" >/dev/null || {
            echo "$tool not found: install slurmctld slurmd slurm-client munge (scripts/setup.sh does)" >&2
            exit 1
        }
    done
    if [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        echo "a cluster is already running in $dir" >&2
        exit 1
    fi
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log" "$dir/dev"
    # munged checks that every directory on its socket's path is searchable by all, and that the key is
    # readable by its owner only.
    chmod 755 "$dir" "$dir/munge"
    # A key of this cluster's own (munge before 0.5.14 has no mungekey).
    [ -f "$dir/munge/munge.key" ] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$dir/munge/munge.key"
    for i in 0 1; do
        # Character devices (here /dev/null's numbers); slurmd rejects plain files as GRES devices.
        [ -c "$dir/dev/nvidia$i" ] || mknod "$dir/dev/nvidia$i" c 1 3
    done

    cat >"$dir/gres.conf" <<EOF
AutoDetect=off
Name=gpu File=$dir/dev/nvidia[0-1]
EOF
    cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm_cluster.sh: one node on 127.0.0.1, daemons listening on loopback only.
ClusterName=clip-pipe-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after cred_expire seconds (default 120).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Finished jobs stay visible to \`scontrol show job\` for an hour: there is no accounting database.
MinJobAge=3600
KillWait=10
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$dir/slurm.conf

    # On failure from here on, leave nothing running.
    trap 'stop' ERR
    munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    slurmctld
    slurmd -N localhost
    for _ in $(seq 100); do
        if [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = idle ]; then
            trap - ERR
            echo "SLURM cluster up: export SLURM_CONF=$SLURM_CONF"
            return
        fi
        sleep 0.1
    done
    echo "the SLURM node did not come up within 10 s; logs in $dir/log" >&2
    tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    stop
    exit 1
}

case $action in
start) start ;;
stop) stop ;;
*) usage ;;
esac
