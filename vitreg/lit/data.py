"""LightningDataModules: the embedded synthetic dataset and streamed WebDataset shards, both through the
real multi-crop + collate path. Each owns where its streams stand (``StreamPositions``) and saves it in
checkpoints through its ``state_dict``, so a resumed run continues the streams exactly."""

from __future__ import annotations

import logging
import os
import random

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from vitreg.config import ConfigError
from vitreg.data.collate import MultiCropCollator
from vitreg.data.shards import list_shards, missing_shards
from vitreg.data.synthetic import SyntheticShapes
from vitreg.data.synthetic_shards import ensure_synthetic_shards
from vitreg.data.transforms import MultiCropTransform, ResizeNormalize
from vitreg.data.webdataset import SKIPS, ShardStream
from vitreg.lit.resume import StreamPositions

log = logging.getLogger(__name__)


def multicrop_transform(cfg: DictConfig) -> MultiCropTransform:
    a = cfg.augment
    return MultiCropTransform(
        global_crops_size=a.global_crops_size,
        local_crops_size=a.local_crops_size,
        local_crops_number=a.local_crops_number,
        global_crops_scale=tuple(a.global_crops_scale),
        local_crops_scale=tuple(a.local_crops_scale),
        blur_probabilities=a.blur_probabilities
        if isinstance(a.blur_probabilities, str)
        else list(a.blur_probabilities),
        solarize_prob=a.solarize_prob,
        output_dtype=crops_dtype(cfg),
    )


def crops_dtype(cfg: DictConfig) -> torch.dtype:
    """``augment.crops_dtype``: uint8 (normalised on the device by ``DINOv2Module``) or float32; auto is uint8
    when training on CUDA, where the host-to-device copy and the workers' shared memory shrink 4x."""
    choice = cfg.augment.get("crops_dtype", "float32")
    if choice == "auto":
        on_cuda = str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        choice = "uint8" if on_cuda else "float32"
    return torch.uint8 if choice == "uint8" else torch.float32


def multicrop_collator(cfg: DictConfig) -> MultiCropCollator:
    return MultiCropCollator(
        patch_size=cfg.model.patch_size,
        global_crops_size=cfg.augment.global_crops_size,
        mask_ratio_min_max=tuple(cfg.ssl.ibot.mask_ratio_min_max),
        mask_sample_probability=cfg.ssl.ibot.mask_sample_probability,
        seed=cfg.seed,
    )


class ResumableStreams(L.LightningDataModule):
    """A training data module whose stream positions (``self.streams``) travel in checkpoints: counted at
    every training batch, saved by ``state_dict`` (every rank's, gathered), checked and set by
    ``load_state_dict`` before Lightning asks for the training DataLoader."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.streams = StreamPositions(cfg.data.num_workers, strict=cfg.data.exact_resume)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:  # just before the callbacks' on_train_batch_start
            self.streams.consumed(batch)
        return batch

    def state_dict(self) -> dict:
        return self.streams.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.streams.load_state_dict(state_dict, rank, world)


class SyntheticDataModule(ResumableStreams):
    """Training batches from ``SyntheticShapes``; ``knn_loaders`` gives labelled bank/query sets."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.syn = cfg.data.synthetic

    def _dataset(self, n: int, split: str, transform) -> SyntheticShapes:
        return SyntheticShapes(
            n,
            self.syn.image_size,
            self.syn.num_classes,
            self.cfg.seed,
            split,
            transform,
            class_appearance=self.syn.class_appearance,
        )

    def train_dataloader(self) -> DataLoader:
        data = self.cfg.data
        if self.syn.as_shards:  # the default: the same streaming path as real shards
            shards = ensure_synthetic_shards(
                self.cfg.paths.cache_dir,
                num_images=self.syn.num_images,
                image_size=self.syn.image_size,
                num_classes=self.syn.num_classes,
                seed=self.cfg.seed,
                class_appearance=self.syn.class_appearance,
            )
            return stream_loader(self.cfg, shards, self.streams)
        dataset = self._dataset(self.syn.num_images, "train", multicrop_transform(self.cfg))
        if data.batch_size_per_device > len(dataset):
            raise ValueError(
                f"data.batch_size_per_device={data.batch_size_per_device} exceeds the "
                f"{len(dataset)} images of data.synthetic.num_images"
            )
        return DataLoader(
            dataset,
            batch_size=data.batch_size_per_device,
            shuffle=True,
            drop_last=True,
            num_workers=data.num_workers,
            persistent_workers=data.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=multicrop_collator(self.cfg),
        )

    def knn_loaders(self, batch_size: int = 128) -> tuple[DataLoader, DataLoader]:
        """(bank, queries): training-split images and held-out val-split images, un-augmented."""
        transform = ResizeNormalize(self.cfg.augment.global_crops_size)
        bank = self._dataset(self.syn.knn_train_images, "train", transform)
        queries = self._dataset(self.syn.knn_val_images, "val", transform)
        workers = min(self.cfg.data.num_workers, 2)
        return tuple(DataLoader(d, batch_size=batch_size, num_workers=workers) for d in (bank, queries))


class CountingCollate:
    """The multi-crop collate, plus what the worker skipped since its previous batch (``skipped``,
    by reason) and how many samples it looked at (``seen``), for the DataHealth callback.

    Samples that carry their stream position ``(rank, worker, j)`` (``ShardStream(with_position=True)``)
    make the batch exactly resumable: its iBOT masks draw from an RNG seeded by the position of its
    first sample, and ``batch["stream_position"]`` = ``(rank, worker, next j)`` tells where that
    worker's stream continues after this batch (recorded in checkpoints by ``StreamPositions``)."""

    def __init__(self, collator: MultiCropCollator, seed: int = 0) -> None:
        self.collator = collator
        self.seed = seed

    def __call__(self, samples: list) -> dict:
        rng = None
        position = None
        if samples and len(samples[0]) == 3:
            rank, worker, first = samples[0][2]
            rng = random.Random(f"masks/{self.seed}/{rank}/{worker}/{first}")
            position = (rank, worker, samples[-1][2][2] + 1)
            samples = [s[:2] for s in samples]
        batch = self.collator(samples, rng=rng)
        batch["skipped"], batch["seen"] = SKIPS.take_new()
        if position is not None:
            batch["stream_position"] = position  # Python ints: never sent to the device, read without a sync
        return batch


def shard_urls(shards) -> list[str]:
    """Expand ``data.webdataset.shards`` (a pattern, a folder, or a list of either) into shard URLs."""
    items = [shards] if isinstance(shards, str) else list(shards)
    return [url for item in items for url in list_shards(item)]


def training_shards(cfg: DictConfig) -> list[str]:
    """``data.webdataset.shards`` expanded and checked, at start (before any model is built).

    Local shards that do not exist (a wrong path, half of a brace range not copied yet) are found here
    rather than as skips deep in the stream: none exists -> ``ConfigError``; some missing ->
    ``data.webdataset.missing_shards``: ``error`` refuses, ``warn`` logs the count loudly and streams
    the shards that exist; null means error on multi-node runs (``trainer.num_nodes > 1``, where a
    node with a partial copy would train on other data than the rest) and warn otherwise. Remote URLs
    (``pipe:``, ``http://``, ``s3://``, ...) are not checked here; the stream skips and counts them.
    """
    spec = cfg.data.webdataset.shards
    try:
        urls = shard_urls(spec)
    except FileNotFoundError as err:  # a folder or glob that matches nothing
        raise ConfigError(
            f"data.webdataset.shards: {err}; point it at a folder of .tar shards, a glob or a brace pattern "
            "(make shards with scripts/make_shards.py)"
        ) from None
    missing = missing_shards(urls)
    if not missing:
        return urls
    gone = set(missing)
    examples = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    if len(gone) == len(set(urls)):
        raise ConfigError(
            f"data.webdataset.shards: none of the {len(urls)} shards of {spec} exists (e.g. {examples}); "
            "check the path or pattern (make shards with scripts/make_shards.py)"
        )
    present = [url for url in urls if url not in gone]
    policy = cfg.data.webdataset.missing_shards
    key = f"data.webdataset.missing_shards={policy}"
    if policy is None:
        policy = "error" if cfg.trainer.num_nodes > 1 else "warn"
        key = f"data.webdataset.missing_shards (null: {policy} with trainer.num_nodes={cfg.trainer.num_nodes})"
    what = f"{len(missing)} of the {len(urls)} shards of data.webdataset.shards ({spec}) do not exist: {examples}"
    if policy == "error":
        raise ConfigError(
            f"{key}: {what}. Copy the missing shards, fix the pattern, or set "
            f"data.webdataset.missing_shards=warn to train on the {len(present)} that exist"
        )
    if int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))) == 0:  # once per node
        log.warning(
            "MISSING SHARDS: %s. Training streams the %d that exist; data.webdataset.missing_shards=error "
            "refuses to start instead.",
            what,
            len(present),
        )
    return present


def stream_loader(cfg: DictConfig, shards: list[str], streams: StreamPositions | None = None) -> DataLoader:
    """A DataLoader streaming ``shards`` through decode, multi-crop and collate (with skip counts).

    ``streams`` (restored from a checkpoint): ``worker_offset`` and ``start_positions`` that continue the
    streams exactly where it left them."""
    data, wds_cfg, augment = cfg.data, cfg.data.webdataset, cfg.augment
    stream = ShardStream(
        shards,
        multicrop_transform(cfg),
        seed=cfg.seed,
        resampled=wds_cfg.resampled,
        shuffle_buffer=wds_cfg.shuffle_buffer,
        min_side=wds_cfg.min_image_side or augment.local_crops_size,
        draft_side=augment.global_crops_size if wds_cfg.decode_draft else None,
        with_position=True,
        worker_offset=streams.worker_offset if streams is not None else 0,
        start_positions=streams.start_positions if streams is not None else None,
        max_unusable_in_a_row=wds_cfg.max_unusable_in_a_row,
        max_skip_fraction=wds_cfg.max_skip_fraction,
    )
    return DataLoader(
        stream,
        batch_size=data.batch_size_per_device,
        num_workers=data.num_workers,
        persistent_workers=data.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=CountingCollate(multicrop_collator(cfg), seed=cfg.seed),
        drop_last=True,
    )


class WebDataModule(ResumableStreams):
    """Training batches streamed from WebDataset shards through the multi-crop + collate path.

    The shards are expanded and checked when the module is made (``training_shards``), so a missing
    shard stops or warns at start, before the model is built."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.shards = training_shards(cfg)

    def train_dataloader(self) -> DataLoader:
        return stream_loader(self.cfg, self.shards, self.streams)
