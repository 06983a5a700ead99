"""Every value the YAML files in conf/ write equals the default of its schema dataclass, so a default
changed in one place only fails here. The group presets that override on purpose are listed with why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose_config
from vitreg.config import CHOICES, PretrainConfig
from vitreg.eval.tasks import AnalyzeConfig
from vitreg.models.attention import ATTN_BACKENDS
from vitreg.ssl.config import CENTERINGS, ON_NONFINITE
from vitreg.ssl.schedules import SCALING_RULES
from vitreg.telemetry.detectors import DETECTORS
from vitreg.telemetry.stats import STREAMS

# Groups whose files are not the schema's: Hydra's own settings, and recipes that override on purpose.
NOT_SCHEMA_GROUPS = ("hydra", "experiment")
ABSENT = object()

# (group, option) -> {key: why the file differs from the schema's default}
INTENDED = {
    ("model", "vitt"): {"arch": "the preset names its size"},
    ("model", "vits"): {"arch": "the preset names its size"},
    ("model", "vitb"): {"arch": "the preset names its size"},
    ("model", "vitg"): {"arch": "the preset names its size", "ffn_layer": "DINOv2's giant2 uses SwiGLU"},
    ("data", "webdataset"): {
        "name": "the option selects its source",
        "num_workers": "decoding real JPEGs needs more loader workers than the synthetic shards",
    },
    ("trainer", "cpu"): {"accelerator": "the option's device", "precision": "no mixed precision on the CPU"},
    ("trainer", "gpu"): {"accelerator": "the option's device", "precision": "bf16 autocast on the GPU"},
    ("trainer", "ddp"): {"strategy": "the option's strategy", "devices": "every visible device"},
    ("trainer", "fsdp"): {
        "strategy": "the option's strategy",
        "devices": "every visible device",
        "precision": "FSDP2 casts the parameters itself",
    },
    # the schema enables no logger; each logger's file switches its own on, so logger=[csv,wandb] runs both
    ("logger", "csv"): {"enabled.csv": "the file switches its logger on"},
    ("logger", "tensorboard"): {"enabled.tensorboard": "the file switches its logger on"},
    ("logger", "wandb"): {"enabled.wandb": "the file switches its logger on"},
}


def leaves(node: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain container; an empty mapping is a leaf."""
    found = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            found += leaves(value, f"{prefix}{key}.")
        else:
            found.append((f"{prefix}{key}", value))
    return found


def lookup(node: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return ABSENT
        node = node[part]
    return node


def schema_defaults(schema: type) -> dict:
    """The dataclass's defaults as a plain container, interpolations and ``???`` kept as written."""
    return OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)


def yaml_values(path: Path) -> dict:
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    values.pop("defaults", None)  # Hydra's composition order, not a setting
    values.pop("hydra", None)  # Hydra's own settings
    return values


def differences(values: dict, defaults: dict, prefix: str = "", intended: dict | None = None) -> list[str]:
    wrong = []
    for key, value in leaves(values):
        if key in (intended or {}):
            continue
        default = lookup(defaults, prefix + key)
        if default is ABSENT:
            wrong.append(f"{prefix}{key}: not a key of the schema")
        elif value != default:
            wrong.append(f"{prefix}{key}: YAML {value!r} != dataclass default {default!r}")
    return wrong


def group_options() -> list[tuple[str, str]]:
    return sorted(
        (folder.name, path.stem)
        for folder in CONF_DIR.iterdir()
        if folder.is_dir() and folder.name not in NOT_SCHEMA_GROUPS
        for path in folder.glob("*.yaml")
    )


def pretrain_default_options() -> dict[str, str]:
    entries = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "pretrain.yaml"))["defaults"]
    return {group: option for entry in entries if isinstance(entry, dict) for group, option in entry.items()}


@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_group_file_writes_the_schema_defaults(group, option):
    values = yaml_values(CONF_DIR / group / f"{option}.yaml")
    intended = INTENDED.get((group, option), {})
    assert not differences(values, schema_defaults(PretrainConfig), f"{group}.", intended)
    for key in intended:  # an exception that no longer differs is stale
        assert lookup(values, key) != lookup(schema_defaults(PretrainConfig), f"{group}.{key}"), (group, option, key)


def test_each_group_default_file_has_no_intended_difference():
    """What a plain `python train/pretrain.py` composes is exactly the dataclasses' defaults (but the logger)."""
    for group, option in pretrain_default_options().items():
        if group in NOT_SCHEMA_GROUPS or option is None:
            continue
        assert (group, option) in group_options(), (group, option)
        assert set(INTENDED.get((group, option), {})) <= {"enabled.csv"}, (group, option)


def test_entry_configs_write_the_schema_defaults():
    assert not differences(yaml_values(CONF_DIR / "pretrain.yaml"), schema_defaults(PretrainConfig))
    assert not differences(yaml_values(CONF_DIR / "analyze.yaml"), schema_defaults(AnalyzeConfig))


def test_a_default_changed_in_one_place_only_is_found():
    defaults = schema_defaults(PretrainConfig)
    values = yaml_values(CONF_DIR / "callbacks" / "default.yaml")
    values["telemetry"]["identical_cosine"] = 0.98
    assert differences(values, defaults, "callbacks.") == [
        "callbacks.telemetry.identical_cosine: YAML 0.98 != dataclass default 0.99"
    ]
    assert differences({"telemetry": {"identical_cosin": 0.99}}, defaults, "callbacks.") == [
        "callbacks.telemetry.identical_cosin: not a key of the schema"
    ]


def test_the_composed_default_run_is_the_schema_defaults():
    """The real Hydra tree (defaults list, `_self_` order) composes to the dataclasses' defaults."""
    composed = OmegaConf.to_container(compose_config([]), resolve=False)
    composed["paths"].pop("cache_dir")  # set by the test fixture (a shared cache outside the repository)
    assert not differences(composed, schema_defaults(PretrainConfig), intended={"logger.enabled.csv": "logger=csv"})


def test_choice_lists_are_the_owners_own():
    """A choice list lives with the code that branches on it; the schema checks against that very tuple."""
    owners = {
        "model.attn_backend": ATTN_BACKENDS,
        "ssl.centering": CENTERINGS,
        "ssl.on_nonfinite": ON_NONFINITE,
        "optim.scaling_rule": SCALING_RULES,
        "callbacks.telemetry.detector": DETECTORS,
        "callbacks.telemetry.stream": STREAMS,
    }
    for key, owned in owners.items():
        assert CHOICES[key] is owned, key
