# Ray across the allocation (the standard Ray-on-Slurm pattern): the head on the first node,
# one worker node per remaining node, each a `ray start --block` in a job step of its own (srun,
# in the background); exports RAY_ADDRESS (the stage's inner cluster config says `address: auto`,
# which Ray resolves from it) and stops those steps, and so the Ray it started, when the job
# script exits. Sourced by a rendered stage script; expects PY, RAY_PORT, CPUS, GPUS. The head's
# dashboard binds to 127.0.0.1 unless DASHBOARD_HOST says otherwise.
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
export RAY_ADDRESS="$head_ip:$RAY_PORT"
# SIGTERM makes a node's `ray start --block` stop its processes at once, not drain them first
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
ray_steps=()
ray_stop() {
    # Not `ray stop`: it finds Ray's processes by name on the whole machine and kills other jobs'
    # (and other users') Ray too. Each step's `ray start --block` owns its node's Ray processes,
    # which die with it (Ray's fate sharing); srun, signalled, kills its step's tasks.
    [ ${#ray_steps[@]} -gt 0 ] || return 0
    echo "[elastictrain] stopping Ray (its job steps end as CANCELLED / Killed below)"
    kill -TERM "${ray_steps[@]}" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "${ray_steps[@]}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${ray_steps[@]}" 2>/dev/null || true
    wait "${ray_steps[@]}" 2>/dev/null || true
}
trap ray_stop EXIT
# --cpus-per-task: since Slurm 22.05 srun no longer inherits the job's --cpus-per-task, and a step of
# one CPU would confine the node's Ray workers (task/affinity, task/cgroup) to that CPU; --overlap:
# these steps last the whole job and must not keep other steps (the `srun hostname` above, a
# user's srun) waiting for the node's CPUs.
srun --nodes=1 --ntasks=1 --cpus-per-task="$CPUS" --overlap -w "$head" \
    "$PY" -m ray.scripts.scripts start --head --node-ip-address="$head_ip" \
    --port="$RAY_PORT" --dashboard-host="${DASHBOARD_HOST:-127.0.0.1}" --num-cpus="$CPUS" --num-gpus="$GPUS" \
    --disable-usage-stats --block &
ray_steps+=($!)
ray_alive() { local p; for p in "${ray_steps[@]}"; do kill -0 "$p" 2>/dev/null || return 1; done; }
for _ in $(seq 120); do  # (a step that ended has failed: stop waiting)
    ray_alive || break
    "$PY" -m ray.scripts.scripts status --address "$RAY_ADDRESS" >/dev/null 2>&1 && break; sleep 1
done
for node in "${nodes[@]:1}"; do
    srun --nodes=1 --ntasks=1 --cpus-per-task="$CPUS" --overlap -w "$node" \
        "$PY" -m ray.scripts.scripts start --address "$RAY_ADDRESS" \
        --num-cpus="$CPUS" --num-gpus="$GPUS" --disable-usage-stats --block &
    ray_steps+=($!)
done
want=${#nodes[@]} up=0
for _ in $(seq 180); do
    ray_alive || break
    up=$("$PY" -c "import ray; ray.init(address='$RAY_ADDRESS', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null || echo 0)
    [ "$up" -ge "$want" ] && break; sleep 1
done
echo "[elastictrain] Ray: $up of $want nodes up at $RAY_ADDRESS"
# the stage would otherwise wait for workers on nodes that never joined
[ "$up" -ge "$want" ] || { echo "[elastictrain] Ray did not come up on every node of the allocation" >&2; exit 1; }
