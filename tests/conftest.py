import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def ray_instance():
    """One in-process Ray on loopback (2 one-CPU workers' room) for every module that runs stages
    on Ray Train workers; ``test_ray_jobs`` shuts it down before it starts a head of its own."""
    from elastictrain.config import build
    from jobs.cluster import ClusterConfig
    from jobs.ray_train import start_ray

    start_ray(build(ClusterConfig, {"name": "tests", "kind": "ray", "device": "cpu", "threads": 1,
                                    "ray": {"num_workers": 2, "cpus_per_worker": 1}}))  # loopback settings, then Ray
    import ray

    yield ray
    ray.shutdown()
