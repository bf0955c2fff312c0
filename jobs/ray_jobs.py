"""The Ray Jobs API client: one driver job per pipeline on a running head (see ``pipeline.submit``
for why one driver, not one job per stage)."""
from __future__ import annotations

from pathlib import Path

from jobs.cluster import check_answers

# what the driver job's working directory leaves behind: environments, history, outputs
EXCLUDES = [".venv", ".git", "runs", "bench/results", "*.pt", "*.etz"]


def submit_driver(job_server: str, entrypoint: str, working_dir: Path, timeout_s: float = 30.0) -> str:
    """Submit ``entrypoint`` as one job with ``working_dir`` shipped to the head; returns its id.
    A Jobs API that does not answer within ``timeout_s`` is one line naming it."""
    from ray.job_submission import JobSubmissionClient

    check_answers(job_server, "ray.job_server", timeout_s)
    client = JobSubmissionClient(job_server)
    return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(working_dir))


def runtime_env(working_dir: Path) -> dict:
    return {"working_dir": str(working_dir), "excludes": EXCLUDES}


def job_state(job_server: str, job: str) -> str:
    """The job's state as the head reports it, or UNREACHABLE (why) when the head does not answer."""
    try:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(job_server).get_job_status(job))
    except Exception as e:  # the head may be gone: say so rather than fail the whole report
        return f"UNREACHABLE ({type(e).__name__})"
