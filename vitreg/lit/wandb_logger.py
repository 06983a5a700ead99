"""Weights & Biases as a first-class logger (``logger=wandb``).

* ``resolve_wandb_mode``: ``mode=auto`` goes online only when credentials exist and the server
  answers, so a run never waits on a network it does not have; offline runs upload later with
  ``wandb sync``.
* ``wandb_run_id``: the run id lives in ``<run_dir>/wandb_id.txt``, so a requeued or resumed job
  continues the same W&B run.
* ``build_wandb_logger``: name, group and tags derived from the run directory and the config.
* ``wandb_loggers`` / ``log_wandb_media``: histograms and images from callbacks, on the same
  x-axis (``trainer/global_step``) as Lightning's scalars.
* ``send_wandb_alert``: a W&B alert (e-mail / Slack per the user's W&B settings) from a callback.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vitreg.utils.io import current_umask

log = logging.getLogger(__name__)

ID_FILE = "wandb_id.txt"
DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 3.0
# The x-axis Lightning's WandbLogger defines (define_metric) and puts into every log call.
STEP_KEY = "trainer/global_step"


# --------------------------------------------------------------------------------------- mode
def tcp_reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to host:port opens within ``timeout`` seconds, DNS included.

    The probe runs in a daemon thread: ``create_connection``'s timeout does not cover name
    resolution, which can stall far longer on a machine without network.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    return parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)


def _probe_target(base_url: str, env: Mapping[str, str]) -> tuple[str, int]:
    """Where a connection to the W&B server goes first: the proxy when one is set."""
    host, port = _host_port(base_url)
    no_proxy = [h.strip().lstrip(".") for h in env.get("NO_PROXY", env.get("no_proxy", "")).split(",") if h.strip()]
    if not any(host == h or host.endswith(f".{h}") for h in no_proxy):
        keys = ("HTTP_PROXY", "http_proxy") if port == 80 else ("HTTPS_PROXY", "https_proxy")
        proxy = next((env[k] for k in keys if env.get(k)), None)
        if proxy:
            return _host_port(proxy)
    return host, port


def _netrc_has(host: str, env: Mapping[str, str]) -> bool:
    path = env.get("NETRC") or str(Path(env.get("HOME") or Path.home()) / ".netrc")
    if not Path(path).is_file():
        return False
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError) as err:
        log.warning("W&B: cannot read %s (%s); treating it as holding no credentials", path, err)
        return False
    return bool(entry and entry[2])


def resolve_wandb_mode(
    requested: str,
    env: Mapping[str, str],
    reachable: Callable[[str, int], bool] = tcp_reachable,
) -> tuple[str, str]:
    """The mode to pass to ``wandb.init`` and why. Only ``auto`` is decided here.

    ``auto``: ``$WANDB_MODE`` when set; else offline without credentials (``$WANDB_API_KEY`` or
    a netrc entry for the host of ``$WANDB_BASE_URL``) or when the host does not accept a TCP
    connection; else online.
    """
    if requested != "auto":
        return requested, f"logger.wandb.mode={requested}"
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"], f"WANDB_MODE={env['WANDB_MODE']} in the environment"
    base_url = env.get("WANDB_BASE_URL") or DEFAULT_BASE_URL
    host = _host_port(base_url)[0]
    if not env.get("WANDB_API_KEY") and not _netrc_has(host, env):
        return "offline", f"no W&B credentials (no WANDB_API_KEY, no netrc entry for {host})"
    target = _probe_target(base_url, env)
    if not reachable(*target):
        return "offline", f"{target[0]}:{target[1]} is unreachable"
    return "online", f"credentials found and {host} is reachable"


# ------------------------------------------------------------------------------- id, name, group
def _write_atomic(path: Path, text: str, overwrite: bool) -> None:
    """Write via a temp file, so a reader never sees half a file.

    Without ``overwrite`` the temp file is hard-linked into place, which fails when another rank
    got there first: every rank then reads the same winner. Filesystems without hard links fall
    back to os.replace.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # readable like any file, not mkstemp's 0600
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def wandb_run_id(run_dir: Path | str, explicit: str | None = None) -> str:
    """The W&B run id of ``run_dir``, kept in ``<run_dir>/wandb_id.txt``.

    ``explicit`` (``logger.wandb.id``) wins and is recorded, so a later restart without it still
    continues that run; otherwise the file's id, created on first use.
    """
    path = Path(run_dir) / ID_FILE
    if explicit:
        if not path.is_file() or path.read_text().strip() != explicit:
            _write_atomic(path, explicit, overwrite=True)
        return explicit
    if not path.is_file() or not path.read_text().strip():
        _write_atomic(path, uuid.uuid4().hex[:12], overwrite=path.is_file())
    return path.read_text().strip()


def _relative_run_dir(cfg: DictConfig, run_dir: Path) -> str | None:
    try:
        rel = Path(run_dir).resolve().relative_to(Path(cfg.paths.output_root).resolve())
    except ValueError:
        return None
    return rel.as_posix() if rel.parts else None


def wandb_name(cfg: DictConfig, run_dir: Path | str) -> str:
    """``logger.wandb.name``, else the run dir under ``paths.output_root`` (``demo/registers=4``), else ``run_name``."""
    return cfg.logger.wandb.name or _relative_run_dir(cfg, Path(run_dir)) or cfg.run_name


def wandb_group(cfg: DictConfig, run_dir: Path | str, env: Mapping[str, str] = os.environ) -> str | None:
    """``logger.wandb.group``, else one group per SLURM array or per Hydra multirun sweep."""
    if cfg.logger.wandb.group:
        return cfg.logger.wandb.group
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{cfg.run_name}-array{env['SLURM_ARRAY_JOB_ID']}"
    sweep_dir = Path(cfg.paths.output_root).resolve() / cfg.run_name
    if Path(run_dir).resolve().parent == sweep_dir:  # <output_root>/<run_name>/<override_dirname>
        return cfg.run_name
    return None


def wandb_tags(cfg: DictConfig) -> list[str]:
    """``logger.wandb.tags`` plus ``registers=<n>`` and ``model=<arch>``, for filtering in the UI."""
    tags = list(cfg.logger.wandb.tags)
    model = cfg.model.get("name") or cfg.model.arch
    for tag in (f"registers={cfg.registers}", f"model={model}"):
        if tag not in tags:
            tags.append(tag)
    return tags


# ---------------------------------------------------------------------------------------- build
@rank_zero_only
def _report_mode(requested: str, mode: str, reason: str, run_dir: Path) -> None:
    if requested == "auto" and mode in ("offline", "dryrun"):
        log.warning("W&B offline: %s; upload later with `wandb sync %s/wandb/offline-run-*`", reason, run_dir)
    else:
        log.info("W&B mode %s (%s)", mode, reason)


def _finish_leftover_run() -> None:
    """Hydra's multirun runs its jobs in one process; a run left by the previous job would
    otherwise be reused by Lightning and swallow this job's metrics."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


class RunWandbLogger(WandbLogger):
    """A WandbLogger whose run config is the resolved config given at ``wandb.init``, once.

    Lightning also logs the module's hyperparameters, which hold the same config under ``cfg``: W&B
    would show every key twice (``model.arch`` and ``cfg.model.arch``). Only the rest is added."""

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        params = dict(params) if isinstance(params, Mapping) else vars(params)
        params.pop("cfg", None)  # already the run config, from build_wandb_logger
        if params:
            super().log_hyperparams(params)


def build_wandb_logger(cfg: DictConfig, run_dir: Path | str) -> WandbLogger:
    """The WandbLogger of a run (``logger=wandb``); the W&B run starts lazily, on rank 0 only."""
    run_dir = Path(run_dir)
    w = cfg.logger.wandb
    mode, reason = resolve_wandb_mode(w.mode, os.environ)
    _report_mode(w.mode, mode, reason, run_dir)
    _finish_leftover_run()
    logger = RunWandbLogger(
        project=w.project,
        entity=w.entity,
        name=wandb_name(cfg, run_dir),
        id=wandb_run_id(run_dir, w.id),
        resume="allow",
        group=wandb_group(cfg, run_dir),
        job_type=w.job_type,
        notes=w.notes,
        tags=wandb_tags(cfg),
        mode=mode,
        save_dir=str(run_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
        log_model=False,  # checkpoints stay in <run_dir>/checkpoints; uploading GBs is opt-in elsewhere
    )
    # Lightning always passes anonymous=None, which wandb 0.31 answers with a deprecation warning.
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


# ---------------------------------------------------------------------------------------- media
def wandb_loggers(trainer: Any) -> list:
    """The WandbLogger instances among ``trainer.loggers``."""
    return [lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, WandbLogger)]


def _to_wandb(key: str, value: Any) -> Any:
    import wandb

    kind = value[0] if isinstance(value, tuple) and value else None
    if kind == "histogram":
        _, counts, edges = value
        counts, edges = np.asarray(counts), np.asarray(edges)
        if counts.ndim != 1 or edges.shape != (len(counts) + 1,):
            raise ValueError(
                f"{key}: a histogram needs len(edges) == len(counts) + 1, got {counts.shape}, {edges.shape}"
            )
        return wandb.Histogram(np_histogram=(counts, edges))
    if kind == "image":
        _, array, caption = value
        array = np.ascontiguousarray(array)
        if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
            raise ValueError(f"{key}: an image must be uint8 HxW or HxWx3, got {array.dtype} {array.shape}")
        return wandb.Image(array, caption=caption)
    raise ValueError(f"{key}: expected ('histogram', counts, edges) or ('image', array, caption), got {value!r:.80}")


def log_wandb_media(trainer: Any, media: dict[str, object], step: int) -> None:
    """Log histograms and images to every WandbLogger of ``trainer`` at x = ``step``.

    ``media`` maps a key to ``("histogram", counts, edges)`` or ``("image", uint8 array, caption)``.
    Lightning logs a training batch's scalars at the ``trainer.global_step`` seen in
    ``training_step``; in ``on_train_batch_end`` ``trainer.global_step`` is already one higher.
    No-op without a WandbLogger and on ranks other than 0.
    """
    if not getattr(trainer, "is_global_zero", True):
        return
    loggers = wandb_loggers(trainer)
    if not loggers or not media:
        return
    payload = {key: _to_wandb(key, value) for key, value in media.items()}
    for logger in loggers:
        # As Lightning's log_metrics does: the step travels as the trainer/global_step metric, not
        # as log(step=...). W&B's own _step counts log calls and only moves forward: a step= below
        # it is dropped (with a warning) and one above it renumbers Lightning's later rows; after a
        # resume _step continues from the old history while global_step restarts at the checkpoint.
        # Scalars and media land in separate rows that share trainer/global_step, the x-axis that
        # Lightning's define_metric("*", step_metric=...) gives every chart.
        logger.experiment.log({**payload, STEP_KEY: int(step)})


def send_wandb_alert(trainer: Any, title: str, text: str) -> bool:
    """A WARN-level ``wandb.alert`` on every WandbLogger of ``trainer`` (rank 0); False when none.

    Offline runs record the alert in their log; W&B sends it when the run is synced."""
    if not getattr(trainer, "is_global_zero", True):
        return False
    loggers = wandb_loggers(trainer)
    for logger in loggers:
        logger.experiment.alert(title=title, text=text, level="WARN")
    return bool(loggers)
