#!/usr/bin/env bash
# Stop what start-slurm-hosts.sh started, by the PIDs in its pid files (never by name): its jobs
# (scancel by id), each node's slurmd, slurmctld, and munged when it was the one that started it.
# --purge also removes $SLURM_HOSTS_DIR. The namespaces themselves are the caller's (tests/hosts.py).
set -uo pipefail
DIR=${SLURM_HOSTS_DIR:-/tmp/slurm-hosts}
export SLURM_CONF=$DIR/slurm.conf
log() { echo "[stop-slurm-hosts] $*" >&2; }
source "$(dirname "$0")/pidfile.sh"
if [ -f "$SLURM_CONF" ] && command -v scontrol >/dev/null && timeout 10 scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    log "cancelling jobs" $jobs; scancel $jobs
    for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
for f in "$DIR"/run/slurmd-*.pid; do [ -e "$f" ] && stop "$f" slurmd; done
stop "$DIR/run/slurmctld.pid" slurmctld
if [ -e "$DIR/run/munged.ours" ]; then stop /run/munge/munged.pid munged; rm -f "$DIR/run/munged.ours"; fi
if [ "${1:-}" = "--purge" ]; then rm -rf "$DIR"; fi
exit 0
