"""``elastictrain submit`` / ``status``: a pipeline's stages as cluster jobs, recorded in the run
directory (``RUN_DIR/submit/jobs.json``) so ``status`` can show them and a resubmission skips
what finished.

- Slurm: one job per unfinished stage, each ``afterok`` the previous one (see ``jobs.slurm``).
- Ray (a running head's Jobs API): **one driver job** running ``elastictrain run`` over all stages,
  not one job per stage. The driver already runs stages in order, stops at the first failure and
  skips finished ones on a rerun; as a cluster-side job it survives the submitting shell (a
  per-stage chain would need this process to stay up and wait). ``status`` reads per-stage
  progress from the run directory and the driver's state from the Jobs API.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

from elastictrain.config import ConfigError
from elastictrain.files import write_json
from jobs import ray_jobs
from jobs.cluster import ClusterConfig, check_answers, load_cluster

from .config import read_pipeline, snapshot_pipeline
from .runner import preflight
from .stage import is_finished

ROOT = Path(__file__).resolve().parents[1]


def _finished(run_dir: Path, stage: str) -> bool:
    return is_finished(run_dir / stage / "checkpoint.pt")  # (a checkpoint carrying code is refused)


def _record(run_dir: Path) -> dict:
    path = run_dir / "submit" / "jobs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# scheduler states of a job that has not ended (Slurm's and the Ray Jobs API's)
LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
        "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


def live_jobs(record: dict) -> dict[str, tuple[str, str]]:
    """{stage (or "driver"): (job id, state)} of the recorded jobs the scheduler still has queued or
    running; a ConfigError when it cannot be asked (no ``squeue``, a head that does not answer)."""
    jobs = record.get("jobs", {})
    if not jobs:
        return {}
    if record.get("kind") == "slurm":
        from jobs.slurm import job_states

        states = job_states([j["id"] for j in jobs.values()])
    else:
        states = {j["id"]: _ray_state(record, j["id"]) for j in jobs.values()}
    return {k: (j["id"], states[j["id"]]) for k, j in jobs.items() if states.get(j["id"]) in LIVE}


def submit(pipeline_path: str | Path, cluster_path: str | Path, out: Optional[str] = None, dry_run: bool = False,
           log=print, overrides: Sequence[str] = (), force: bool = False) -> dict:
    """Submit every unfinished stage; returns (and records) {stage: job id}. The jobs run the
    snapshot ``RUN_DIR/submit/pipeline.yaml`` (``overrides`` applied, spec paths absolute).

    Refused while jobs recorded for this run directory are still queued or running (a second
    chain would race the first on the same stages), unless ``force``. Each job is recorded in
    ``RUN_DIR/submit/jobs.json`` as soon as the scheduler took it, so a failure half-way through a
    chain leaves no queued job unrecorded."""
    source = read_pipeline(Path(pipeline_path).resolve(), overrides)
    cfg = source.cfg
    cluster = load_cluster(cluster_path)
    if cluster.kind == "single" or (cluster.kind == "ray" and not cluster.ray.job_server):
        raise ConfigError(f"cluster {cluster.name!r}: submit needs kind: slurm, or kind: ray with ray.job_server "
                          "(use `elastictrain run` to run here)")
    if cluster.kind == "slurm" and cfg.data.batch_size % (cluster.slurm.nodes * cluster.slurm.ranks_per_node):
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} (the global batch) does not divide over the "
                          f"{cluster.slurm.nodes * cluster.slurm.ranks_per_node} ranks of cluster {cluster.name!r}")
    run_dir = (Path(out) if out else Path(cluster.storage) / cfg.name).resolve()
    preflight(cfg, cluster, run_dir, log=log, submitting=True)  # what `run` checks first, before anything is queued
    if cluster.kind == "ray" and not dry_run:  # a Jobs API that does not answer: one line, nothing written
        check_answers(cluster.ray.job_server, f"cluster {cluster.name!r}: ray.job_server",
                      cluster.ray.connect_timeout_s)
    pending = [s.name for s in cfg.stages if not _finished(run_dir, s.name)]
    if not pending:
        log(f"{run_dir}: every stage has finished; nothing to submit")
        return {}
    if not force:  # (nothing is queued when every stage has finished, so only now)
        live = live_jobs(_record(run_dir))
        if live:
            raise ConfigError(f"{run_dir}: jobs of this run are still queued or running ("
                              + ", ".join(f"{k}: {i} {st}" for k, (i, st) in live.items())
                              + "); wait for them, cancel them, or pass --force")
    done = [s.name for s in cfg.stages if s.name not in pending]
    if done:
        log(f"finished earlier, not resubmitted: {', '.join(done)}")
    pipeline_path = run_dir / "submit" / "pipeline.yaml"
    record = _record(run_dir)
    if not dry_run:
        snapshot_pipeline(source, pipeline_path)
        record.update(pipeline=str(source.path), overrides=list(overrides),
                      cluster=str(Path(cluster_path).resolve()), kind=cluster.kind,
                      stages=[s.name for s in cfg.stages])
        write_json(record, run_dir / "submit" / "jobs.json")

    def queued(key: str, job: str) -> None:  # recorded at once: a later sbatch may fail
        record.setdefault("jobs", {})[key] = {"id": job, "submitted": time.time()}
        write_json(record, run_dir / "submit" / "jobs.json")

    if cluster.kind == "slurm":
        return _submit_slurm(cfg.name, pipeline_path, cluster, run_dir, pending, dry_run, log, queued)
    return _submit_ray(pipeline_path, Path(cluster_path).resolve(), cluster, run_dir, dry_run, log, queued)


def _submit_slurm(name: str, pipeline: Path, cluster: ClusterConfig, run_dir: Path, stages: list[str],
                  dry_run: bool, log, queued) -> dict:
    from jobs.slurm import inner_cluster, render, sbatch

    sub = run_dir / "submit"
    inner = sub / "cluster.yaml"
    scripts = {s: render(cluster, pipeline, run_dir, s, name, inner) for s in stages}
    if dry_run:
        log(f"# {inner}\n" + yaml.safe_dump(inner_cluster(cluster, run_dir), sort_keys=False))
        for s, text in scripts.items():
            log(f"# {sub / (s + '.sbatch')}  (afterok the previous stage)\n{text}")
        return {}
    sub.mkdir(parents=True, exist_ok=True)
    inner.write_text(yaml.safe_dump(inner_cluster(cluster, run_dir), sort_keys=False))
    jobs, after = {}, None
    for s, text in scripts.items():
        path = sub / f"{s}.sbatch"
        path.write_text(text)
        after = jobs[s] = sbatch(path, after)
        queued(s, after)
        log(f"[{s}] submitted: Slurm job {after}" + (f" (afterok {list(jobs.values())[-2]})" if len(jobs) > 1 else ""))
    return jobs


def _submit_ray(pipeline: Path, cluster_path: Path, cluster: ClusterConfig, run_dir: Path, dry_run: bool, log,
                queued) -> dict:
    workdir = Path(cluster.ray.working_dir or ROOT).resolve()
    entry = f"{cluster.ray.python} -m pipeline.cli run {pipeline} --cluster {cluster_path} --out {run_dir}"
    if dry_run:
        log(f"# Ray Jobs API at {cluster.ray.job_server}: one driver job\nentrypoint: {entry}\n"
            f"runtime_env: {ray_jobs.runtime_env(workdir)}")
        return {}
    job = ray_jobs.submit_driver(cluster.ray.job_server, entry, workdir, cluster.ray.connect_timeout_s)
    queued("driver", job)
    log(f"submitted: Ray job {job} at {cluster.ray.job_server} (all stages, in order)")
    return {"driver": job}


def status(run_dir: str | Path, log=print) -> list[dict]:
    """Each stage's state: finished (its checkpoint), else what the scheduler says of its job."""
    run_dir = Path(run_dir).resolve()
    record = _record(run_dir)
    if not record:
        raise ConfigError(f"{run_dir}: no submission recorded here (submit/jobs.json missing)")
    jobs = record.get("jobs", {})
    scheduler: dict[str, str] = {}
    if record.get("kind") == "slurm":
        from jobs.slurm import job_states

        scheduler = job_states([j["id"] for j in jobs.values()])
    elif "driver" in jobs:
        scheduler = {jobs["driver"]["id"]: _ray_state(record, jobs["driver"]["id"])}
    rows = []
    for stage in record.get("stages", []):
        job = (jobs.get(stage) or jobs.get("driver") or {}).get("id")
        state = "FINISHED" if _finished(run_dir, stage) else scheduler.get(job, "UNKNOWN" if job else "NOT SUBMITTED")
        rows.append({"stage": stage, "job": job, "state": state})
        log(f"{stage:<24}{job or '-':<14}{state}")
    return rows


def _ray_state(record: dict, job: str) -> str:
    try:
        cluster = load_cluster(record["cluster"])
    except ConfigError as e:  # the cluster file moved: say so rather than fail the whole report
        return f"UNKNOWN ({e})"
    return ray_jobs.job_state(cluster.ray.job_server, job)
