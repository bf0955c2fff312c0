#!/usr/bin/env bash
# ElasticTrain's test harness (from the verified reference in shared/reference/slurm-local):
# install, configure and start a one-node Slurm cluster on loopback; wait until
# the node is idle. Idempotent (a rerun on a healthy cluster only re-checks).
# Env: SLURM_CI_DIR (default /tmp/slurm-ci), SLURM_CI_CPUS / SLURM_CI_MEM_MB
# (advertise a bigger fake node), SLURM_CI_TIMEOUT (default 60 s).
set -euo pipefail
DIR=${SLURM_CI_DIR:-/tmp/slurm-ci}; TIMEOUT=${SLURM_CI_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
log() { echo "[start-slurm] $*" >&2; }
alive() { local p; p=$(cat "$1" 2>/dev/null) && [ "$(cat /proc/$p/comm 2>/dev/null)" = "$2" ]; }
[ "$(id -u)" -eq 0 ] || { log "must run as root"; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
   ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi

if [ ! -s /etc/munge/munge.key ]; then   # the munge package usually creates it
  mkdir -p /etc/munge; mungekey --create --force
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null
fi

mkdir -p "$DIR"/{state,spool,log,run,bin}
HOST=$(hostname -s)
read -r HWCPU HWMEM < <(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*RealMemory=\([0-9]*\).*/\1 \2/p')
CPUS=${SLURM_CI_CPUS:-$HWCPU}; MEM=${SLURM_CI_MEM_MB:-$HWMEM}; OVR=""
[ "$CPUS/$MEM" = "$HWCPU/$HWMEM" ] || OVR="SlurmdParameters=config_overrides"
NEW="ClusterName=ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
SlurmctldPort=6817
SlurmdPort=6818
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
EnforcePartLimits=ALL
MinJobAge=3600
MailProg=/bin/true
$OVR
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
NodeName=et-gpu[1-2] NodeAddr=127.0.0.1 CPUs=64 RealMemory=491520 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=et-gpu[1-2] MaxTime=INFINITE State=UP"
# two never-started GPU nodes (2 × 8 GPUs, 64 CPUs): `sbatch --test-only -p gpu` checks a
# multi-node GPU job script against a real controller without running it
printf 'NodeName=et-gpu[1-2] Name=gpu Count=8\n' > /etc/slurm/gres.conf
if [ "$(cat "$CONF" 2>/dev/null)" != "$NEW" ]; then
  printf '%s\n' "$NEW" > "$CONF"
  for d in slurmd slurmctld; do   # restart running daemons on a config change
    if alive "$DIR/run/$d.pid" $d; then
      p=$(cat "$DIR/run/$d.pid"); log "config changed: stopping $d ($p)"; kill "$p"
      while [ -d /proc/$p ]; do sleep 0.1; done
    fi
  done
fi

# sacct stand-in for tools such as submitit (no slurmdbd): put $DIR/bin on PATH
cat > "$DIR/bin/sacct" <<'EOF'
#!/bin/sh
ids=""; while [ $# -gt 0 ]; do [ "$1" = "-j" ] && { ids="$ids${ids:+,}$2"; shift; }; shift; done
echo "JobID|State|NodeList"
[ -n "$ids" ] && squeue -h --states=all -j "$ids" -o '%i|%T|%N' 2>/dev/null
exit 0
EOF
chmod +x "$DIR/bin/sacct"

alive "$DIR/run/slurmctld.pid" slurmctld || { log "starting slurmctld"; slurmctld; }
for _ in $(seq $((TIMEOUT * 5))); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
alive "$DIR/run/slurmd.pid" slurmd || { log "starting slurmd"; slurmd -N "$HOST"; }

end=$(( $(date +%s) + TIMEOUT ))
while :; do
  st=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1 || true)
  case "$st" in
    idle|mix|alloc) break ;;
    down*|drain*|fail*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
  esac
  if [ "$(date +%s)" -ge "$end" ]; then
    log "node not idle after ${TIMEOUT}s (state '$st')"
    tail -n 20 "$DIR"/log/slurm*.log >&2 || true; exit 1
  fi
  sleep 0.2
done
log "up: node $HOST state=$st CPUs=$CPUS RealMemory=$MEM logs=$DIR/log"
