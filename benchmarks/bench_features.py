"""Feature-caching throughput: frozen ViT-B/16 images/s, without and with JPEG decode + resize.

epalm can train from cached encoder features (``EPALM(..., encoder=None)`` + ``features=``); this
measures how fast the cache is filled. Random-init ViT-B/16 (``epalm.core.presets.encoder_config``,
transformers ``ViTModel`` wrapped by ``epalm.core.encoders.wrap_hf_encoder``: the 6 last [CLS]
tokens), nothing downloaded.

Stages (images/s, median over repeats after warmup):
  encoder      ``encoder(pixels)`` on a ready batch on the device (bf16 autocast on GPU)
  decode       the project's eval image path (``epalm.data.image.ImageLoader``: PIL decode of a
               JPEG file, RGB, bicubic resize to 224, normalise) on synthetic ``--jpeg-size`` JPEGs,
               one process
  serial       decode the batch, copy it to the device, encode it: no overlap (``--workers 0``)
  pipelined    ``torch.utils.data.DataLoader(num_workers=--workers)`` decoding while the device
               encodes (only with ``--workers > 0``)

``bound`` in the output names the slower stage: ``min(encoder, decode x workers)`` is the most a
pipelined cache fill can reach.

    python benchmarks/bench_features.py                          # CPU: batch 8, fp32
    python benchmarks/bench_features.py --device cuda --batch 256 --workers 8   # GPU: bf16
    python benchmarks/bench_features.py --tiny                   # CI smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    OUT_DIR,
    autocast,
    dtype_name,
    load_average,
    machine_info,
    measure_memory,
    pick_device,
    pick_dtype,
    release_cpu_heap_caching,
    safe_name,
    time_once,
)

ENCODER = "vit_base_patch16_224"


def build_encoder(name: str, device: torch.device, dtype: torch.dtype, tiny: bool):
    from transformers import ViTConfig, ViTModel

    from epalm.core.encoders import wrap_hf_encoder
    from epalm.core.presets import encoder_config

    if tiny:
        cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=224, patch_size=32, layer_norm_eps=1e-6)
    else:
        cfg = encoder_config(name)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        vit = ViTModel(cfg, add_pooling_layer=False)
    vit = vit.to(dtype)
    return wrap_hf_encoder(vit, num_layers=min(6, cfg.num_hidden_layers)), cfg


def synthetic_jpegs(folder: Path, count: int, size: tuple[int, int], quality: int = 90) -> list[Path]:
    """Photo-like JPEGs (smooth gradients + blobs + mild noise), COCO-sized by default."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(count):
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            fx, fy, ph = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.28)]
            img[..., c] = 127 + 90 * np.sin(fx * xx / w * 6.28 + ph) * np.cos(fy * yy / h * 6.28)
        for _ in range(6):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, min(w, h) / 3)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
            img += blob * rng.uniform(-80, 80, 3)
        img += rng.normal(0, 6, img.shape)
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=quality)
        paths.append(path)
    return paths


class _JpegSet(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], image_size: int) -> None:
        from epalm.data.image import ImageLoader

        self.paths, self.loader = paths, ImageLoader(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.loader(self.paths[i], train=False)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default=ENCODER, help="a name in epalm.core.presets.ENCODER_CONFIGS")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 256 on cuda, 8 on cpu)")
    ap.add_argument("--dtype", default="auto", help="bf16 | fp16 | fp32 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers for the pipelined stage (default: 0 on cpu, min(8, cores) on cuda)")
    ap.add_argument("--jpeg-size", default="640x480", help="WxH of the synthetic JPEGs (COCO-like default)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--tiny", action="store_true", help="2-layer hidden-32 ViT, batch 2, 1 repeat: CI smoke run")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/out/features-<encoder>-<device>.json)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.threads = args.threads or 1  # tiny ops: OpenMP threads only add contention
        args.batch = min(args.batch or 2, 2)
        args.repeats, args.warmup = 1, min(args.warmup, 1)
        args.jpeg_size = "160x120"
    try:
        w, h = (int(x) for x in args.jpeg_size.lower().split("x"))
    except ValueError:
        ap.error(f"--jpeg-size must look like 640x480, got {args.jpeg_size!r}")
    args.jpeg_wh = (w, h)
    return args


def run(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (256 if device.type == "cuda" else 8)
    workers = args.workers if args.workers is not None else (
        min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    load_before = load_average()
    encoder, cfg = build_encoder(args.encoder, device, dtype, args.tiny)
    size = cfg.image_size

    def med(fn) -> float:
        for _ in range(args.warmup):
            fn()
        return statistics.median(time_once(fn, device) for _ in range(args.repeats))

    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)

    @torch.no_grad()
    def encode(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            return encoder(x)

    out_shape = list(encode(pixels).shape)
    enc_ms = med(lambda: encode(pixels))

    stages: dict[str, dict] = {"encoder": {"ms_per_batch": enc_ms, "images_per_s": batch / enc_ms * 1e3}}
    report = {
        "benchmark": "features",
        "encoder": args.encoder if not args.tiny else "tiny-vit",
        "tiny": args.tiny,
        "device": device.type,
        "dtype": dtype_name(dtype),
        "batch": batch,
        "image_size": size,
        "output_shape": out_shape,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "workers": workers,
        "stages": stages,
    }
    try:
        import PIL
    except ImportError:
        report["jpeg"] = "skipped: Pillow is not installed"
        PIL = None
    if PIL is not None:
        with tempfile.TemporaryDirectory(prefix="epalm-bench-jpeg-") as tmp:
            paths = synthetic_jpegs(Path(tmp), batch, args.jpeg_wh)
            data = _JpegSet(paths, size)
            jpeg_kb = statistics.mean(p.stat().st_size for p in paths) / 1024

            def decode() -> torch.Tensor:
                return torch.stack([data[i] for i in range(len(data))])

            dec_ms = med(decode)
            stages["decode"] = {"ms_per_batch": dec_ms, "images_per_s": batch / dec_ms * 1e3, "processes": 1}

            def serial() -> None:
                encode(decode().to(device, dtype, non_blocking=True))

            ser_ms = med(serial)
            stages["serial"] = {"ms_per_batch": ser_ms, "images_per_s": batch / ser_ms * 1e3}
            if workers > 0:
                loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers,
                                                     pin_memory=device.type == "cuda",
                                                     persistent_workers=True)
                rounds = max(args.repeats, 2)

                def pipelined() -> None:
                    for _ in range(rounds):
                        for x in loader:
                            encode(x.to(device, dtype, non_blocking=True))

                pipe_ms = med(pipelined) / rounds
                stages["pipelined"] = {"ms_per_batch": pipe_ms, "images_per_s": batch / pipe_ms * 1e3,
                                       "workers": workers}
                del loader
        decode_capacity = stages["decode"]["images_per_s"] * max(workers, 1)
        enc_rate = stages["encoder"]["images_per_s"]
        report["jpeg_size"] = list(args.jpeg_wh)
        report["jpeg_mean_kb"] = jpeg_kb
        report["bound"] = {
            "stage": "decode" if decode_capacity < enc_rate else "encoder",
            "pipelined_ceiling_images_per_s": min(decode_capacity, enc_rate),
            "decode_processes_to_feed_encoder": enc_rate / stages["decode"]["images_per_s"],
            "note": ("decode = PIL JPEG decode + bicubic resize + normalise in one process; a pipelined "
                     "fill reaches at most min(encoder, decode x processes)"),
        }
    if device.type == "cpu":
        release_cpu_heap_caching()  # after the timings: RSS then follows live tensors
    report["encoder_peak_mem_mb"] = measure_memory(lambda: encode(pixels), device)["peak_mem_mb"]
    report["peak_mem_kind"] = ("cuda max_memory_allocated above the allocation at entry" if device.type == "cuda"
                               else "peak RSS above the RSS at entry (sampled every 1 ms, glibc caching off)")
    machine = machine_info(device)
    report["device_name"] = machine["device_name"]
    report["load_average"] = {"before": load_before, "after": load_average()}
    report["machine"] = machine
    report["torch"] = torch.__version__
    report["transformers"] = machine.get("transformers")
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    from epalm.io import atomic_write_json

    name = safe_name(report["encoder"])
    out = Path(args.out) if args.out else OUT_DIR / f"features-{name}-{report['device']}.json"
    atomic_write_json(out, report)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
