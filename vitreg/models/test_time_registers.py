"""Test-time registers (Jiang et al., "Vision Transformers Don't Need Trained Registers", NeurIPS 2025).

A few FFN neurons (the *register neurons*, found by ``vitreg.eval.register_neurons``) write the high norms
onto low-information patches. A test-time register is an extra token, zero at the input, into which those
neurons' activations are moved: for each image and each edited block, the register neurons' activation on
the extra token(s) becomes ``scale`` × the signed maximum of their activations over all tokens (the value
of largest magnitude, with its sign, taken over the block's register neurons together, as the authors'
hook does), and on the patch tokens it becomes

- ``zero`` (the paper's default): 0;
- ``mean``: the image's mean over its patches;
- ``only_outliers``: the mean, only where the activation exceeds mean + 1 std of the image's patches;
- ``same``: left as it is.

CLS and trained registers keep their activations. No training and no new weights: the backbone's
parameters are shared, not copied.

Where the extra tokens sit: right after the trained registers, so the sequence keeps the backbone's layout
``[CLS, registers, patches]`` with ``num_register_tokens + num_tokens`` registers, and every consumer
(telemetry, LOST, probes, ``get_intermediate_layers(return_register_tokens=True)``) treats them as the
registers they are. Registers carry no position, so this is the same model as the authors' appending them
at the end.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from vitreg.models.config import ViTConfig
from vitreg.models.layout import TokenLayout
from vitreg.models.vision_transformer import VisionTransformer

PATCH_VALUES: tuple[str, ...] = ("zero", "mean", "only_outliers", "same")


@dataclass(frozen=True)
class TestTimeRegisterSettings:
    """How the register neurons' activations are moved (see the module docstring)."""

    __test__ = False  # not a pytest test class

    num_tokens: int = 1  # extra tokens appended, zeros at the input
    scale: float = 1.0  # their activation: scale x the signed max over all tokens
    patch_values: str = "zero"  # one of PATCH_VALUES

    def __post_init__(self) -> None:
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"ttr.num_tokens must be an integer >= 1, got {self.num_tokens!r}")
        if self.patch_values not in PATCH_VALUES:
            raise ValueError(f"ttr.patch_values must be one of {list(PATCH_VALUES)}, got {self.patch_values!r}")


def neuron_pairs(neurons: Iterable[Mapping | Sequence]) -> list[tuple[int, int]]:
    """``[(block, neuron), ...]`` from ``find_register_neurons``' dicts (``layer``, ``neuron``) or pairs, sorted."""
    pairs = set()
    for item in neurons:
        block, unit = (item["layer"], item["neuron"]) if isinstance(item, Mapping) else item
        pairs.add((int(block), int(unit)))
    return sorted(pairs)


class TestTimeRegisters(VisionTransformer):
    """A backbone with test-time registers: the same interface as ``VisionTransformer`` (forward,
    ``forward_features``, ``get_intermediate_layers``, ``iter_layers`` ...), its outputs' ``x_norm_regtokens``
    holding the trained registers followed by the test-time ones. Build it with ``from_backbone``."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        cfg: ViTConfig,
        neurons: Iterable[Mapping | Sequence],
        settings: TestTimeRegisterSettings | None = None,
    ) -> None:
        super().__init__(cfg)
        self.settings = settings or TestTimeRegisterSettings()
        self.neurons = neuron_pairs(neurons)
        for block, unit in self.neurons:
            hidden = self.blocks[block].mlp.output_proj.in_features if 0 <= block < cfg.depth else 0
            if not 0 <= unit < hidden:
                raise ValueError(
                    f"register neuron (layer {block}, neuron {unit}) does not exist in this model: "
                    f"layers 0..{cfg.depth - 1}, neurons 0..{hidden - 1}"
                )
        # Nothing to move without register neurons: then no token is added and the model is the backbone.
        self.num_test_time_registers = self.settings.num_tokens if self.neurons else 0
        by_block: dict[int, list[int]] = {}
        for block, unit in self.neurons:
            by_block.setdefault(block, []).append(unit)
        self._edits = self.edit(neurons={block: self._mover(units) for block, units in by_block.items()})

    @classmethod
    def from_backbone(
        cls,
        backbone: VisionTransformer,
        neurons: Iterable[Mapping | Sequence],
        settings: TestTimeRegisterSettings | None = None,
    ) -> TestTimeRegisters:
        """The TTR version of ``backbone``, sharing its parameters (no copy; built on the meta device)."""
        if isinstance(backbone, TestTimeRegisters):
            raise ValueError("this backbone already has test-time registers; wrap the plain backbone instead")
        with torch.device("meta"):
            model = cls(backbone.cfg, neurons, settings)
        model.load_state_dict(backbone.state_dict(keep_vars=True), assign=True)
        for mine, theirs in zip(model.blocks, backbone.blocks, strict=True):
            mine.drop_path = theirs.drop_path
        return model.train(backbone.training)

    @property
    def layout(self) -> TokenLayout:
        """Trained registers, then the test-time ones, count as registers."""
        return TokenLayout(self.num_register_tokens + self.num_test_time_registers)

    def describe(self) -> dict:
        """What ``vitreg_export.json`` records of the test-time registers."""
        return {"neurons": [list(pair) for pair in self.neurons], **asdict(self.settings)}

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        tokens = super().prepare_tokens_with_masks(x, masks)
        if not self.num_test_time_registers:
            return tokens
        at = 1 + self.num_register_tokens
        extra = tokens.new_zeros(tokens.shape[0], self.num_test_time_registers, tokens.shape[2])
        return torch.cat((tokens[:, :at], extra, tokens[:, at:]), dim=1)

    def forward_features_list(self, xs: list[Tensor], masks: list[Tensor | None] | None = None) -> list[dict]:
        """Each batch on its own: neuron edits need one batch per forward (no packing)."""
        masks = self._masks_per_batch(xs, masks)
        return [self.forward_features(x, m) for x, m in zip(xs, masks, strict=True)]

    def _mover(self, units: list[int]):
        first = 1 + self.num_register_tokens
        return functools.partial(
            move_register_neurons,
            units=units,
            registers=slice(first, first + self.num_test_time_registers),
            patches=slice(first + self.num_test_time_registers, None),
            settings=self.settings,
        )


def move_register_neurons(
    hidden: Tensor, units: Sequence[int], registers: slice, patches: slice, settings: TestTimeRegisterSettings
) -> Tensor:
    """One block's edit: the FFN activation ``hidden`` (B, T, hidden) with the register neurons ``units``
    moved from the ``patches`` tokens to the test-time ``registers`` (see the module docstring)."""
    idx = torch.tensor(list(units), device=hidden.device)
    acts = hidden[..., idx]  # (B, T, n)
    top, bottom = acts.amax(dim=(1, 2)), acts.amin(dim=(1, 2))
    signed_max = torch.where(top.abs() > bottom.abs(), top, bottom)  # (B,): one value per image and block
    out = hidden.clone()
    out[:, registers, idx] = (settings.scale * signed_max)[:, None, None].to(hidden.dtype)
    on_patches = acts[:, patches]  # (B, P, n)
    if settings.patch_values == "zero":
        out[:, patches, idx] = 0
    elif settings.patch_values == "mean":
        out[:, patches, idx] = on_patches.mean(1, keepdim=True).expand_as(on_patches)
    elif settings.patch_values == "only_outliers":
        mean = on_patches.mean(1, keepdim=True)
        high = on_patches > mean + on_patches.std(1, keepdim=True)
        out[:, patches, idx] = torch.where(high, mean.expand_as(on_patches), on_patches)
    return out
