"""Running on clusters: deterministic run directories and preemption handling (SLURM)."""

from vitreg.runtime.run_dir import register_resolvers, resolve_run_dir, shorten_overrides, slurm_array_ids
from vitreg.runtime.signals import PreemptionHandler, parse_signal, requeue_job_id, scontrol_requeue, slurm_plugins

__all__ = [
    "PreemptionHandler",
    "parse_signal",
    "register_resolvers",
    "requeue_job_id",
    "resolve_run_dir",
    "scontrol_requeue",
    "shorten_overrides",
    "slurm_array_ids",
    "slurm_plugins",
]
