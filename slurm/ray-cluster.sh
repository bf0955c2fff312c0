# Ray across the allocation (the standard Ray-on-Slurm pattern): the head on the first node,
# one worker node per remaining node, all started with srun and stopped when the job ends.
# Sourced by a rendered stage script; expects PY, RAY_PORT, CPUS, GPUS. The head's dashboard binds
# to 127.0.0.1 unless DASHBOARD_HOST says otherwise.
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
export RAY_ADDRESS="$head_ip:$RAY_PORT"
srun --nodes=1 --ntasks=1 -w "$head" "$PY" -m ray.scripts.scripts start --head --node-ip-address="$head_ip" \
    --port="$RAY_PORT" --dashboard-host="${DASHBOARD_HOST:-127.0.0.1}" --num-cpus="$CPUS" --num-gpus="$GPUS" \
    --disable-usage-stats --block &
for _ in $(seq 60); do "$PY" -m ray.scripts.scripts status --address "$RAY_ADDRESS" >/dev/null 2>&1 && break; sleep 2; done
for node in "${nodes[@]:1}"; do
    srun --nodes=1 --ntasks=1 -w "$node" "$PY" -m ray.scripts.scripts start --address "$RAY_ADDRESS" \
        --num-cpus="$CPUS" --num-gpus="$GPUS" --disable-usage-stats --block &
done
want=${#nodes[@]}
for _ in $(seq 90); do
    up=$("$PY" -c "import ray; ray.init(address='$RAY_ADDRESS', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null || echo 0)
    [ "$up" -ge "$want" ] && break; sleep 2
done
echo "[elastictrain] Ray: $up of $want nodes up at $RAY_ADDRESS"
trap '"$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true' EXIT
