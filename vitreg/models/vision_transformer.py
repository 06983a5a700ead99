"""A ViT numerically identical to DINOv2's ``DinoVisionTransformer``, with N registers.

Token layout: ``[CLS, reg_1..reg_N, patch_1..patch_P]``. The positional embedding covers CLS and
patches only; registers are inserted after it is added, so they carry no position (Darcet et al.).
Parameter names equal DINOv2's hub layout, so official state dicts map one to one
(see ``vitreg.models.checkpoint``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitreg.models.block import Block
from vitreg.models.config import ViTConfig, vit_config
from vitreg.models.edits import EditHandle, NeuronEdit, TokenEdit, attach_edits
from vitreg.models.layers import PatchEmbed
from vitreg.models.layout import TokenLayout
from vitreg.models.pos_embed import interpolate_pos_embed


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim = self.num_features = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.num_register_tokens = cfg.num_register_tokens
        self.n_blocks = cfg.depth
        dim, regs = cfg.embed_dim, cfg.num_register_tokens

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid_size**2, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, regs, dim)) if regs else None
        self.register_pos_embed = nn.Parameter(torch.zeros(1, regs, dim)) if regs and cfg.register_pos_embed else None
        self.blocks = nn.ModuleList(
            Block(
                dim,
                cfg.num_heads,
                cfg.ffn_layer,
                cfg.hidden_dim,
                cfg.qkv_bias,
                cfg.proj_bias,
                cfg.ffn_bias,
                cfg.layerscale_init,
                rate,
                cfg.attn_backend,
                cfg.attn_bias,
            )
            for rate in cfg.drop_path_rates()
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Identity()
        # (1, D) like DINOv2; replaces masked patch embeddings; never re-initialised.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.init_weights()

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + registers: the tokens before the patches."""
        return self.layout.num_prefix

    @property
    def layout(self) -> TokenLayout:
        """Where CLS, registers and patches sit in this model's token sequence."""
        return TokenLayout(self.num_register_tokens)

    def embed_patches(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> patch embeddings (B, h*w, D), before positions and prefix tokens."""
        self._check_images(x)
        return self.patch_embed(x)

    def without_stochastic_depth(self) -> VisionTransformer:
        """Turn stochastic depth off for good (DINOv2's teacher never drops paths); returns the model."""
        for block in self.blocks:
            block.drop_path = 0.0
        return self

    def init_weights(self) -> None:
        """DINOv2's init: pos trunc-normal 0.02, CLS/registers N(0, 1e-6), Linear trunc-normal 0.02.
        Registers use ``register_init_std`` (1e-6 by default, as DINOv2).

        The patch-embedding Conv2d keeps PyTorch's default init, LayerNorms ones/zeros, LayerScale
        its constant, mask_token zeros: all exactly as DINOv2 leaves them.
        """
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=self.cfg.register_init_std)
        if self.register_pos_embed is not None:
            nn.init.trunc_normal_(self.register_pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- tokens
    def _check_images(self, x: Tensor) -> tuple[int, int]:
        if not isinstance(x, Tensor) or x.ndim != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected images of shape (B, C, H, W), got {got}")
        _, c, h, w = x.shape
        p = self.patch_size
        if c != self.cfg.in_chans:
            raise ValueError(f"expected {self.cfg.in_chans} input channels, got {c} (shape {tuple(x.shape)})")
        if h % p or w % p:
            raise ValueError(
                f"image sides must be multiples of patch_size {p}, got {h}x{w}; "
                f"nearest valid size: {max(p, round(h / p) * p)}x{max(p, round(w / p) * p)}"
            )
        return h // p, w // p

    def _check_masks(self, masks: Tensor | None, batch: int, num_patches: int) -> None:
        if masks is None:
            return
        expected = (batch, num_patches)
        if not isinstance(masks, Tensor) or tuple(masks.shape) != expected or masks.dtype != torch.bool:
            got = f"{tuple(masks.shape)} {masks.dtype}" if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(f"masks must be a bool tensor of shape (B, num_patches) = {expected}, got {got}")

    def interpolate_pos_encoding(self, grid_hw: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """Positional table for a ``(h, w)`` patch grid: the stored one if it matches, else resampled."""
        side = self.cfg.grid_size
        if grid_hw == (side, side):
            return self.pos_embed  # DINOv2 returns the table itself, in its own dtype
        resized = interpolate_pos_embed(self.pos_embed, grid_hw, antialias=self.cfg.antialias, offset=self.cfg.offset)
        return resized.to(dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + R + h*w, D)."""
        grid_hw = self._check_images(x)
        tokens = self.patch_embed(x)
        self._check_masks(masks, tokens.shape[0], tokens.shape[1])
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(grid_hw, tokens.dtype)
        if self.register_tokens is None:
            return tokens
        registers = self.register_tokens
        if self.register_pos_embed is not None:
            registers = registers + self.register_pos_embed
        registers = registers.expand(tokens.shape[0], -1, -1)
        return torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)

    def _split_outputs(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        cls, registers, patches = self.layout.split(self.norm(x))
        return {
            "x_norm_clstoken": cls,
            "x_norm_regtokens": registers,
            "x_norm_patchtokens": patches,
            "x_prenorm": x,
            "masks": masks,
        }

    # ---------------------------------------------------------------- forward
    def forward_features(
        self, x: Tensor | list[Tensor], masks: Tensor | list[Tensor | None] | None = None
    ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """DINOv2's outputs for a batch, or a list of them for a list of batches (multi-crop)."""
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(list(x), masks)
        tokens = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self._split_outputs(tokens, masks)

    def forward_features_list(
        self, xs: list[Tensor], masks: list[Tensor | None] | None = None
    ) -> list[dict[str, Tensor | None]]:
        """Several batches at different resolutions (e.g. 2 global + 8 local crops) in one pass.

        Tokens of all batches are packed so norms, projections and FFNs run once; attention runs
        once per batch. Outputs equal running each batch separately (up to float rounding).
        """
        masks = self._masks_per_batch(xs, masks)
        per_batch = [self.prepare_tokens_with_masks(x, m) for x, m in zip(xs, masks, strict=True)]
        groups = [(t.shape[0], t.shape[1]) for t in per_batch]
        packed = torch.cat([t.reshape(-1, self.embed_dim) for t in per_batch])
        for blk in self.blocks:
            packed = blk(packed, groups)
        outs = packed.split([b * n for b, n in groups])
        return [self._split_outputs(out.view(b, n, -1), m) for out, (b, n), m in zip(outs, groups, masks, strict=True)]

    @staticmethod
    def _masks_per_batch(xs: list[Tensor], masks: list[Tensor | None] | None) -> list[Tensor | None]:
        """One mask (or None) per batch of a multi-crop list, checked."""
        if not xs:
            raise ValueError("forward_features_list needs at least one batch of images")
        masks = [None] * len(xs) if masks is None else list(masks)
        if len(masks) != len(xs):
            raise ValueError(f"got {len(xs)} image batches but {len(masks)} masks; pass one per batch (or None)")
        return masks

    def forward(
        self, x: Tensor | list[Tensor], masks: Tensor | list | None = None, is_training: bool = False
    ) -> Tensor | dict | list[dict]:
        """DINOv2 semantics: the output dict(s) when ``is_training``, else the normalised CLS token."""
        out = self.forward_features(x, masks)
        if is_training:
            return out
        return self.head(out["x_norm_clstoken"])

    # ---------------------------------------------------------------- inspection
    def resolve_block(self, index: int, name: str = "layer") -> int:
        """A block index as users give it (``0..depth-1``, or ``-1..-depth`` from the end) -> ``0..depth-1``.

        ``name`` is the setting the index came from, for the error message."""
        depth = len(self.blocks)
        if isinstance(index, bool) or not isinstance(index, int) or not -depth <= index < depth:
            raise ValueError(
                f"{name}={index!r} is out of range for a {depth}-block model; use 0..{depth - 1} or -1..-{depth}"
            )
        return index % depth

    def resolve_blocks(self, n: int | Sequence[int], name: str = "blocks") -> list[int]:
        """DINOv2's convention: an int ``n`` means the last ``n`` blocks, a sequence lists block indices."""
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"{name}={n}: can take the last 1..{depth} blocks of this {depth}-block model")
            return list(range(depth - n, depth))
        return [self.resolve_block(i, name) for i in n]

    def iter_layers(
        self,
        x: Tensor,
        *,
        masks: Tensor | None = None,
        attention: bool | Sequence[int] = False,
        qkv: bool | Sequence[int] = False,
        mlp: bool | Sequence[int] = False,
        upto: int | None = None,
    ) -> Iterator[Layer]:
        """The residual stream layer by layer, as the forward computes it: layer 0 is the embedded input,
        layer ``l`` the output of block ``l - 1``. Nothing is kept, so a consumer can reduce each layer
        before the next is computed (telemetry on ViT-L would otherwise hold every layer's tokens).

        ``attention`` / ``qkv`` (True, or the block indices that need them) add the block's attention
        probabilities and qkv projection, computed beside the forward (``Block.inspect``): the tokens
        are exactly the configured kernel's. ``mlp`` adds the FFN's hidden activation after its nonlinearity
        (B, T, hidden): the neurons, as the forward computes them. ``upto`` stops after that many blocks."""
        tokens = self.prepare_tokens_with_masks(x, masks)
        yield Layer(0, tokens)
        depth = len(self.blocks) if upto is None else upto
        for i, blk in enumerate(self.blocks[:depth]):
            want_probs = attention is True or (attention is not False and i in attention)
            want_qkv = qkv is True or (qkv is not False and i in qkv)
            probs, sink, projected = (
                blk.inspect(tokens, want_probs, want_qkv) if want_probs or want_qkv else (None,) * 3
            )
            hidden: list[Tensor] = []
            want_mlp = mlp is True or (mlp is not False and i in mlp)
            handle = (
                blk.mlp.output_proj.register_forward_pre_hook(lambda _m, args, store=hidden: store.append(args[0]))
                if want_mlp
                else None
            )
            try:
                out = blk(tokens)
            finally:
                if handle is not None:
                    handle.remove()
            neurons = hidden[0].view(*tokens.shape[:2], -1) if hidden else None
            tokens = out
            yield Layer(i + 1, tokens, probs, projected, sink, neurons)

    def forward_intermediates(
        self,
        x: Tensor,
        blocks: int | Sequence[int] = 1,
        *,
        norm: bool = False,
        attention: bool | Sequence[int] = False,
        qkv: bool | Sequence[int] = False,
        mlp: bool | Sequence[int] = False,
    ) -> dict[int, Layer]:
        """The outputs of the chosen blocks (``resolve_blocks``: the last ``n``, or indices), keyed by
        block index, each a ``Layer`` (tokens through the final LayerNorm when ``norm``; attention
        probabilities, qkv and FFN neurons when asked: True for every chosen block, or some of them). Runs no
        block past the last one chosen."""
        wanted = self.resolve_blocks(blocks)
        asked = set(wanted)
        attention, qkv, mlp = (asked if flag is True else flag for flag in (attention, qkv, mlp))
        out = {}
        for layer in self.iter_layers(x, attention=attention, qkv=qkv, mlp=mlp, upto=max(wanted) + 1):
            block = layer.index - 1
            if block in asked:
                out[block] = dataclasses.replace(layer, tokens=self.norm(layer.tokens)) if norm else layer
        return {i: out[i] for i in wanted}

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
        return_register_tokens: bool = False,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (or of the given block indices), like DINOv2's.

        Patch tokens never include registers. Each element is the patch tensor (B, P, D) — or
        (B, D, h, w) with ``reshape`` — or a tuple ``(patches, cls[, registers])`` when
        ``return_class_token`` / ``return_register_tokens`` ask for more.
        """
        wanted = self.resolve_blocks(n, "n")
        h, w = self._check_images(x)
        layers = self.forward_intermediates(x, wanted, norm=norm)
        results = []
        for i in wanted:
            out = layers[i].tokens
            cls, registers, patches = self.layout.split(out)
            if reshape:
                patches = patches.reshape(out.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            extra = ([cls] if return_class_token else []) + ([registers] if return_register_tokens else [])
            results.append((patches, *extra) if extra else patches)
        return tuple(results)

    def edit(
        self, *, outputs: Mapping[int, TokenEdit] | None = None, neurons: Mapping[int, NeuronEdit] | None = None
    ) -> EditHandle:
        """Rewrite what blocks compute until the returned handle is removed (or its ``with`` ends):
        ``outputs[b]`` maps block ``b``'s output tokens (B, T, D) to their replacement, ``neurons[b]`` its FFN
        activation after the nonlinearity (B, T, hidden). Keys are block indices as ``resolve_block`` takes them.
        See ``vitreg.models.edits``::

            with model.edit(outputs={-1: lambda t: t * 0}):
                features = model.forward_features(images)
        """
        return attach_edits(
            self.blocks,
            {self.resolve_block(b, "outputs"): e for b, e in (outputs or {}).items()},
            {self.resolve_block(b, "neurons"): e for b, e in (neurons or {}).items()},
        )

    @torch.no_grad()
    def get_attention_maps(self, x: Tensor, blocks: int | Sequence[int] = -1) -> dict[int, Tensor]:
        """Attention probabilities (B, heads, T, T) of the given blocks (default: the last), over all
        tokens ``[CLS, registers, patches]``, computed through the math path beside the configured forward.
        """
        indices = [blocks] if isinstance(blocks, int) else blocks
        layers = self.forward_intermediates(x, indices, attention=True)
        return {i: layer.attention for i, layer in layers.items()}


@dataclass(frozen=True)
class Layer:
    """One layer of the residual stream (see ``VisionTransformer.iter_layers``)."""

    index: int  # 0: the embedded input; l: the output of block l - 1
    tokens: Tensor  # (B, T, D) in the layout [CLS, registers, patches]
    attention: Tensor | None = None  # (B, H, T, T) probabilities inside block index - 1
    qkv: Tensor | None = None  # (B, T, 3, D): q, k, v of block index - 1, heads concatenated
    sink_attention: Tensor | None = None  # (B, H, T) probability each query puts on the attention-bias sink
    mlp_hidden: Tensor | None = None  # (B, T, hidden): block index - 1's FFN activation after its nonlinearity


def build_vit(name: str | ViTConfig, **overrides) -> VisionTransformer:
    """``build_vit("vitl", num_register_tokens=4)``, or from a ``ViTConfig``."""
    if isinstance(name, ViTConfig):
        if overrides:
            raise ValueError("pass overrides either in the ViTConfig or as keywords with a size name, not both")
        return VisionTransformer(name)
    return VisionTransformer(vit_config(name, **overrides))
