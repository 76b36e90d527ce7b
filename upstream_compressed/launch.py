"""Where an experiment's runs execute: here (a pool of processes) or as Slurm jobs through submitit.

``experiment`` hands every compression and every downstream run to a launcher as one function call.
The local launcher calls it in this process (the run itself starts its own subprocesses); the
Slurm launcher submits it as its own job, waits for it, and returns its result, so the expdir layout,
the resumability (finished work is kept; a resubmitted run continues) and the report are the same.

A job runs on another machine: it gets that machine's environment (its CUDA_VISIBLE_DEVICES, paths)
plus only the variables the plan sets (threads, CORPUS, this tool's own), never a copy of ours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

LAUNCHERS = ("local", "slurm", "submitit-local")
FORWARDED_PREFIXES = ("UPSTREAM_COMPRESSED_", "LIBRISPEECH", "VOXCELEB1")


@dataclass(frozen=True)
class SlurmOptions:
    """Per job: Slurm partition, GPUs, time limit, memory and CPUs (submitit's names in brackets)."""

    partition: str | None = None  # slurm_partition
    gpus: int = 1  # gpus_per_node
    time_min: int = 240  # timeout_min
    mem_gb: int = 32  # mem_gb
    cpus: int = 8  # cpus_per_task
    folder: str | None = None  # where submitit keeps job scripts and logs (<job id>_*); default EXPDIR/slurm

    def parameters(self, name: str) -> dict[str, Any]:
        parameters: dict[str, Any] = {"name": name, "timeout_min": self.time_min, "mem_gb": self.mem_gb,
                                      "cpus_per_task": self.cpus, "gpus_per_node": self.gpus}
        if self.partition:
            parameters["slurm_partition"] = self.partition
        return parameters


def job_environment(overrides: dict[str, str]) -> dict[str, str]:
    """The variables a job takes from the submitting side: the plan's overrides and this tool's own."""
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}
    return {**forwarded, **overrides}


def _run_with_node_environment(function: Callable[..., Any], overrides: dict[str, str], args: tuple,
                               kwargs: dict[str, Any]) -> Any:
    """In the job: ``function(*args, env=<this machine's environment + overrides>, **kwargs)``."""
    return function(*args, env={**os.environ, **overrides}, **kwargs)


class Launcher:
    """Runs ``function(*args, env=..., **kwargs)`` here: the environment is ours plus the overrides."""

    name = "local"

    def __init__(self, overrides: dict[str, str]) -> None:
        self.overrides = overrides

    def concurrent(self, jobs: int) -> int:
        return max(1, jobs)

    def call(self, name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return _run_with_node_environment(function, self.overrides, args, kwargs)


class SubmititLauncher(Launcher):
    """Each call is one submitit job (Slurm, or submitit's local executor for a try without a cluster)."""

    def __init__(self, overrides: dict[str, str], expdir: Path, options: SlurmOptions, cluster: str | None) -> None:
        super().__init__(overrides)
        try:
            import submitit
        except ImportError as error:  # pragma: no cover - submitit is a dependency
            raise RuntimeError("--launcher slurm needs submitit: pip install submitit") from error
        self.submitit, self.options, self.cluster = submitit, options, cluster
        self.folder = Path(options.folder) if options.folder else expdir / "slurm"
        self.name = "slurm" if cluster is None else f"submitit-{cluster}"

    def concurrent(self, jobs: int) -> int:
        return 1 << 10  # the scheduler queues them; each waiting thread only polls its job

    def call(self, name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        executor = self.submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        executor.update_parameters(**self.options.parameters(name))
        job = executor.submit(_run_with_node_environment, function, job_environment(self.overrides), args, kwargs)
        try:
            return job.result()
        except self.submitit.core.utils.FailedJobError as error:
            raise RuntimeError(f"{self.name} job {job.job_id} ({name}) failed; its logs: "
                               f"{self.folder}/{job.job_id}_*\n{str(error)[-1500:]}") from error


def make_launcher(kind: str, overrides: dict[str, str], expdir: Path, options: SlurmOptions | None = None) -> Launcher:
    if kind == "local":
        return Launcher(overrides)
    if kind in ("slurm", "submitit-local"):
        return SubmititLauncher(overrides, expdir, options or SlurmOptions(), None if kind == "slurm" else "local")
    raise ValueError(f"launcher {kind!r} is not one of {LAUNCHERS}")
