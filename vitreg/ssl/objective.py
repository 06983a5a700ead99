"""DINOv2's student–teacher objective (DINO + iBOT + KoLeo) for one batch, in pure PyTorch.

Follows ``dinov2/train/ssl_meta_arch.py::SSLMetaArch.forward_backward``: the teacher sees only the 2 global
crops, unmasked; the student sees global crops (masked, for iBOT and, as in DINOv2, even without it)
and local crops in one packed forward; DINO pairs cross views only; registers are never used by a loss.
A forward only stages the centre updates: the caller commits them once the step is accepted
(``commit_centers``) or drops them when it is skipped (``discard_centers``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitreg.models import VisionTransformer
from vitreg.ssl.config import CENTERINGS, SSLConfig
from vitreg.ssl.ema import assert_no_shared_storage
from vitreg.ssl.heads import DINOHead
from vitreg.ssl.losses import dino_loss, ibot_loss, koleo_loss
from vitreg.ssl.targets import Centering, sinkhorn_knopp
from vitreg.utils.distributed import all_reduce_


@dataclass
class MaskedTokens:
    """Where the iBOT tokens sit in the flattened (2B·N) global-crop patches, and their loss weights.

    With padding, ``indices`` and ``weights`` have ``upperbound`` entries: the tail points at token 0 with
    weight 0, ``valid`` marks the real ones and ``count`` (a host int) counts them. Unpadded, ``valid`` is None.
    """

    indices: Tensor
    weights: Tensor
    valid: Tensor | None
    count: int

    @classmethod
    def from_batch(cls, batch: dict, pad: bool) -> MaskedTokens:
        indices, weights = batch["mask_indices"], batch["masks_weight"]
        count = indices.shape[0]  # the shape is host metadata: no sync
        if not pad:
            return cls(indices, weights, None, count)
        extra = max(int(batch.get("upperbound", 0)) - count, 0)
        if extra:
            indices = torch.cat([indices, indices.new_zeros(extra)])
            weights = torch.cat([weights, weights.new_zeros(extra)])
        return cls(indices, weights, weights > 0, count)  # every real token has weight 1/#masked > 0


class LossTerms(nn.Module):
    """The weighted DINO, KoLeo and iBOT terms from head outputs and targets: one module without parameters,
    so ``vitreg.lit.compile`` can compile it from outside (static shapes once iBOT is padded)."""

    def __init__(self, cfg: SSLConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(
        self,
        s_global_cls: Tensor,
        s_global_logits: Tensor,
        s_local_logits: Tensor | None,
        dino_targets: Tensor,
        patch_logits: Tensor | None,
        ibot_targets: Tensor | None,
        masks_weight: Tensor | None,
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        terms: dict[str, Tensor] = {}
        if cfg.dino.loss_weight > 0:
            local, glob = dino_loss(s_global_logits, s_local_logits, dino_targets, cfg.student_temp)
            terms["dino_local_crops_loss"] = cfg.dino.loss_weight * local
            terms["dino_global_crops_loss"] = cfg.dino.loss_weight * glob
        if cfg.dino.koleo_loss_weight > 0:
            views = s_global_cls.chunk(2)
            terms["koleo_loss"] = cfg.dino.koleo_loss_weight * sum(koleo_loss(v) for v in views)
        if patch_logits is not None:
            terms["ibot_loss"] = cfg.ibot.loss_weight * ibot_loss(
                patch_logits, ibot_targets, masks_weight, n_images=len(s_global_cls), student_temp=cfg.student_temp
            )
        terms["loss"] = sum(terms.values(), s_global_cls.sum() * 0)
        return terms


class DINOv2Objective(nn.Module):
    """Holds student and teacher (``backbone``, ``dino_head`` [, ``ibot_head``]) and computes the loss."""

    def __init__(
        self,
        backbone: VisionTransformer,
        dino_head: DINOHead,
        ibot_head: DINOHead | None,
        cfg: SSLConfig,
    ) -> None:
        super().__init__()
        if cfg.centering not in CENTERINGS:
            raise ValueError(f"ssl.centering must be 'centering' or 'sinkhorn_knopp', got {cfg.centering!r}")
        self.cfg = cfg
        modules = {"backbone": backbone, "dino_head": dino_head}
        if ibot_head is not None:
            modules["ibot_head"] = ibot_head
        self.student = nn.ModuleDict(modules)
        self.teacher = copy.deepcopy(self.student)
        assert_no_shared_storage(self.teacher, self.student)
        self.teacher.backbone.without_stochastic_depth()  # DINOv2's teacher never drops paths
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        ibot_dim = (ibot_head or dino_head).out_dim
        self.losses = LossTerms(cfg)
        self.teacher_cls: Tensor | None = None  # the last batch's teacher CLS of the global crops, for probes
        if cfg.centering == "centering":
            self.dino_center = Centering(dino_head.out_dim, cfg.center_momentum)
            self.ibot_center = Centering(ibot_dim, cfg.center_momentum)

    @property
    def do_ibot(self) -> bool:
        return self.cfg.ibot.loss_weight > 0

    @property
    def masks_student(self) -> bool:
        """Whether the student's global crops are masked (always with iBOT; as DINOv2 also without)."""
        return self.do_ibot or self.cfg.ibot.mask_when_off

    def train(self, mode: bool = True) -> DINOv2Objective:
        super().train(mode)
        self.teacher.eval()  # always: no drop path, deterministic targets
        return self

    # ------------------------------------------------------------------ teacher
    def _targets(
        self,
        logits: Tensor,
        temp: float,
        center: str,
        total_count: Tensor | None = None,
        masked: MaskedTokens | None = None,
    ) -> Tensor:
        valid, n_valid = (masked.valid, masked.count) if masked is not None else (None, None)
        if self.cfg.centering == "centering":
            centering: Centering = getattr(self, center)
            probs = centering.targets(logits, temp)
            centering.stage_update(logits, valid, n_valid)  # after computing targets: DINOv2's one-step lag
            return probs
        return sinkhorn_knopp(logits, temp, self.cfg.sinkhorn_iterations, total_count=total_count, valid=valid)

    @torch.no_grad()
    def _teacher(self, batch: dict, temp: float, masked: MaskedTokens | None) -> tuple[Tensor, Tensor | None]:
        out = self.teacher.backbone.forward_features(batch["global_crops"])
        cls = out["x_norm_clstoken"]
        self.teacher_cls = cls.detach()  # (2B, D), crop-major; read by the online probes, never a loss
        patches = out["x_norm_patchtokens"].flatten(0, 1)[masked.indices] if masked is not None else None
        if patches is not None and "ibot_head" not in self.teacher:
            logits = self.teacher.dino_head(torch.cat([cls, patches]))
            cls_logits, patch_logits = logits[: len(cls)], logits[len(cls) :]
        else:
            cls_logits = self.teacher.dino_head(cls)
            patch_logits = self.teacher.ibot_head(patches) if patches is not None else None
        dino_targets = self._targets(cls_logits, temp, "dino_center")
        ibot_targets = None
        if patch_logits is not None:
            total = batch["n_masked_patches"].to(cls.device).sum()
            all_reduce_(total, "sum")  # SK normalises by the global number of masked tokens
            ibot_targets = self._targets(patch_logits, temp, "ibot_center", total_count=total, masked=masked)
        return dino_targets, ibot_targets

    # ------------------------------------------------------------------ student + losses
    def forward(self, batch: dict, teacher_temp: float) -> dict[str, Tensor]:
        """Loss terms (already weighted: what is optimised) and cheap collapse monitors. Stages the centre
        updates; call ``commit_centers`` or ``discard_centers`` after it."""
        cfg = self.cfg
        global_crops, local_crops = batch["global_crops"], batch.get("local_crops")
        has_local = local_crops is not None and local_crops.shape[0] > 0
        masked = MaskedTokens.from_batch(batch, cfg.ibot.pad_masked_tokens) if self.do_ibot else None
        dino_targets, ibot_targets = self._teacher(batch, teacher_temp, masked)

        masks = batch["masks"] if self.masks_student else None
        crops = [global_crops, local_crops] if has_local else [global_crops]
        outs = self.student.backbone.forward_features(crops, masks=[masks, None] if has_local else [masks])
        s_global_cls = outs[0]["x_norm_clstoken"]
        s_local_cls = outs[1]["x_norm_clstoken"] if has_local else s_global_cls[:0]
        head_in = [s_local_cls, s_global_cls]
        s_patches = None
        if masked is not None:
            s_patches = outs[0]["x_norm_patchtokens"].flatten(0, 1)[masked.indices]
            if "ibot_head" not in self.student:
                head_in.append(s_patches)
        sizes = [len(t) for t in head_in]
        logits = self.student.dino_head(torch.cat(head_in)).split(sizes)  # one head call, like DINOv2
        s_local_logits, s_global_logits = logits[0], logits[1]

        patch_logits = None
        if masked is not None:
            patch_logits = logits[2] if "ibot_head" not in self.student else self.student.ibot_head(s_patches)
        terms = self.losses(
            s_global_cls,
            s_global_logits,
            s_local_logits if has_local else None,
            dino_targets,
            patch_logits,
            ibot_targets,
            masked.weights if masked is not None else None,
        )
        terms.update(self._monitors(dino_targets))
        return terms

    @torch.no_grad()
    def _monitors(self, teacher_probs: Tensor) -> dict[str, Tensor]:
        """Collapse signals: per-sample teacher entropy (→0 means sharp, one-hot collapse) and the KL
        of the mean teacher distribution to uniform (→log K means everyone picks the same prototype)."""
        p = teacher_probs.float()
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        mean_p = p.mean(0)
        kl_uniform = (mean_p * (mean_p.clamp_min(1e-12) * mean_p.numel()).log()).sum()
        monitors = {"teacher_entropy": entropy, "teacher_kl_to_uniform": kl_uniform}
        if self.cfg.centering == "centering":
            monitors["center_norm"] = self.dino_center.next_center.norm()  # with this batch, once accepted
        return monitors

    # ------------------------------------------------------------------ step outcome
    def _centerings(self) -> list[Centering]:
        return [self.dino_center, self.ibot_center] if self.cfg.centering == "centering" else []

    def commit_centers(self) -> None:
        """The step is accepted: move the centres by the update its forward staged."""
        for centering in self._centerings():
            centering.commit()

    def discard_centers(self) -> None:
        """The step is skipped: its (maybe non-finite) batch never reaches the centres."""
        for centering in self._centerings():
            centering.discard()

    def loss_term_names(self) -> list[str]:
        names = []
        if self.cfg.dino.loss_weight > 0:
            names += ["dino_local_crops_loss", "dino_global_crops_loss"]
        if self.cfg.dino.koleo_loss_weight > 0:
            names.append("koleo_loss")
        if self.do_ibot:
            names.append("ibot_loss")
        return names
