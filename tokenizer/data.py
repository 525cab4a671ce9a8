"""Images for code extraction: a sorted ImageFolder listing, ADM center crop, flip and ten-crop views.

Views of an image (A of them, view 0 always the plain center crop C):
    plain         [C]                                                   A = 1
    flip          [C, flip(C)]                                          A = 2
    tencrop       P = [C, TL, TR, BL, BR];                  [*P, *flip(P)]   A = 10
    tencrop_flip  P = [C, TL, TR, BL, BR, C', T, B, L, R];  [*P, *flip(P)]   A = 20
C is the ADM center crop at image_size. The other crops are image_size squares cut from the ADM center crop
at int(image_size * crop_range) (LlamaGen's ten-crop, crop_range 1.1): its corners TL..BR, its center C',
and the middles of its edges T, B, L, R. `tencrop` is LlamaGen's TenCrop with its zoomed center replaced by
C, so that view 0 stays the plain crop; `tencrop_flip` adds the zoomed center and the four edge crops.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from tokenizer.common import validate as v
from tokenizer.common.errors import MissingFileError

NUM_VIEWS = {"plain": 1, "flip": 2, "tencrop": 10, "tencrop_flip": 20}


def num_views(views: str) -> int:
    """The number of views of the `data.views` setting `views`, or a ConfigError naming the settings there are."""
    return NUM_VIEWS[v.choice(views, "data.views", sorted(NUM_VIEWS))]


def list_images(root: str | Path) -> tuple[list[str], list[int], list[str]]:
    """(relative file paths, labels, class names) in torchvision ImageFolder order, extensions included."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"data.root {root} is not a directory")
    classes, class_to_idx = find_classes(root)
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    files = [Path(path).relative_to(root).as_posix() for path, _ in samples]
    return files, [label for _, label in samples], classes


def files_fingerprint(root: str | Path, files: list[str], labels: list[int]) -> str:
    """sha256 of every (path, label, size in bytes): a renamed, moved, added or rewritten file changes it."""
    h = hashlib.sha256()
    for name, label in zip(files, labels):
        h.update(f"{name}\t{label}\t{os.path.getsize(Path(root) / name)}\n".encode())
    return h.hexdigest()


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM's center crop: halve with BOX while the short side is >= 2 * size, bicubic to short side = size, crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> float (3, H, W) in [-1, 1], as ToTensor then Normalize(0.5, 0.5)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return (x - 0.5) / 0.5


def image_views(image: Image.Image, image_size: int, views: str, crop_range: float = 1.1) -> torch.Tensor:
    """The views (A, 3, S, S) of one RGB image in [-1, 1], ordered as in the module docstring."""
    num_views(views)
    crops = [center_crop_arr(image, image_size)]
    if views.startswith("tencrop"):
        big = center_crop_arr(image, int(image_size * crop_range))
        B, S = big.size[0], image_size
        # Left/top offsets as torchvision's five_crop: corners flush, center at round((B - S) / 2).
        far, mid = B - S, int(round((B - S) / 2.0))
        offsets = [(0, 0), (far, 0), (0, far), (far, far)]  # TL, TR, BL, BR as (x, y)
        if views == "tencrop_flip":
            offsets += [(mid, mid), (mid, 0), (mid, far), (0, mid), (far, mid)]  # C', T, B, L, R
        crops += [big.crop((x, y, x + S, y + S)) for x, y in offsets]
    x = torch.stack([_to_tensor(c) for c in crops])  # (P, 3, S, S)
    if views != "plain":
        x = torch.cat([x, x.flip(-1)])  # (2P, 3, S, S)
    return x


class ImageViews(Dataset):
    """(index, views (A, 3, S, S) in [-1, 1], label, error) of image `index` in ImageFolder order.

    An image that cannot be read comes back as zeros with `error` set to a message naming its file, so the
    caller decides whether to stop or skip (DataLoader workers would otherwise wrap the exception).
    """

    def __init__(self, root: str | Path, image_size: int, views: str = "plain", crop_range: float = 1.1,
                 files: list[str] | None = None, labels: list[int] | None = None):
        self.num_views = num_views(views)
        if crop_range < 1.0:
            raise ValueError(f"data.crop_range={crop_range} must be >= 1")
        self.root = Path(root)
        if files is None:
            files, labels, _ = list_images(root)
        self.files, self.labels = files, labels
        self.image_size, self.views, self.crop_range = image_size, views, crop_range

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, int, str]:
        path = self.root / self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")  # also forces the full decode, so truncated files fail here
            x = image_views(image, self.image_size, self.views, self.crop_range)
        except Exception as e:  # PIL raises several types for corrupt data
            S = self.image_size
            return index, torch.zeros(self.num_views, 3, S, S), self.labels[index], f"{path}: {type(e).__name__}: {e}"
        return index, x, self.labels[index], ""
