"""Reading an FSDP2 sharded checkpoint directory in one process, without unpickling code.

Such a directory (``torch.distributed.checkpoint`` under Lightning's ``ModelParallelStrategy``) holds
``.metadata`` (DCP's index, a pickle), one ``__<rank>_0.distcp`` file per saving rank and ``meta.pt``
(Lightning's loops, callbacks, hyper-parameters and global step). Tensors are stored under
``state_dict.<module name>``; each rank's shard is one chunk of the full tensor.

``.metadata`` is read with an unpickler that only builds DCP's own metadata classes (plus ``torch.Size``,
dtypes and paths) and refuses everything else; the shards go through DCP's ``FileSystemReader``, which
reads tensors with ``torch.load(weights_only=True)``; ``meta.pt`` with ``load_weights_only``.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from vitreg.utils.io import load_weights_only

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


def is_sharded_checkpoint(path: str | PathLike) -> bool:
    """A directory with DCP's ``.metadata``: an FSDP2 sharded checkpoint (complete or not)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not a torch.distributed.checkpoint metadata class; vitreg never unpickles "
            "anything else from a checkpoint"
        )


def read_sharded_metadata(path: str | PathLike) -> Any:
    """DCP's ``Metadata`` of a sharded checkpoint directory, through the restricted unpickler."""
    with open(Path(path) / ".metadata", "rb") as f:
        return _MetadataUnpickler(f).load()


def load_sharded_tensors(path: str | PathLike, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The full (consolidated) tensors whose DCP key passes ``keep``, loaded into CPU memory."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_sharded_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    metadata = read_sharded_metadata(path)
    wanted = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and keep(key)
    }
    if wanted:
        with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": that is the intent
            warnings.simplefilter("ignore", UserWarning)
            load(wanted, storage_reader=SafeReader(path), no_dist=True)
    return wanted


def read_sharded_checkpoint(path: str | PathLike, prefix: str = "state_dict.") -> dict[str, Any]:
    """A Lightning-style checkpoint dict from a sharded directory: ``meta.pt``'s entries plus
    ``state_dict`` with the model tensors whose name starts with ``prefix`` (e.g.
    ``state_dict.objective.teacher.backbone.`` for one backbone); optimiser states are not read."""
    path = Path(path)
    if not (path / "meta.pt").is_file():
        raise ValueError(f"{path} has DCP shards but no meta.pt: not a complete vitreg/Lightning sharded checkpoint")
    checkpoint = load_weights_only(path / "meta.pt")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path / 'meta.pt'} is not Lightning checkpoint metadata")
    tensors = load_sharded_tensors(path, lambda key: key.startswith(prefix))
    checkpoint["state_dict"] = {key[len("state_dict.") :]: value for key, value in tensors.items()}
    return checkpoint
