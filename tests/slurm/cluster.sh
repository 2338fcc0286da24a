#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the workflow's real-cluster test.
#
#   tests/slurm/cluster.sh install   # Debian's slurm-wlm and munge (root, package registry)
#   tests/slurm/cluster.sh start     # munged, slurmctld, slurmd; waits until the node is idle
#   tests/slurm/cluster.sh stop      # stops exactly the daemons `start` started
#
# Needs root and no systemd. State, logs, the munge key and socket live in $ICM_SLURM_STATE
# (default /tmp/icm-slurm) and the daemons use ports 16817/16818, so a real munge is left
# alone. The config must be /etc/slurm/slurm.conf (Snakemake's jobstep plugin drops
# SLURM_CONF inside jobs): `start` refuses to overwrite one it did not write, and `stop`
# removes its own. The node advertises four placeholder GPUs (/dev/null-like device files)
# so that jobs asking for --gpus can be scheduled; what runs in them sees no GPU.
set -euo pipefail

STATE=${ICM_SLURM_STATE:-/tmp/icm-slurm}
MUNGE=$STATE/munge
HOST=$(hostname -s)
CONF_DIR=/etc/slurm
MARK="# Written by tests/slurm/cluster.sh: a one-node test cluster."
export SLURM_CONF=$CONF_DIR/slurm.conf

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        return
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurm-wlm munge
}

write_config() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    if [ -e "$SLURM_CONF" ] && ! grep -qxF "$MARK" "$SLURM_CONF"; then
        echo "$SLURM_CONF exists and is not the test cluster's: not touching it" >&2
        exit 1
    fi
    mkdir -p "$STATE"/{spool,state,log} "$CONF_DIR"
    cat > "$SLURM_CONF" <<CONF
$MARK
ClusterName=icm-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
AuthInfo=socket=$MUNGE/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmdSpoolDir=$STATE/spool
StateSaveLocation=$STATE/state
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$HOST CPUs=$cpus RealMemory=$mem_mb Gres=gpu:4 State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP
CONF
    # Four placeholder GPUs: character devices like /dev/null (slurmd counts device files).
    mkdir -p "$STATE/dev"
    for i in 0 1 2 3; do
        [ -e "$STATE/dev/gpu$i" ] || mknod "$STATE/dev/gpu$i" c 1 3
    done
    printf '%s\nNodeName=%s Name=gpu File=%s/dev/gpu[0-3]\n' "$MARK" "$HOST" "$STATE" \
        > "$CONF_DIR/gres.conf"
}

start_munge() {
    mkdir -p "$MUNGE"
    if [ ! -s "$MUNGE/munge.key" ]; then
        dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
    fi
    chown -R munge:munge "$MUNGE"
    chmod 755 "$MUNGE" && chmod 400 "$MUNGE/munge.key"  # the socket must be reachable
    runuser -u munge -- /usr/sbin/munged --key-file="$MUNGE/munge.key" \
        --socket="$MUNGE/munge.socket" --pid-file="$MUNGE/munged.pid" \
        --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed"
    cp "$MUNGE/munged.pid" "$STATE/munged.pid"
}

start() {
    write_config
    start_munge
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 60); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -qx idle; then
            sinfo
            return
        fi
        sleep 1
    done
    echo "the test cluster did not come up; logs:" >&2
    tail -n 30 "$STATE"/log/*.log >&2
    exit 1
}

stop() {
    local pid
    for daemon in slurmd slurmctld munged; do
        if [ -s "$STATE/$daemon.pid" ]; then
            pid=$(cat "$STATE/$daemon.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            rm -f "$STATE/$daemon.pid"
        fi
    done
    for file in "$SLURM_CONF" "$CONF_DIR/gres.conf"; do
        if [ -e "$file" ] && grep -qxF "$MARK" "$file"; then rm -f "$file"; fi
    done
}

"${1:?usage: cluster.sh install|start|stop}"
