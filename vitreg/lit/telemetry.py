"""The artifact-telemetry callback: statistics of the teacher (and optionally the student) on a fixed
probe batch every N steps, to the loggers and to ``<run_dir>/telemetry/``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from torch import Tensor

from vitreg.config import TelemetryConfig, to_dataclass
from vitreg.data.probe import image_probe, load_probe, save_probe, synthetic_probe
from vitreg.lit.strategies import is_sharded, unsharded_copy
from vitreg.telemetry.alerts import due_alerts
from vitreg.telemetry.measure import measure
from vitreg.telemetry.neurons import top_k_overlap
from vitreg.telemetry.store import PROBE_IMAGES, TelemetryWriter, read_records, scalar_summary

log = logging.getLogger(__name__)


def build_probe_images(cfg: DictConfig, size: int) -> Tensor:
    """The probe images for a run's config: ``probe_source`` if set, else held-out synthetic images
    for synthetic data, else the first decodable images of the training shards."""
    t = cfg.callbacks.telemetry
    if t.probe_source:
        return image_probe(t.probe_source, t.num_images, size)
    if cfg.data.name == "synthetic":
        syn = cfg.data.synthetic
        return synthetic_probe(t.num_images, syn.image_size, cfg.seed, syn.num_classes, size)
    return image_probe(cfg.data.webdataset.shards, t.num_images, size)


class ArtifactTelemetry(L.Callback):
    """Measures every ``every_n_steps`` optimizer steps (and at the first and last step), on rank 0,
    in eval mode under no_grad. ``seconds`` accumulates the time spent, for cost accounting.

    Its checkpoint state is the set of alerts already sent, so a resumed run does not repeat them.

    Measurements happen in ``on_train_batch_start``: at that point step ``s`` means ``s`` optimizer
    steps *and* ``s`` EMA updates are done, so the teacher measured at step s is exactly the one
    a checkpoint at step s holds.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.t = to_dataclass(TelemetryConfig, cfg.callbacks.telemetry)  # also the measuring settings
        self.resolutions = sorted({cfg.augment.global_crops_size, *self.t.resolutions})
        self.root = Path(run_dir) / "telemetry"
        self.writer: TelemetryWriter | None = None
        self.probe: Tensor | None = None
        self.history: list[dict] = []  # records of this run (incl. before a resume), for the emergence map
        self.last_step: int | None = None
        self.measurements = 0
        self.seconds = 0.0
        self.alerts_fired: set[str] = set()

    # -- checkpoint state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"alerts_fired": sorted(self.alerts_fired)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.alerts_fired = set(state_dict.get("alerts_fired", ()))

    # -- setup -------------------------------------------------------------------------------------
    def _ensure_probe(self) -> Tensor:
        if self.probe is None:
            path = self.root / PROBE_IMAGES
            if path.exists():  # a resumed run measures the very same images
                self.probe = load_probe(path)
            else:
                self.probe = build_probe_images(self.cfg, max(self.resolutions))
                save_probe(self.probe, path)
            self.writer = TelemetryWriter(self.root)
            try:
                self.history = read_records(self.root)
            except FileNotFoundError:
                self.history = []
        return self.probe

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._ensure_probe()

    # -- cadence -----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.t.every_n_steps == 0 and step != self.last_step:
            self.measure_now(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_step != self.last_step:
            self.measure_now(trainer, module)

    # -- measuring ---------------------------------------------------------------------------------
    def measure_now(self, trainer: L.Trainer, module: L.LightningModule) -> list[dict]:
        step = trainer.global_step
        self.last_step = step
        # Under FSDP2 (trainer=fsdp) the weights are sharded: every rank joins the gather of a full fp32
        # copy (a collective), and rank 0 measures the copy alone, as it measures its replica under DDP.
        sharded = is_sharded(module)
        if not trainer.is_global_zero and not sharded:
            return []
        start = time.perf_counter()
        probe = self._ensure_probe() if trainer.is_global_zero else None
        records = []
        for model in self.t.models:
            backbone = getattr(module, model).backbone
            if sharded:
                backbone = unsharded_copy(backbone, module.device)  # None except on rank 0
            if not trainer.is_global_zero:
                continue
            for res in self.resolutions:
                record, maps = measure(backbone, probe, res, self.t, device=module.device)
                record.update(step=step, model=model)
                self._neuron_overlap(record)
                assert self.writer is not None
                self.writer.write(record, maps)
                self.history = [
                    r for r in self.history if (r["step"], r["model"], r["resolution"]) != (step, model, res)
                ]
                self.history.append(record)
                prefix = f"telemetry/{model}/r{res}"
                scalars = scalar_summary(record, prefix)
                for logger in trainer.loggers:
                    logger.log_metrics(scalars, step=step)
                if self.measurements % self.t.media_every_n_measurements == 0:
                    self._log_media(trainer, prefix, record, maps, probe, step)
                if self.t.alerts:
                    self._alert(trainer, record)
                records.append(record)
        self.measurements += 1
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        log.debug("telemetry at step %d took %.2fs", step, elapsed)
        return records

    def _neuron_overlap(self, record: dict) -> None:
        """Set the register neurons' ``overlap`` with the last earlier measurement of the same model and
        resolution. ``history`` is read back from telemetry.jsonl, so a resumed run compares with the
        measurement before the resume; a step measured again after a resume compares with the one before it."""
        neurons = record.get("register_neurons")
        if neurons is None:
            return
        earlier = [
            r
            for r in self.history
            if (r["model"], r["resolution"]) == (record["model"], record["resolution"])
            and r["step"] < record["step"]
            and r.get("register_neurons") is not None
        ]
        previous = max(earlier, key=lambda r: r["step"])["register_neurons"]["neurons"] if earlier else None
        neurons["overlap"] = top_k_overlap(neurons["neurons"], previous)

    def _alert(self, trainer: L.Trainer, record: dict) -> None:
        """A log warning and a W&B alert for each condition that holds for the first time in this run."""
        from vitreg.lit.wandb_logger import send_wandb_alert

        for alert in due_alerts(record, self.t.alert_outlier_fraction, self.alerts_fired):
            self.alerts_fired.add(alert.key)
            log.warning("telemetry alert: %s: %s", alert.title, alert.text)
            send_wandb_alert(trainer, alert.title, alert.text)

    def _log_media(self, trainer: L.Trainer, prefix: str, record: dict, maps: dict, probe: Tensor, step: int) -> None:
        from vitreg.lit.tensorboard_logger import log_tensorboard_media, tensorboard_loggers
        from vitreg.lit.wandb_logger import log_wandb_media, wandb_loggers

        if not wandb_loggers(trainer) and not tensorboard_loggers(trainer):
            return  # only W&B and TensorBoard show pictures; the telemetry files hold the same data
        import numpy as np

        # The bins are log-spaced and W&B draws histograms on a linear axis: as a histogram of
        # log10(norm) the same counts get equal-width bins (the key says log10).
        log_edges = np.log10(np.asarray(record["histogram_edges"], dtype=np.float64))
        media: dict[str, object] = {}
        for stream in ("prenorm", "postnorm"):
            counts = np.asarray(record["norms"][stream]["histogram"][-1])
            media[f"{prefix}/hist/patch_log10_norm_{stream}"] = ("histogram", counts, log_edges)
        history = [r for r in self.history if r["model"] == record["model"] and r["resolution"] == record["resolution"]]
        for name, (image, caption) in self._pictures(record, maps, probe, history).items():
            media[f"{prefix}/images/{name}"] = ("image", image, f"step {step}: {caption}")
        log_wandb_media(trainer, media, step)
        log_tensorboard_media(trainer, media, step)

    def _pictures(self, record: dict, maps: dict, probe: Tensor, history: list[dict]) -> dict[str, tuple]:
        """name -> (uint8 image, caption). ``figures`` (default): labelled matplotlib figures with axes
        and colour bars (about a second per measurement on a CPU core); ``tiles``: colour-mapped tiles
        drawn with numpy in milliseconds, for high cadences (the captions say how to read them)."""
        if self.t.media_style == "figures":
            from vitreg.telemetry import plots
            from vitreg.utils.figures import figure_to_array

            figures = {
                "emergence": plots.emergence_heatmap(history, model=record["model"], resolution=record["resolution"]),
                "attention_maps": plots.attention_maps(probe, maps, record["resolution"]),
                "position_map": plots.position_map(record),
                "norm_histograms": plots.norm_histograms(record, stream=record["stream"]),
            }
            return {name: (figure_to_array(fig), name.replace("_", " ")) for name, fig in figures.items()}
        from vitreg.telemetry import render

        return {
            "emergence": render.emergence_image(history),
            "attention_maps": render.attention_tiles(probe.numpy(), maps),
            "position_map": render.position_image(record),
            "norm_histograms": render.histogram_image(record, record["stream"]),
        }
