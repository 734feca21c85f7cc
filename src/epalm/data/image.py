"""Images: decoding with PIL, eval resize, and the release's training augmentation in PIL only.

torchvision and OpenCV are not dependencies, so the few transforms the release uses
(``dataset/__init__.py`` of mshukor/eP-ALM: RandomResizedCrop with scale (0.5, 1), horizontal flip,
ALBEF's ``RandomAugment(2, 7, isPIL=True, augs=[...])`` of ``dataset/randaugment.py``) are
re-implemented here on PIL images, op for op (see :class:`RandAugment`). Every random draw comes
from an optional ``torch.Generator``, so a sample's augmentation can be seeded by
(seed, epoch, index) whatever process loads it. Normalisation statistics are those of the *encoder*, passed in by the caller; the defaults
are the values hard-coded in the authors' release (CLIP's), which produced the paper's numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from epalm.errors import MediaError

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


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Decode an image fully (truncated files fail here, not later) and convert it to ``mode`` (RGB).

    16-bit images are scaled to 8 bits (PIL's ``convert`` would clip them: 20000 -> 255). An
    image over PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``, a possible decompression bomb) is a
    ``MediaError``, like any unreadable file, so ``on_error="skip"`` skips it.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img) if mode == "RGB" else img.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(path, f"image too large, refused as a possible decompression bomb ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MediaError(path, f"unreadable image ({type(e).__name__}: {e})") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, scaling 16-bit / 32-bit integer images (modes I;16*, I) to 8 bits instead of clipping."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 65535 -> 255
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    return img.convert("RGB")


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
    """(left, top, w, h) of a random crop covering ``scale`` of the area (torchvision's
    ``RandomResizedCrop.get_params``: same draws in the same order, top before left)."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * _rand(generator))
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * _rand(generator))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
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


# ----------------------------------------------------------------------------- RandomAugment
# The release's ops (ALBEF's randaugment.py, written with OpenCV on uint8 arrays) re-written on PIL
# images. Lookup-table ops use the release's exact formulas; geometric ops use PIL's bilinear
# affine transform with the matrices of OpenCV's ``warpAffine`` (forward map, pixel centres at
# integer coordinates), so they land on the same sampling points. Where the result can differ:
#  * bilinear weights: OpenCV quantises them to 1/32 and rounds, PIL computes them in float:
#    interior pixels of shears/rotations may differ by 1 grey level; integer translations are exact;
#  * borders: OpenCV blends an edge pixel with the fill value, PIL fills a sample point only
#    when it falls outside the image (and replicates the edge inside it);
#  * Sharpness: the release casts ``degenerate + f * (img - degenerate)`` to uint8 without
#    clipping (out-of-range values wrap on x86); here they are clipped to 0..255, as
#    ``PIL.ImageEnhance.Sharpness`` does;
#  * Brightness: the release truncates ``v * f`` (a uint8 cast); ``PIL.ImageEnhance.Brightness``
#    would round it. The release's table is used.

_FILL = (128, 128, 128)  # the release's replace_value
MAX_LEVEL = 10
TRANSLATE_CONST = 10  # pixels at level 10: translations are absolute (7 px at M=7), not a fraction of the side


def _lut(img: Image.Image, tables: Sequence[np.ndarray]) -> Image.Image:
    """Apply one 256-entry uint8 table per channel."""
    return img.point(np.concatenate([np.asarray(t, np.uint8) for t in tables]).tolist())


def _channels(img: Image.Image) -> list[np.ndarray]:
    arr = np.asarray(img)
    return [arr[..., c] for c in range(arr.shape[2])]


def autocontrast(img: Image.Image) -> Image.Image:
    """Per channel: stretch [min, max] to [0, 255], ``table = clip(v * 255/(hi-lo) - lo*255/(hi-lo))`` truncated."""
    tables = []
    for ch in _channels(img):
        lo, hi = int(ch.min()), int(ch.max())
        if hi <= lo:
            tables.append(np.arange(256))
            continue
        scale = 255 / (hi - lo)
        tables.append((np.arange(256) * scale - lo * scale).clip(0, 255).astype(np.uint8))
    return _lut(img, tables)


def equalize(img: Image.Image) -> Image.Image:
    """Per channel histogram equalisation, PIL's algorithm (``step = (sum(hist) - last nonzero bin) // 255``)."""
    tables = []
    for ch in _channels(img):
        hist = np.bincount(ch.ravel(), minlength=256)
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            tables.append(np.arange(256))
            continue
        n = np.concatenate([[step // 2], hist[:-1]])
        tables.append((np.cumsum(n) // step).clip(0, 255).astype(np.uint8))
    return _lut(img, tables)


def brightness(img: Image.Image, factor: float) -> Image.Image:
    """``table = uint8(clip(v * factor, 0, 255))`` (float32, truncated), as the release."""
    table = (np.arange(256, dtype=np.float32) * np.float32(factor)).clip(0, 255).astype(np.uint8)
    return _lut(img, [table] * len(img.getbands()))


def sharpness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with the 3x3 smoothing ``[[1,1,1],[1,5,1],[1,1,1]]/13`` (rounded to uint8); the
    1-pixel border is left as it is (the release's rule): ``out = deg + factor * (img - deg)``."""
    if factor == 1.0:
        return img
    arr = np.asarray(img)
    if arr.shape[0] < 3 or arr.shape[1] < 3:
        return img
    x = arr.astype(np.float32)
    acc = np.zeros_like(x[1:-1, 1:-1])
    for dy in range(3):
        for dx in range(3):
            acc += x[dy:dy + x.shape[0] - 2, dx:dx + x.shape[1] - 2]
    acc += 4 * x[1:-1, 1:-1]  # centre weight 5
    degenerate = np.rint(acc / 13).clip(0, 255)  # OpenCV's filter2D rounds (half to even) into uint8
    out = x.copy()
    out[1:-1, 1:-1] = degenerate + np.float32(factor) * (x[1:-1, 1:-1] - degenerate)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8), img.mode)


def _warp(img: Image.Image, forward: np.ndarray) -> Image.Image:
    """OpenCV-style ``warpAffine(img, forward)`` (a 2x3 forward map on pixel centres) with PIL.

    PIL wants the inverse map on continuous coordinates (pixel centres at +0.5)."""
    a = np.vstack([forward, [0.0, 0.0, 1.0]])
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])  # centre-based -> continuous
    inv = shift @ np.linalg.inv(a) @ np.linalg.inv(shift)
    matrix = tuple(float(round(v, 12)) for v in inv[:2].ravel())
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR,
                         fillcolor=_FILL)


def shear_x(img: Image.Image, factor: float) -> Image.Image:
    """``x' = x + factor * y`` (rows further down move right when factor > 0)."""
    return _warp(img, np.array([[1.0, factor, 0.0], [0.0, 1.0, 0.0]]))


def shear_y(img: Image.Image, factor: float) -> Image.Image:
    """``y' = y + factor * x``."""
    return _warp(img, np.array([[1.0, 0.0, 0.0], [factor, 1.0, 0.0]]))


def translate_x(img: Image.Image, offset: float) -> Image.Image:
    """Content moves ``offset`` pixels to the *left* (the release's ``M = [[1, 0, -offset], ...]``)."""
    return _warp(img, np.array([[1.0, 0.0, -offset], [0.0, 1.0, 0.0]]))


def translate_y(img: Image.Image, offset: float) -> Image.Image:
    """Content moves ``offset`` pixels up."""
    return _warp(img, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -offset]]))


def rotate(img: Image.Image, degrees: float) -> Image.Image:
    """Counter-clockwise by ``degrees`` about ``(W/2, H/2)`` in pixel-centre coordinates
    (``cv2.getRotationMatrix2D``'s centre, half a pixel from PIL's default)."""
    w, h = img.size
    cx, cy = w / 2, h / 2
    t = math.radians(degrees)
    a, b = round(math.cos(t), 15), round(math.sin(t), 15)
    return _warp(img, np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]]))


class RandAugment:
    """The release's ``RandomAugment(N=2, M=7, isPIL=True, augs=[...])``.

    ``N`` ops are drawn uniformly *with replacement* from ``ops``; each is applied with
    probability 0.5. Arguments at magnitude ``M`` (on a 0..10 scale):

    ============================  ============================================  ===========
    op                            argument                                       sign
    ============================  ============================================  ===========
    Identity, AutoContrast,       none
    Equalize
    Brightness, Sharpness         factor ``M/10 * 1.8 + 0.1`` (1.36 at M=7)      always +
    ShearX, ShearY                ``M/10 * 0.3`` (0.21)                           random
    TranslateX, TranslateY        ``M/10 * 10`` pixels (7 px)                     random
    Rotate                        ``M/10 * 30`` degrees (21)                      random
    ============================  ============================================  ===========

    Draws (from ``generator``): the N op indices, then per op ``u < 0.5 ? apply : skip`` and, for
    signed ops that apply, ``u > 0.5 ? -arg : arg`` (Rotate: ``u < 0.5 ? -arg : arg``). Ops are drawn
    once by :meth:`sample` so a video can reuse them on every frame.
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
    _FUNCS = {
        "AutoContrast": lambda img, _: autocontrast(img),
        "Equalize": lambda img, _: equalize(img),
        "Brightness": brightness,
        "Sharpness": sharpness,
        "ShearX": shear_x,
        "ShearY": shear_y,
        "TranslateX": translate_x,
        "TranslateY": translate_y,
        "Rotate": rotate,
    }

    def __init__(self, n: int = 2, magnitude: float = 7, ops: Sequence[str] | None = None, p: float = 0.5) -> None:
        self.n, self.magnitude, self.p = n, magnitude, p
        self.ops = tuple(ops) if ops is not None else self.OPS
        unknown = set(self.ops) - set(self.OPS)
        if unknown:
            raise ValueError(f"unknown RandAugment ops {sorted(unknown)}; known: {self.OPS}")

    def argument(self, name: str, generator: torch.Generator | None = None) -> float | None:
        """The release's ``level_to_args`` of ``name`` at this magnitude (draws the sign where it has one)."""
        level = self.magnitude / MAX_LEVEL
        if name in ("Brightness", "Sharpness"):
            return level * 1.8 + 0.1
        if name in ("ShearX", "ShearY"):
            return -level * 0.3 if _rand(generator) > 0.5 else level * 0.3
        if name in ("TranslateX", "TranslateY"):
            v = level * float(TRANSLATE_CONST)
            return -v if _rand(generator) > 0.5 else v
        if name == "Rotate":
            return -level * 30 if _rand(generator) < 0.5 else level * 30
        return None

    def sample(self, generator: torch.Generator | None = None) -> list[tuple[str, float | None]]:
        """Draw the ops to apply, each as (name, argument)."""
        names = [self.ops[int(torch.randint(0, len(self.ops), (), generator=generator))] for _ in range(self.n)]
        chosen = []
        for name in names:
            if _rand(generator) > self.p:
                continue
            chosen.append((name, self.argument(name, generator)))
        return chosen

    @classmethod
    def apply(cls, img: Image.Image, ops: list[tuple[str, float | None]]) -> Image.Image:
        """Apply ops drawn by :meth:`sample` (or given by hand) to one RGB image."""
        for name, arg in ops:
            fn = cls._FUNCS.get(name)
            if fn is not None:
                img = fn(img, arg)
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
                f = f.crop((left, top, left + w, top + h)).resize(w_h, _BICUBIC)  # torchvision: crop, then resize
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

    def __call__(self, path: str | Path, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        img = load_image_on_white(path) if self.background == "white" else load_image(path)
        t = self.train_transform if (train and self.augment) else self.eval_transform
        return t(img, generator=generator)
