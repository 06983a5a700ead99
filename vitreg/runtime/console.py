"""One console per run: what rank 0 says, not one copy per process.

Every process of a DDP/FSDP run (and of a ``torchrun`` evaluation) runs the same code, so each info line
(probe results, "resuming from", "finished in") would appear once per rank in a SLURM log. The other
ranks keep vitreg's warnings and errors (a rank-specific problem must still be seen) and drop its info
lines.
"""

from __future__ import annotations

import logging

PACKAGE_LOGGER = "vitreg"


def global_rank() -> int:
    """This process's global rank as Lightning reads it from the launcher's environment (``RANK``,
    ``LOCAL_RANK``, ``SLURM_PROCID``...), before any process group exists; 0 when single-process."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def quiet_other_ranks(rank: int | None = None) -> None:
    """On a rank other than 0, raise vitreg's loggers to WARNING (their info lines are rank 0's to print).
    ``rank``: this process's global rank (default: ``global_rank()``)."""
    rank = global_rank() if rank is None else rank
    if rank != 0:
        logging.getLogger(PACKAGE_LOGGER).setLevel(logging.WARNING)
