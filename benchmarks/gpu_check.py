"""One script for a machine with a GPU (< 8 min): does epalm train there, and how fast would the paper run?

1. ``train``: a real single-GPU ``epalm train`` run (``python -m epalm train``) on a generated
   COCO-format captioning dataset (640x480 JPEGs, ``dataset_coco.json``), a random OPT-350m-sized LM
   with a locally trained BPE tokenizer and a random ViT-B/16, bf16, images through DataLoader
   workers with the release's augmentation, one epoch (a few optimizer steps) then the per-epoch
   evaluation (generation + BLEU/CIDEr). Reports wall time, steps, samples/s of the logged steps.
2. ``speed``: ``bench_speed.py --lm facebook/opt-2.7b --batch 64`` (train / eval / greedy / beam
   ratios against the bare LM).
3. ``data``: ``bench_data.py`` (training-transform samples/s per worker, workers to feed 1,000/s).
4. ``encoder``: ViT-B/16 forward images/s at batch 64 (bf16) on the device (bench_speed excludes it).
5. ``projection``: wall time of the 8-epoch VQA v2 recipe (443K questions, batch 64, OPT-2.7B + ViT-B/16):
   ``8 * 443,757 / min(1 / (1/lm_train + 1/encoder), data_per_core * workers)``, evaluation excluded.

Each part runs in its own process; a failing part is reported (``ok: false`` + the end of its log)
and the others still run. Prints one JSON line, also written to ``--out`` (atomically).

    python benchmarks/gpu_check.py                       # on the GPU machine
    python benchmarks/gpu_check.py --tiny --device cpu   # CI: tiny sizes, same code path
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import OUT_DIR, machine_info, pick_device  # noqa: E402

ROOT = HERE.parent
VQA_TRAIN_QUESTIONS = 443_757  # VQA v2 train questions (the paper's "100% (443K)")
EPOCHS = 8
CAPTIONS = ["a {} picture with soft stripes", "the image is mostly {}", "a flat {} field", "some {} waves"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "grey", "pink"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models and data: runs on CPU in a minute")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    ap.add_argument("--parts", default="train,speed,data,encoder")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers of the train run "
                                                               "(default min(8, cores - 1))")
    ap.add_argument("--keep", default=None, help="keep the generated data and run in this folder")
    args = ap.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    return args


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _env() -> dict:
    env = dict(os.environ, EPALM_NO_REEXEC="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def run_part(cmd: list[str], timeout: float) -> tuple[bool, str, float]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
        ok, log = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        ok, log = False, f"timed out after {timeout} s\n{(e.stdout or b'')[-2000:]!r}"
    return ok, log, time.perf_counter() - t0


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


# ----------------------------------------------------------------------------- 1. the training run
def build_assets(root: Path, tiny: bool) -> dict:
    """COCO-format data, a BPE tokenizer + random OPT-350m-sized LM, a random ViT-B/16, saved locally."""
    from PIL import Image
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, ViTConfig, ViTModel

    from epalm.core.presets import encoder_config, lm_config

    n_train, n_test = (16, 4) if tiny else (192, 64)
    w, h = (64, 48) if tiny else (640, 480)
    rng = np.random.default_rng(0)
    images, corpus = [], []
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n_train + n_test):
        split, sub = ("train", "train2014") if i < n_train else ("test", "val2014")
        colour = COLOURS[i % len(COLOURS)]
        base = np.stack([np.sin(xx * 0.02 + i) * 60 + 40 * (i % 3), np.cos(yy * 0.03) * 60 + 128,
                         np.full_like(xx, 30.0 * (i % 8))], -1)
        arr = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        name = f"COCO_{sub}_{i + 1:012d}.jpg"
        (root / "COCO/images" / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / "COCO/images" / sub / name, format="JPEG", quality=90)
        sentences = [c.format(colour) for c in CAPTIONS]
        corpus += sentences
        images.append({"filepath": sub, "filename": name, "split": split, "cocoid": i + 1,
                       "sentences": [{"raw": s} for s in sentences]})
    (root / "COCO/dataset_coco.json").write_text(json.dumps({"images": images}))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    lm_dir = root / "lm"
    tokenizer.save_pretrained(lm_dir)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if tiny:
        cfg = OPTConfig(hidden_size=32, num_hidden_layers=4, ffn_dim=64, num_attention_heads=4, vocab_size=len(tokenizer),
                        max_position_embeddings=128, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0, **ids)
    else:
        cfg = lm_config("facebook/opt-350m")  # the real architecture, random weights
        for k, v in ids.items():
            setattr(cfg, k, v)
    torch.manual_seed(0)
    lm = OPTForCausalLM(cfg)
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(lm_dir)
    vit_cfg = (ViTConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                         image_size=16, patch_size=8) if tiny else encoder_config("vit_base_patch16_224"))
    ViTModel(vit_cfg, add_pooling_layer=False).save_pretrained(root / "vit")
    return {"data": root, "lm": str(lm_dir), "encoder": str(root / "vit"), "train": n_train, "test": n_test,
            "image_size": (w, h), "encoder_layers": 2 if tiny else 6}


def train_part(work: Path, args, device: torch.device) -> dict:
    import yaml

    t0 = time.perf_counter()
    assets = build_assets(work / "assets", args.tiny)
    build_s = time.perf_counter() - t0
    workers = args.workers if args.workers is not None else (1 if args.tiny else max(1, min(8, cores() - 1)))
    batch = 4 if args.tiny else 32
    out = work / "run"
    cfg = {
        "model": {"lm": assets["lm"], "encoder": assets["encoder"], "variant": "epalm",
                  "num_encoder_layers": assets["encoder_layers"], "prompt_len": 10},
        "data": {"dataset": "coco", "root": str(assets["data"]), "train_split": "train", "eval_split": "test",
                 "image_size": 16 if args.tiny else 224, "augment": True},
        "train": {"output_dir": str(out), "epochs": 1, "batch_size": batch, "log_every": 1, "seed": 0,
                  "num_workers": workers, "cpu": device.type == "cpu",
                  "mixed_precision": "bf16" if device.type == "cuda" else "no"},
        "eval": {"batch_size": 16 if args.tiny else 64, "html_examples": 5, "caption_metrics": ["BLEU", "CIDEr"],
                 "generation": {"max_new_tokens": 5, "num_beams": 1}},
    }
    path = work / "gpu_check.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ok, log, wall = run_part([sys.executable, "-m", "epalm.interface.cli", "train", str(path)], timeout=300)
    result = {"ok": ok, "wall_s": wall, "build_assets_s": build_s, "num_workers": workers, "batch": batch,
              "train_images": assets["train"], "eval_images": assets["test"], "jpeg_size": assets["image_size"],
              "lm": "random opt-350m architecture" if not args.tiny else "tiny opt",
              "encoder": "random vit_base_patch16_224" if not args.tiny else "tiny vit"}
    rows = []
    metrics = out / "metrics.csv"
    if metrics.exists():
        import csv

        rows = list(csv.DictReader(metrics.open()))
    result["steps"] = len(rows)
    if rows:
        result["samples_per_s_last"] = float(rows[-1]["samples_per_s"])
        result["loss_first_last"] = [float(rows[0]["loss"]), float(rows[-1]["loss"])]
    ev = out / "eval_epoch0" / "metrics.json"
    result["evaluated"] = ev.exists()
    if ev.exists():
        result["eval_metrics"] = {k: v for k, v in json.loads(ev.read_text()).items() if isinstance(v, (int, float))}
    result["checkpoint"] = (out / "checkpoint" / "epalm_weights.safetensors").exists()
    result["ok"] = bool(ok and rows and result["evaluated"] and result["checkpoint"])
    if not result["ok"]:
        result["log_tail"] = log[-3000:]
    return result


# ----------------------------------------------------------------------------- 2-4
def speed_part(work: Path, args, device: torch.device) -> dict:
    cmd = [sys.executable, str(HERE / "bench_speed.py"), "--out", str(work / "speed.json"), "--device", device.type]
    cmd += ["--tiny"] if args.tiny else ["--lm", "facebook/opt-2.7b", "--batch", "64"]
    ok, log, wall = run_part(cmd, timeout=360)
    report = last_json(log) if ok else None
    out = {"ok": bool(report), "wall_s": wall}
    if report:
        out.update({k: report[k] for k in ("lm", "batch", "dtype", "ratios", "meets_target", "samples_per_s",
                                           "peak_mem_mb") if k in report})
    else:
        out["log_tail"] = log[-3000:]
    return out


def data_part(work: Path, args, device: torch.device) -> dict:
    cmd = [sys.executable, str(HERE / "bench_data.py"), "--out", str(work / "data.json"), "--device", device.type]
    cmd += ["--tiny"] if args.tiny else ["--images", "200", "--audios", "16", "--videos", "8",
                                         "--workers", f"0,1,{max(1, min(8, cores() - 1))}"]
    ok, log, wall = run_part(cmd, timeout=300)
    report = last_json(log) if ok else None
    out = {"ok": bool(report), "wall_s": wall}
    if report:
        out["results"] = {m: {k: r[k] for k in ("by_workers", "per_core_samples_per_s", "best_samples_per_s",
                                                 "workers_for_target")}
                          for m, r in report["results"].items()}
    else:
        out["log_tail"] = log[-3000:]
    return out


def encoder_part(args, device: torch.device) -> dict:
    from transformers import ViTConfig, ViTModel

    from epalm.core.encoders import wrap_hf_encoder
    from epalm.core.presets import encoder_config

    cfg = (ViTConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                     image_size=16, patch_size=8) if args.tiny else encoder_config("vit_base_patch16_224"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    enc = wrap_hf_encoder(ViTModel(cfg, add_pooling_layer=False).eval(), num_layers=6 if not args.tiny else 2)
    enc = enc.to(device, dtype)
    batch = 8 if args.tiny else 64
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
    with torch.no_grad():
        for _ in range(2):
            enc(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reps = 3 if args.tiny else 10
        for _ in range(reps):
            enc(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"ok": True, "images_per_s": batch * reps / dt, "batch": batch, "dtype": str(dtype).replace("torch.", "")}


def projection(parts: dict) -> dict | None:
    speed, data, enc = parts.get("speed", {}), parts.get("data", {}), parts.get("encoder", {})
    if not (speed.get("ok") and enc.get("ok")):
        return None
    lm = speed["samples_per_s"]["epalm"]["train"]  # connectors + frozen LM, cached features
    gpu = 1.0 / (1.0 / lm + 1.0 / enc["images_per_s"])
    workers = max(1, min(8, cores() - 1))
    feed = None
    if data.get("ok") and "image" in data["results"]:
        per_core = data["results"]["image"]["per_core_samples_per_s"]
        feed = per_core * workers if per_core else None
    rate = min(gpu, feed) if feed else gpu
    seconds = EPOCHS * VQA_TRAIN_QUESTIONS / rate
    return {"recipe": "vqa_v2 8 epochs, 443,757 questions, batch 64, OPT-2.7B + ViT-B/16 (evaluation excluded)",
            "lm_train_samples_per_s": lm, "encoder_images_per_s": enc["images_per_s"],
            "gpu_samples_per_s": gpu, "data_workers": workers, "data_samples_per_s": feed,
            "bound": "data" if feed and feed < gpu else "gpu", "samples_per_s": rate,
            "hours": seconds / 3600, "release_v100_hours": 1.8 * 24}


def run(args) -> dict:
    device = pick_device(args.device)
    t0 = time.perf_counter()
    parts: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="epalm-gpu-check-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.parts:
            try:
                if name == "train":
                    parts[name] = train_part(work, args, device)
                elif name == "speed":
                    parts[name] = speed_part(work, args, device)
                elif name == "data":
                    parts[name] = data_part(work, args, device)
                elif name == "encoder":
                    parts[name] = encoder_part(args, device)
                else:
                    raise SystemExit(f"--parts: unknown part {name!r}; use train, speed, data, encoder")
            except SystemExit:
                raise
            except Exception as e:  # report and go on: one JSON line whatever happens
                parts[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    machine = machine_info(device)
    return {"benchmark": "gpu_check", "tiny": args.tiny, "device": device.type,
            "device_name": machine["device_name"], "ok": all(p.get("ok") for p in parts.values()),
            "parts": parts, "projection": projection(parts), "wall_s": time.perf_counter() - t0,
            "machine": machine, "torch": torch.__version__}


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    from epalm.io import atomic_write_json

    out = Path(args.out) if args.out else OUT_DIR / f"gpu-check-{report['device']}{'-tiny' if args.tiny else ''}.json"
    atomic_write_json(out, report)
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
