"""Images: decoding with PIL, eval resize, and the release's training augmentation in PIL only.

torchvision is not a dependency, so the few transforms the release uses (RandomResizedCrop with
scale (0.5, 1), horizontal flip, ALBEF's RandomAugment(2, 7)) are re-implemented here on PIL
images. Normalisation statistics are those of the *encoder*, passed in by the caller; the defaults
are the values hard-coded in the authors' release (CLIP's), which produced the paper's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from .errors import MediaError

__all__ = [
    "RELEASE_MEAN",
    "RELEASE_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_image",
    "to_tensor",
    "random_resized_crop_params",
    "RandAugment",
    "ImageTransform",
    "ImageLoader",
]

RELEASE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # what every eP-ALM release dataset normalises with
RELEASE_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BICUBIC = Image.Resampling.BICUBIC
_FILL = (128, 128, 128)


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Decode an image fully (truncated files fail here, not later) and convert it to ``mode`` (RGB)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "file not found")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MediaError(path, f"unreadable image ({type(e).__name__}: {e})") from e


def load_image_on_white(path: str | Path) -> Image.Image:
    """Decode an image as RGB with its transparent pixels made white (e.g. Tux Paint stamps)."""
    rgba = load_image(path, "RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Centre ``img`` on a square canvas of its longer side (aspect ratio kept)."""
    side = max(img.size)
    if img.size == (side, side):
        return img
    square = Image.new("RGB", (side, side), fill)
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return square


RESIZE_RULES = ("bicubic", "pad-square")


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [0, 1], then ``(x - mean) / std`` per channel."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def _rand(generator: torch.Generator | None = None) -> float:
    return float(torch.rand((), generator=generator))


def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop covering ``scale`` of the area (torchvision's algorithm)."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * _rand(generator))
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * _rand(generator))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            return left, top, w, h
    # fall back to a centre crop with the aspect ratio clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR, fillcolor=_FILL)


class RandAugment:
    """ALBEF/eP-ALM ``RandomAugment(N=2, M=7)``: N ops drawn uniformly, each applied with p=0.5.

    Magnitude ``m`` is on a 0..10 scale: brightness/sharpness factor ``1 + s*0.9*m/10``, shear
    ``s*0.3*m/10``, translation ``s*0.45*m/10`` of the side, rotation ``s*30*m/10`` degrees, with a
    random sign ``s``. Ops are drawn once by :meth:`sample` so a video can reuse them on every frame.
    """

    OPS = (
        "Identity",
        "AutoContrast",
        "Equalize",
        "Brightness",
        "Sharpness",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Rotate",
    )

    def __init__(self, n: int = 2, magnitude: float = 7, ops: Sequence[str] | None = None, p: float = 0.5) -> None:
        self.n, self.magnitude, self.p = n, magnitude, p
        self.ops = tuple(ops) if ops is not None else self.OPS
        unknown = set(self.ops) - set(self.OPS)
        if unknown:
            raise ValueError(f"unknown RandAugment ops {sorted(unknown)}; known: {self.OPS}")

    def sample(self, generator: torch.Generator | None = None) -> list[tuple[str, float]]:
        """Draw the ops to apply, each as (name, signed strength in [-1, 1])."""
        chosen = []
        for _ in range(self.n):
            name = self.ops[int(torch.randint(0, len(self.ops), (), generator=generator))]
            if _rand(generator) >= self.p:
                continue
            sign = 1.0 if _rand(generator) < 0.5 else -1.0
            chosen.append((name, sign * self.magnitude / 10.0))
        return chosen

    @staticmethod
    def apply(img: Image.Image, ops: list[tuple[str, float]]) -> Image.Image:
        """Apply ops drawn by :meth:`sample` to one RGB image."""
        for name, v in ops:
            w, h = img.size
            if name == "AutoContrast":
                img = ImageOps.autocontrast(img)
            elif name == "Equalize":
                img = ImageOps.equalize(img)
            elif name == "Brightness":
                img = ImageEnhance.Brightness(img).enhance(1.0 + 0.9 * v)
            elif name == "Sharpness":
                img = ImageEnhance.Sharpness(img).enhance(1.0 + 0.9 * v)
            elif name == "ShearX":
                img = _affine(img, (1, 0.3 * v, 0, 0, 1, 0))
            elif name == "ShearY":
                img = _affine(img, (1, 0, 0, 0.3 * v, 1, 0))
            elif name == "TranslateX":
                img = _affine(img, (1, 0, 0.45 * v * w, 0, 1, 0))
            elif name == "TranslateY":
                img = _affine(img, (1, 0, 0, 0, 1, 0.45 * v * h))
            elif name == "Rotate":
                img = img.rotate(30.0 * v, resample=Image.Resampling.BILINEAR, fillcolor=_FILL)
        return img

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        return self.apply(img, self.sample(generator))


class ImageTransform:
    """Eval: bicubic resize to ``size`` x ``size`` (``resize="pad-square"``: after padding the image
    to a white square, keeping its aspect ratio). Train (the release's recipe): random resized
    crop (scale 0.5-1), horizontal flip, RandAugment(2, 7). Both end with the encoder's mean/std.

    ``__call__`` takes one PIL image, or a list of frames that then share one draw of the random
    parameters (so a video is augmented consistently), and returns (3, H, W) or (T, 3, H, W).
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 224,
        mean: Sequence[float] = RELEASE_MEAN,
        std: Sequence[float] = RELEASE_STD,
        train: bool = False,
        *,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        randaugment: RandAugment | None = None,
        resize: str = "bicubic",
    ) -> None:
        if resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {RESIZE_RULES}, got {resize!r}")
        self.resize = resize
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean, self.std, self.train = tuple(mean), tuple(std), train
        self.crop_scale, self.hflip = crop_scale, hflip
        self.randaugment = randaugment if randaugment is not None else RandAugment()

    def __call__(
        self, image: Image.Image | Sequence[Image.Image], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        frames = [image] if isinstance(image, Image.Image) else list(image)
        if not frames:
            raise ValueError("ImageTransform got no image")
        if self.resize == "pad-square":  # white square around the image, then the same resize
            frames = [pad_to_square(f) for f in frames]
        w_h = self.size[1], self.size[0]  # PIL wants (width, height)
        if self.train:
            box = random_resized_crop_params(*frames[0].size, scale=self.crop_scale, generator=generator)
            flip = self.hflip and _rand(generator) < 0.5
            ops = self.randaugment.sample(generator)
            out = []
            for f in frames:
                left, top, w, h = box
                f = f.resize(w_h, _BICUBIC, box=(left, top, left + w, top + h))
                if flip:
                    f = f.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                out.append(self.randaugment.apply(f, ops))
            frames = out
        else:
            frames = [f.resize(w_h, _BICUBIC) for f in frames]
        tensors = [to_tensor(f, self.mean, self.std) for f in frames]
        return tensors[0] if isinstance(image, Image.Image) else torch.stack(tensors)


class ImageLoader:
    """Media loader for images: ``loader(path, train) -> (3, size, size)`` float tensor.

    ``background="white"`` composites transparent pixels on white before anything else.
    """

    modality = "image"

    def __init__(
        self,
        size: int = 224,
        mean: Sequence[float] = RELEASE_MEAN,
        std: Sequence[float] = RELEASE_STD,
        *,
        augment: bool = True,
        resize: str = "bicubic",
        background: str | None = None,
    ) -> None:
        if background not in (None, "white"):
            raise ValueError(f"background must be None or 'white', got {background!r}")
        self.eval_transform = ImageTransform(size, mean, std, train=False, resize=resize)
        self.train_transform = ImageTransform(size, mean, std, train=True, resize=resize)
        self.augment = augment
        self.background = background

    def __call__(self, path: str | Path, train: bool = False) -> torch.Tensor:
        img = load_image_on_white(path) if self.background == "white" else load_image(path)
        t = self.train_transform if (train and self.augment) else self.eval_transform
        return t(img)
