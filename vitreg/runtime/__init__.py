"""Running jobs on one machine or a SLURM cluster: run and report directories, process groups, preemption,
one console per run and the summary of a sweep. Import from the modules themselves."""
