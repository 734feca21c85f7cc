"""Can the input pipeline feed the GPU? Training-transform samples/s with 1 and N DataLoader workers.

Synthetic media, generated in a temporary folder (nothing downloaded):
  image  ``--images`` 640x480 JPEGs (smooth colour fields + noise, quality 90, ~COCO-sized files) through
         the image recipes' training loader: decode, random resized crop (0.5-1) to 224, flip, the
         release's RandomAugment(2, 7), normalise (``epalm.data.ImageLoader(augment=True)``)
  audio  ``--audios`` 10 s 16 kHz WAVs through the AST loader: resample check, Kaldi fbank
         (128 mel bins, 1024 frames), SpecAugment (``epalm.data.AudioLoader("ast")``)
  video  ``--videos`` 320x240 25 fps mpeg4 clips of ``--video-seconds`` s (written with PyAV) through the
         video QA loader: 8 frames via PyAV, one augmentation draw for all frames
         (``epalm.data.VideoLoader(num_frames=8)``)

Each sample is seeded by (seed, epoch, index) as in training (``epalm.data.loading.SeededSamples``).
``workers=0`` is the serial pipeline (the training process does it all); for ``workers >= 1`` a
persistent ``DataLoader`` (batch 16, prefetch 4) is started and warmed by one pass, then a second
pass is timed. ``per_core`` is the serial rate; ``workers_for_target`` = ceil(target / per_core), the
workers (one core each) it takes to feed ``--target`` samples/s (default 1,000: OPT-2.7B training
at batch 64 on one H100).

Prints one JSON line and writes it to ``--out`` (atomically; default ``benchmarks/out/data-<device>.json``).

    python benchmarks/bench_data.py                    # 300 images, 32 clips, 12 videos; workers 0,1,N
    python benchmarks/bench_data.py --workers 0,1,2,4,8
    python benchmarks/bench_data.py --tiny             # CI smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT_DIR, load_average, machine_info, pick_device  # noqa: E402

TARGET = 1000.0


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a few small files: CI smoke run")
    ap.add_argument("--device", default="cpu", help="only recorded (the pipeline runs on CPU cores)")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--audios", type=int, default=32)
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--video-seconds", type=float, default=4.0)
    ap.add_argument("--workers", default=None, help="comma-separated worker counts (default 0,1,<cores>)")
    ap.add_argument("--modalities", default="image,audio,video")
    ap.add_argument("--target", type=float, default=TARGET, help="samples/s to feed (default 1000)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.images, args.audios, args.videos, args.video_seconds = 8, 4, 2, 1.0
        args.workers = args.workers or "0,1,2"
    args.workers = [int(w) for w in (args.workers or f"0,1,{max(1, cores())}").split(",")]
    args.modalities = [m for m in args.modalities.split(",") if m]
    unknown = set(args.modalities) - {"image", "audio", "video"}
    if unknown:
        ap.error(f"--modalities: unknown {sorted(unknown)}; use image, audio, video")
    return args


# ----------------------------------------------------------------------------- synthetic media
def write_jpegs(folder: Path, n: int, size=(640, 480)) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0.005, 0.03, 3)
        base = np.stack([np.sin(xx * a + i) * 90 + 128, np.cos(yy * b + i) * 90 + 128,
                         np.sin((xx + yy) * c) * 90 + 128], -1)
        arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        p = folder / f"img{i:05d}.jpg"
        Image.fromarray(arr).save(p, format="JPEG", quality=90)
        paths.append(p)
    return paths


def write_wavs(folder: Path, n: int, seconds: float = 10.0, sr: int = 16000) -> list[Path]:
    import soundfile as sf

    rng = np.random.default_rng(1)
    t = np.arange(int(seconds * sr)) / sr
    paths = []
    for i in range(n):
        wav = 0.2 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.normal(size=t.shape)
        p = folder / f"clip{i:04d}.wav"
        sf.write(str(p), wav.astype(np.float32), sr)
        paths.append(p)
    return paths


def write_videos(folder: Path, n: int, seconds: float, size=(320, 240), fps: int = 25) -> list[Path]:
    import av

    rng = np.random.default_rng(2)
    w, h = size
    paths = []
    for i in range(n):
        p = folder / f"video{i:04d}.mp4"
        with av.open(str(p), "w") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for k in range(max(1, int(seconds * fps))):
                arr = np.clip(rng.normal(128, 40, (h // 8, w // 8, 3)), 0, 255).astype(np.uint8)
                arr = np.kron(arr, np.ones((8, 8, 1), np.uint8))
                arr = np.roll(arr, 2 * k, axis=1)
                for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- measurement
class MediaFiles(torch.utils.data.Dataset):
    """The training loader on a list of files, with the trainer's per-sample generator."""

    def __init__(self, paths: list[Path], loader) -> None:
        self.paths, self.loader = paths, loader

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, index: int, generator=None) -> torch.Tensor:
        return self.loader(self.paths[index], True, generator=generator)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.get(index)


def _worker_init(_):
    torch.set_num_threads(1)


def measure(dataset: MediaFiles, workers: int, batch: int) -> dict:
    from torch.utils.data import DataLoader

    from epalm.data.loading import EpochBatchSampler, SeededSamples
    from epalm.training.trainer import EpochOrder

    seeded = SeededSamples(dataset, seed=0)
    order = EpochOrder(len(dataset), batch, seed=0)
    if workers == 0:
        seeded[(0, 0)]  # warm caches (feature extractor tables, codecs)
        t0 = time.perf_counter()
        for i in range(len(dataset)):
            seeded[(1, i)]
        dt = time.perf_counter() - t0
        return {"samples_per_s": len(dataset) / dt, "seconds": dt, "samples": len(dataset)}
    sampler = EpochBatchSampler(order)
    loader = DataLoader(seeded, batch_sampler=sampler, collate_fn=torch.stack, num_workers=workers,
                        persistent_workers=True, prefetch_factor=4, worker_init_fn=_worker_init)
    sampler.set_position(0)
    for _ in loader:  # start the workers and warm them
        pass
    sampler.set_position(1)
    t0 = time.perf_counter()
    n = sum(len(b) for b in loader)
    dt = time.perf_counter() - t0
    del loader
    return {"samples_per_s": n / dt, "seconds": dt, "samples": n}


def run(args: argparse.Namespace) -> dict:
    from epalm.data import AudioLoader, ImageLoader, VideoLoader

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    load_before = load_average()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="epalm-bench-data-") as tmp:
        tmp = Path(tmp)
        plan = {}
        if "image" in args.modalities:
            plan["image"] = (write_jpegs(tmp, args.images, (160, 120) if args.tiny else (640, 480)),
                             ImageLoader(224, augment=True), "640x480 JPEG -> 224 crop + flip + RandomAugment(2, 7)")
        if "audio" in args.modalities:
            plan["audio"] = (write_wavs(tmp, args.audios, 2.0 if args.tiny else 10.0), AudioLoader("ast"),
                             "10 s 16 kHz WAV -> AST fbank 1024x128 + SpecAugment")
        if "video" in args.modalities:
            plan["video"] = (write_videos(tmp, args.videos, args.video_seconds, (64, 48) if args.tiny else (320, 240)),
                             VideoLoader(num_frames=8, augment=True),
                             f"{args.video_seconds:g} s 320x240 25 fps mpeg4 -> 8 frames 224 + augmentation")
        for name, (paths, loader, what) in plan.items():
            ds = MediaFiles(paths, loader)
            per = {str(w): measure(ds, w, args.batch) for w in args.workers}
            per_core = per[str(min(args.workers))]["samples_per_s"] if 0 in args.workers else None
            best = max(per.values(), key=lambda r: r["samples_per_s"])
            results[name] = {
                "pipeline": what,
                "files": len(paths),
                "mean_file_kb": float(np.mean([p.stat().st_size for p in paths]) / 1024),
                "by_workers": per,
                "per_core_samples_per_s": per_core,
                "best_samples_per_s": best["samples_per_s"],
                "workers_for_target": math.ceil(args.target / per_core) if per_core else None,
            }
    machine = machine_info(device)
    return {
        "benchmark": "data",
        "tiny": args.tiny,
        "device": device.type,
        "target_samples_per_s": args.target,
        "workers": args.workers,
        "batch": args.batch,
        "torch_threads_per_process": args.threads,
        "results": results,
        "definition": ("samples/s of the training transform (decode + augmentation) through a DataLoader; "
                       "workers 0 = serial in the training process; workers_for_target = "
                       "ceil(target / serial samples/s), one core per worker"),
        "load_average": {"before": load_before, "after": load_average()},
        "machine": machine,
        "torch": torch.__version__,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    from epalm.io import atomic_write_json

    out = Path(args.out) if args.out else OUT_DIR / f"data-{report['device']}{'-tiny' if args.tiny else ''}.json"
    atomic_write_json(out, report)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
