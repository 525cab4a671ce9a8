"""MergeVQ's distillation of the encoder's class token to a frozen DINOv2 teacher (taming/models/lfqgan_rep.py
`distill_cls_loss`): KL(softmax(teacher / T) || softmax(student / T)) averaged over the batch, times T^2.

The teacher is a transformers `Dinov2Model` read from a local directory (`save_pretrained` layout), never downloaded;
its `pooler_output` (the final layer norm's class token) is the target, as the official code's."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenizer.common.errors import MissingFileError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the teacher's view is normalised as timm's IMAGENET_DEFAULT_MEAN / STD
IMAGENET_STD = (0.229, 0.224, 0.225)


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), summed over classes, averaged over the batch, times T^2;
    student, teacher (B, C)."""
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    target = F.softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_student, target, reduction="batchmean") * temperature**2


class Teacher:
    """A frozen DINOv2 model: images (B, 3, H, W) in [-1, 1] -> its class token (B, hidden_size).

    Not an nn.Module on purpose: it is no part of the trained model, its checkpoints, DDP's parameters or the EMA;
    it follows the images to their device on its first call."""

    def __init__(self, path: str | os.PathLike, image_size: int):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise MissingFileError(f"loss.distill_teacher={path}: no DINOv2 model there (a directory with config.json "
                                   f"and weights, as Dinov2Model.save_pretrained writes; nothing is downloaded)")
        from transformers import Dinov2Model  # transformers takes seconds to import: only a distilling run pays

        self.model = Dinov2Model.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.width, self.image_size = self.model.config.hidden_size, image_size

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.model.to(x.device)
        x = (x.float() + 1) / 2
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        return self.model(pixel_values=(x - mean) / std).pooler_output
