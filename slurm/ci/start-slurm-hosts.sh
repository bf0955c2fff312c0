#!/usr/bin/env bash
# A two-node (or n-node) Slurm cluster whose compute nodes are network namespaces, for the
# multi-node tests (tests/test_slurm_hosts.py makes the namespaces with tests/hosts.py first):
#   start-slurm-hosts.sh CONTROLLER_ADDR NODE=ADDR [NODE=ADDR ...]
# e.g. start-slurm-hosts.sh 10.213.7.1 et-h0=10.213.7.10 et-h1=10.213.7.11
# slurmctld runs here (the root namespace, reached by the nodes at CONTROLLER_ADDR over the
# bridge), one slurmd per namespace NODE (slurmd -N NODE, inside it). Everything has its own
# config, SLURM_CONF=$SLURM_HOSTS_DIR/slurm.conf (clients need it too), its own ports, state,
# spool, logs and pid files, so it runs beside the one-node cluster of start-slurm.sh, whose
# /etc/slurm/slurm.conf it leaves alone. munge is shared (one key, one socket on the shared
# filesystem). Starts clean: whatever an earlier run left is stopped first (stop-slurm-hosts.sh).
# Env: SLURM_HOSTS_DIR (default /tmp/slurm-hosts), SLURM_HOSTS_TIMEOUT (default 60 s).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${SLURM_HOSTS_DIR:-/tmp/slurm-hosts}; TIMEOUT=${SLURM_HOSTS_TIMEOUT:-60}
log() { echo "[start-slurm-hosts] $*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "must run as root"; exit 1; }
[ $# -ge 2 ] || { log "usage: $0 CONTROLLER_ADDR NODE=ADDR [NODE=ADDR ...]"; exit 2; }
CTL=$1; shift

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
   ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge; mungekey --create --force
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi

SLURM_HOSTS_DIR=$DIR bash "$HERE/stop-slurm-hosts.sh" --purge   # a clean start
mkdir -p "$DIR"/{state,spool,log,run}
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"   # (stop-slurm-hosts.sh stops it again: the marker says it was ours)
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null
  touch "$DIR/run/munged.ours"
fi

names=(); lines=""
for spec in "$@"; do
  name=${spec%%=*}; addr=${spec#*=}
  ip netns list | grep -qw "^$name" || { log "no network namespace $name (tests/hosts.py makes them)"; exit 1; }
  names+=("$name")
  lines+="NodeName=$name NodeAddr=$addr CPUs=1 RealMemory=4096 State=UNKNOWN"$'\n'
done
export SLURM_CONF=$DIR/slurm.conf
# CPUs=1 per node although the machine has more (config_overrides: slurmd reports what is
# configured, not the hardware it shares with the other nodes); %n: one file per node's slurmd.
cat > "$SLURM_CONF" <<EOF
ClusterName=hosts
SlurmctldHost=$(hostname -s)($CTL)
SlurmUser=root
AuthType=auth/munge
SlurmctldPort=6827
SlurmdPort=6818
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=10
MailProg=/bin/true
${lines}PartitionName=hosts Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP
EOF

log "starting slurmctld"
slurmctld
for _ in $(seq $((TIMEOUT * 5))); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
# `ip netns exec` gives the command a mount namespace with a fresh /sys, without the cgroup
# filesystems under /sys/fs/cgroup, and slurmd (22.05) refuses to start without them even with
# proctrack/linuxproc: mount the same hierarchies there again (this machine's, as listed here).
cgroups=$(awk '$2 ~ "^/sys/fs/cgroup" {printf "mkdir -p %s && mount -t %s -o %s %s %s && ", $2, $3, $4, $1, $2}' /proc/self/mounts)
for name in "${names[@]}"; do
  log "starting slurmd $name (in its namespace)"
  mkdir -p "$DIR/spool/$name"
  ip netns exec "$name" sh -c "$cgroups exec env SLURM_CONF='$SLURM_CONF' slurmd -N '$name'"
done

end=$(( $(date +%s) + TIMEOUT ))
while :; do
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null || true)
  idle=$(awk '$2 == "idle"' <<<"$states" | wc -l)
  [ "$idle" -eq ${#names[@]} ] && break
  for name in $(awk '$2 ~ /^(down|drain|fail)/ {print $1}' <<<"$states"); do
    scontrol update nodename="$name" state=resume 2>/dev/null || true
  done
  if [ "$(date +%s)" -ge "$end" ]; then
    log "nodes not idle after ${TIMEOUT}s: $(tr '\n' ' ' <<<"$states")"
    tail -n 20 "$DIR"/log/*.log >&2 || true; exit 1
  fi
  sleep 0.2
done
log "up: ${names[*]} idle; SLURM_CONF=$SLURM_CONF, logs in $DIR/log"
