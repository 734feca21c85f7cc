"""Videos: PyAV decoding of a few uniformly spread frames.

The video is cut into ``num_frames`` equal segments and one frame is taken per segment: a random
one when training (the release's ``sample='rand'``), the middle one otherwise (``'middle'``). Only
the chosen frames are converted to RGB, so long clips cost a decode pass but little memory.
PyAV is an optional dependency (``pip install av``).

Frames are converted with a colour converter owned by this process and thread
(:func:`_frame_to_image`), not PyAV's ``frame.to_image()``: PyAV >= 18 keeps one threaded swscale
context per thread, and a DataLoader worker forked after the parent converted a frame inherits that
context without its threads, then waits for them forever.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from epalm.errors import MediaError
from epalm.data.image import RELEASE_MEAN, RELEASE_STD, ImageTransform

__all__ = ["sample_frame_indices", "read_video_frames", "VideoLoader"]


def sample_frame_indices(
    num_frames: int, num_available: int, train: bool = False, generator: torch.Generator | None = None
) -> list[int]:
    """``num_frames`` sorted indices in ``[0, num_available)``, one per equal segment.

    Segment ``i`` is ``[floor(i*n/k), floor((i+1)*n/k))``; train picks uniformly inside it, eval picks
    its middle. Videos shorter than ``num_frames`` repeat frames, so the count is always exact.
    """
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    if num_available < 1:
        raise ValueError("a video needs at least one frame")
    out = []
    for i in range(num_frames):
        lo = math.floor(i * num_available / num_frames)
        hi = max(lo + 1, math.floor((i + 1) * num_available / num_frames))
        if train:
            out.append(int(torch.randint(lo, hi, (), generator=generator)))
        else:
            out.append((lo + hi - 1) // 2)
    return out


def _import_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - exercised only without PyAV
        raise ImportError("reading videos needs PyAV: pip install 'av>=12' (or epalm[video])") from e
    return av


_converters: dict[tuple[int, int], object] = {}  # (process id, thread id) -> VideoReformatter


def _frame_to_image(frame) -> Image.Image:
    """``frame`` as an RGB PIL image, through a swscale context created in this process and thread.

    A context made before a ``fork`` is never used in the child (its slice threads are gone there),
    nor freed: freeing it joins those threads, which also waits forever. It stays in the dict.
    """
    key = (os.getpid(), threading.get_ident())
    reformatter = _converters.get(key)
    if reformatter is None:
        from av.video.reformatter import VideoReformatter

        reformatter = _converters[key] = VideoReformatter()
    rgb = reformatter.reformat(frame, format="rgb24")
    plane = rgb.planes[0]
    width, height, stride = rgb.width, rgb.height, plane.line_size
    rows = np.frombuffer(plane, dtype=np.uint8, count=height * abs(stride)).reshape(height, abs(stride))
    if stride < 0:  # bottom-up rows: the buffer starts at the last display row
        rows = rows[::-1]
    return Image.fromarray(np.ascontiguousarray(rows[:, : width * 3]).reshape(height, width, 3), "RGB")


def _count_frames(container, stream) -> int:
    """Frame count from the header, or by demuxing packets (no decoding) when the header lacks it."""
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    n = sum(1 for p in container.demux(stream) if p.size > 0)
    container.seek(0)
    return n


def read_video_frames(
    path: str | Path,
    num_frames: int = 8,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> list[Image.Image]:
    """Decode ``num_frames`` frames of ``path`` as RGB PIL images (see :func:`sample_frame_indices`).

    If the stream holds fewer frames than its header says, indices past the end reuse the last
    decoded frame. Any decoding failure raises :class:`MediaError` naming the file.
    """
    av = _import_av()
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "file not found")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(path, "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            total = _count_frames(container, stream)
            if total < 1:
                raise MediaError(path, "no video frames")
            wanted = sample_frame_indices(num_frames, total, train, generator)
            needed = set(wanted)
            last_needed = max(wanted)
            picked: dict[int, Image.Image] = {}
            last = None
            for idx, frame in enumerate(container.decode(stream)):
                if idx in needed:
                    picked[idx] = _frame_to_image(frame)
                last = frame
                if idx >= last_needed:
                    break
            if last is None:
                raise MediaError(path, "no video frames decoded")
            fallback = picked[max(picked)] if picked else _frame_to_image(last)
            return [picked.get(i, fallback) for i in wanted]
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as e:
        raise MediaError(path, f"unreadable video ({type(e).__name__}: {e})") from e


class VideoLoader:
    """Media loader for videos: ``loader(path, train) -> (T, 3, size, size)`` float tensor.

    Training draws frame offsets at random inside their segments and applies one draw of the
    image augmentation to all frames; eval takes segment middles and only resizes.
    """

    modality = "video"

    def __init__(
        self,
        num_frames: int = 8,
        size: int = 224,
        mean: Sequence[float] = RELEASE_MEAN,
        std: Sequence[float] = RELEASE_STD,
        *,
        augment: bool = True,
    ) -> None:
        self.num_frames = num_frames
        self.eval_transform = ImageTransform(size, mean, std, train=False)
        self.train_transform = ImageTransform(size, mean, std, train=True)
        self.augment = augment

    def __call__(self, path: str | Path, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        frames = read_video_frames(path, self.num_frames, train=train, generator=generator)
        t = self.train_transform if (train and self.augment) else self.eval_transform
        return t(frames, generator=generator)
