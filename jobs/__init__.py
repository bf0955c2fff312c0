"""Launchers and engines: what a stage runs on beyond one process.

``cluster`` (the typed cluster configs these read), ``deepspeed_engine`` (a DeepSpeed engine per
rank, its JSON config, master-weight re-masking, ZeRO-3 slices), ``backend`` (a DeepSpeed rank as
the library's ``train.Backend``), ``ray_train`` (a stage on Ray Train workers), ``slurm`` (one
sbatch job per stage, chained) and ``ray_jobs`` (the Ray Jobs API client). Imports the library,
never ``pipeline``: the stage a worker runs is passed in by the launcher.
"""
