"""End-to-end tests of the paper recipes (``epalm.recipes.run`` through ``epalm.interface.cli``) on fixture data.

Everything runs on CPU in seconds: a tiny BPE tokenizer trained on the fixture text is saved with a
tiny random OPT into one local folder (the recipe loads it with ``AutoTokenizer`` /
``AutoModelForCausalLM.from_pretrained``), tiny ViT / TimeSformer / AST encoders are saved to
folders, and the data root holds VQA v2 (Karpathy), COCO captions, MSRVTT-QA and AudioCaps in the
release's ``data/`` layout (flat-colour 16 px JPEGs, 2-4 frame mpeg4 videos, 1 s WAVs).

Also covered: ``epalm eval`` / ``epalm predict`` on the best checkpoint, the feature cache
(``epalm cache-features``; training with it equals training without; a changed preprocessing
is refused naming the field), exact resume through ``--resume``, and 2-process CPU DDP (gloo):
same weights as one process with the same global batch, and distributed evaluation that returns
every sample exactly once.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from epalm.interface import cli

torch.set_num_threads(1)

try:
    import av
except ImportError:  # pragma: no cover
    av = None
try:
    import soundfile as sf
except ImportError:  # pragma: no cover
    sf = None
needs_av = pytest.mark.skipif(av is None, reason="PyAV (pip install av) is not installed")
needs_sf = pytest.mark.skipif(sf is None, reason="soundfile (pip install soundfile) is not installed")

# =========================================================================== fixture data

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
QUESTION = "what color is it?"
VIDEO_QUESTION = "what color is the video?"
CAPTIONS = {name: [f"a {name} square", f"the picture is {name}", f"a flat {name} image"] for name in COLOURS}
SOUNDS = {"low": 220.0, "high": 1760.0}
SOUND_CAPTIONS = {"low": ["a low hum", "a deep low tone"], "high": ["a high beep", "a sharp high tone"]}


def write_image(path: Path, rgb, size: int = 16, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb, np.float32) + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=95)
    return path


def write_video(path: Path, rgb, n_frames: int = 3, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            arr = np.clip(np.array(rgb, np.int32) + 8 * i, 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.broadcast_to(arr, (size, size, 3)).copy(), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_wav(path: Path, freq: float, seconds: float = 1.0, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def coco_name(split: str, n: int) -> str:
    return f"COCO_{split}_{n:012d}.jpg"


def build_data(root: Path, n_train: int = 24, n_test: int = 12) -> dict:
    """The release's ``data/`` tree: VQA v2 Karpathy, COCO Karpathy captions, MSRVTT-QA, AudioCaps."""
    names = list(COLOURS)
    info: dict = {"root": root}
    # ---- VQA v2, Karpathy split (ALBEF style) + COCO images
    train, test = [], []
    for i in range(n_train):
        c = names[i % len(names)]
        write_image(root / "COCO/images/train2014" / coco_name("train2014", i + 1), COLOURS[c], seed=i)
        train.append({"question_id": 1000 + i, "question": QUESTION, "answer": [c],
                      "image": f"train2014/{coco_name('train2014', i + 1)}", "dataset": "vqa"})
    for i in range(n_test):
        c = names[i % len(names)]
        write_image(root / "COCO/images/val2014" / coco_name("val2014", i + 1), COLOURS[c], seed=100 + i)
        answers = [c] * 9 + ["orange"]  # 10 annotators, one of them off: chance stays 1/4
        test.append({"question_id": 2000 + i, "question": QUESTION, "answer": answers,
                     "image": f"val2014/{coco_name('val2014', i + 1)}", "dataset": "vqa",
                     "answer_type": "other"})
    write_json(root / "vqa/karpathy_train.json", train)
    write_json(root / "vqa/karpathy_test.json", test)
    info["vqa_test_image"] = root / "COCO/images/val2014" / coco_name("val2014", 1)
    info["vqa_test_colour"] = names[0]
    # ---- COCO captions (Karpathy dataset_coco.json) over the same images
    images = []
    for i in range(n_train):
        c = names[i % len(names)]
        images.append({"filepath": "train2014", "filename": coco_name("train2014", i + 1),
                       "split": "train" if i % 2 else "restval", "cocoid": 1 + i,
                       "sentences": [{"raw": s} for s in CAPTIONS[c]]})
    for i in range(8):
        c = names[i % len(names)]
        images.append({"filepath": "val2014", "filename": coco_name("val2014", i + 1), "split": "test",
                       "cocoid": 500 + i, "sentences": [{"raw": s} for s in CAPTIONS[c]]})
    write_json(root / "COCO/dataset_coco.json", {"images": images})
    # ---- MSRVTT-QA (official format: video_id N -> videoN.mp4)
    if av is not None:
        for split, ids in (("train", range(0, 8)), ("test", range(8, 13))):
            rows = []
            for vid in ids:
                c = names[vid % 2]  # red / green
                write_video(root / "MSRVTT/videos/all" / f"video{vid}.mp4", COLOURS[c], n_frames=2 + vid % 3)
                rows.append({"question": VIDEO_QUESTION, "answer": c, "video_id": vid, "id": 3000 + vid})
            write_json(root / f"MSRVTT/annotation/msrvtt_vqa_{split}.json", rows)
    # ---- AudioCaps (official CSV, rows grouped per clip)
    if sf is not None:
        for split, n in (("train", 6), ("test", 3)):
            rows = []
            for k in range(n):
                kind = list(SOUNDS)[k % 2]
                yid = f"{split}{k:02d}{kind}"
                write_wav(root / "audiocaps/audios" / split / f"{yid}.wav", SOUNDS[kind])
                for j, cap in enumerate(SOUND_CAPTIONS[kind]):
                    rows.append({"audiocap_id": len(rows) + 1, "youtube_id": yid, "start_time": 30, "caption": cap})
            path = root / "audiocaps/dataset" / f"{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["audiocap_id", "youtube_id", "start_time", "caption"])
                w.writeheader()
                w.writerows(rows)
    return info


def fixture_corpus() -> list[str]:
    text = [QUESTION, VIDEO_QUESTION, "</a>", *COLOURS]
    for caps in (*CAPTIONS.values(), *SOUND_CAPTIONS.values()):
        text += caps
    return text * 20


# =========================================================================== tiny models


def build_models(root: Path, corpus: list[str]) -> dict[str, str]:
    """Tokenizer + OPT in one folder; ViT, TimeSformer and AST folders. Returns their paths."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        ASTConfig,
        ASTModel,
        OPTConfig,
        OPTForCausalLM,
        PreTrainedTokenizerFast,
        TimesformerConfig,
        TimesformerModel,
        ViTConfig,
        ViTModel,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    lm_dir = root / "tiny-opt"
    tokenizer.save_pretrained(lm_dir)

    torch.manual_seed(0)
    lm = OPTForCausalLM(OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.4)  # so the tiny LM's logits respond to its prefix (see epalm.recipes.tiny)
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(lm_dir)

    small = dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    vit = ViTModel(ViTConfig(image_size=16, patch_size=8, **small), add_pooling_layer=False)
    vit.save_pretrained(root / "tiny-vit")
    # the same ViT saved with its (unused) pooler: loading it is deterministic, see
    # test_feature_cache_of_an_encoder_with_missing_weights
    torch.manual_seed(1)
    ViTModel(ViTConfig(image_size=16, patch_size=8, **small), add_pooling_layer=True).save_pretrained(
        root / "tiny-vit-pooler")
    torch.manual_seed(2)
    TimesformerModel(TimesformerConfig(image_size=16, patch_size=8, num_frames=2, **small)).save_pretrained(
        root / "tiny-timesformer")
    # the recipe's AudioLoader gives the release's (1024 frames, 128 mel bins) fbanks: keep that
    # input shape, make it cheap with non-overlapping 16x16 patches (8 x 64 = 512 tokens)
    torch.manual_seed(3)
    ASTModel(ASTConfig(num_mel_bins=128, max_length=1024, patch_size=16, frequency_stride=16, time_stride=16,
                       **small)).save_pretrained(root / "tiny-ast")
    return {"lm": str(lm_dir), "vit": str(root / "tiny-vit"), "vit_pooler": str(root / "tiny-vit-pooler"),
            "timesformer": str(root / "tiny-timesformer"),
            "ast": str(root / "tiny-ast")}


def build_assets(base: Path) -> dict:
    info = build_data(base / "data")
    info["models"] = build_models(base / "models", fixture_corpus())
    info["base"] = base
    return info


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    return build_assets(tmp_path_factory.mktemp("recipe"))


# =========================================================================== configs

FAST_OPTIM = {"lr": 3e-2, "warmup_lr": 1e-2, "min_lr": 3e-3, "prompt_lr": 1e-2, "weight_decay": 0.0}


def write_small_vqa_root(root: Path) -> tuple[list[dict], list[dict]]:
    """Write a VQA v2 Karpathy root of 8 train / 4 test single-colour images (QUESTION, colour
    answers) under ``root``; returns its (train, test) annotation records."""
    names = list(COLOURS)
    train, test = [], []
    for i in range(8):
        write_image(root / "COCO/images/train2014" / coco_name("train2014", i + 1), COLOURS[names[i % 4]], seed=i)
        train.append({"question_id": 10 + i, "question": QUESTION, "answer": names[i % 4],
                      "image": f"train2014/{coco_name('train2014', i + 1)}"})
    for i in range(4):
        write_image(root / "COCO/images/val2014" / coco_name("val2014", i + 1), COLOURS[names[i]], seed=50 + i)
        test.append({"question_id": 20 + i, "question": QUESTION, "answer": [names[i]] * 10,
                     "image": f"val2014/{coco_name('val2014', i + 1)}"})
    write_json(root / "vqa/karpathy_train.json", train)
    write_json(root / "vqa/karpathy_test.json", test)
    return train, test


def recipe(assets: dict, task: str, out: Path, **sections) -> dict:
    """A recipe dict for ``task`` (vqa | coco | msrvtt_qa | audiocaps) on the fixture data."""
    m = assets["models"]
    encoder = {"vqa": m["vit"], "coco": m["vit"], "msrvtt_qa": m["timesformer"], "audiocaps": m["ast"]}[task]
    data = {"vqa": {"dataset": "vqa_v2", "train_split": "karpathy_train", "eval_split": "karpathy_test"},
            "coco": {"dataset": "coco", "train_split": "train", "eval_split": "test"},
            "msrvtt_qa": {"dataset": "msrvtt_qa", "train_split": "train", "eval_split": "test", "num_frames": 2},
            "audiocaps": {"dataset": "audiocaps", "train_split": "train", "eval_split": "test"}}[task]
    cfg = {
        "model": {"lm": m["lm"], "encoder": encoder, "variant": "epalm", "num_encoder_layers": 2,
                  "prompt_len": 4},
        "data": {"root": str(assets["root"]), "image_size": 16, "augment": False, **data},
        "train": {"output_dir": str(out), "epochs": 2, "batch_size": 8, "log_every": 1, "cpu": True,
                  "seed": 0, "optim": dict(FAST_OPTIM)},
        "eval": {"batch_size": 16, "html_examples": 5,
                 "generation": {"max_new_tokens": 4 if task in ("vqa", "msrvtt_qa") else 6, "num_beams": 1}},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_cli(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def train_losses(run: Path) -> list[float]:
    with (run / "metrics.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def trainable(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "epalm_weights.safetensors"))


def check_run_outputs(run: Path, kind: str, epochs: int) -> dict:
    """The files every recipe run must leave; returns the metrics of the best epoch."""
    losses = train_losses(run)
    k = max(1, len(losses) // 4)
    assert np.mean(losses[-k:]) < np.mean(losses[:k]), losses
    for e in range(epochs):
        ev = run / f"eval_epoch{e}"
        metrics = json.loads((ev / "metrics.json").read_text())
        assert "score" in metrics
        preds = json.loads((ev / "predictions.json").read_text())
        assert isinstance(preds, list) and preds
        keys = {"question_id", "answer"} if kind == "qa" else {"image_id", "caption"}
        assert all(set(p) == keys for p in preds), preds[:3]
        assert all(isinstance(p[next(iter(keys - {"question_id", "image_id"}))], str) for p in preds)
        html = (ev / "examples.html").read_text()
        assert html.startswith("<!doctype html>") and "<table>" in html
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "best" / "epalm_config.json").is_file()
    assert (run / "best" / "epalm_weights.safetensors").is_file()
    best = json.loads((run / "best" / "metrics.json").read_text())
    return best


CHEAP_CAPTION_METRICS = ["BLEU", "ROUGE_L", "CIDEr"]  # METEOR's JVM alone costs ~12 s per evaluation
VQA_TRAIN = {"epochs": 25, "batch_size": 4, "optim": {**FAST_OPTIM, "lr": 1e-2}}


def best_epoch(run: Path) -> int:
    return json.loads((run / "best" / "metrics.json").read_text())["epoch"]


# =========================================================================== VQA: train, eval, predict


@pytest.fixture(scope="session")
def vqa_run(assets):
    base = assets["base"]
    run = base / "runs" / "vqa"
    cfg = write_config(base / "cfg" / "vqa.yaml", recipe(assets, "vqa", run, train=VQA_TRAIN))
    rc, out, err = run_cli("train", cfg)
    assert rc == 0, err[-3000:]
    state = json.loads(out.strip().splitlines()[-1])
    return {"run": run, "config": cfg, "state": state}


def test_vqa_recipe_trains_evaluates_and_beats_chance(vqa_run):
    run, state = vqa_run["run"], vqa_run["state"]
    assert state["output_dir"] == str(run) and state["epoch"] == 25 and state["step"] == 25 * 6
    best = check_run_outputs(run, "qa", epochs=25)
    preds = json.loads((run / f"eval_epoch{best['epoch']}" / "predictions.json").read_text())
    assert sorted(p["question_id"] for p in preds) == list(range(2000, 2012))
    assert all(isinstance(p["question_id"], int) for p in preds)
    # 4 colours: a blind guess scores 25; the connectors must have learned to read the image
    assert best["score"] == state["best_score"]
    assert best["score"] >= 50, best
    rows = list(csv.DictReader((run / "eval.csv").open()))
    assert len(rows) == 25 and max(float(r["eval_score"]) for r in rows) == best["score"]
    cfg = json.loads((run / "run_config.json").read_text())
    assert cfg["data"]["dataset"] == "vqa_v2" and cfg["train"]["epochs"] == 25


def test_eval_cli_reproduces_the_best_epoch(vqa_run, tmp_path):
    run = vqa_run["run"]
    rc, out, err = run_cli("eval", vqa_run["config"], "--checkpoint", run / "best", "--out", tmp_path / "ev")
    assert rc == 0, err[-3000:]
    scores = json.loads(out.strip().splitlines()[-1])
    best = json.loads((run / "best" / "metrics.json").read_text())
    assert scores == {k: v for k, v in best.items() if k != "epoch"}
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == scores
    assert (json.loads((tmp_path / "ev" / "predictions.json").read_text())
            == json.loads((run / f"eval_epoch{best['epoch']}" / "predictions.json").read_text()))
    assert (tmp_path / "ev" / "examples.html").is_file()
    # default output folder: CHECKPOINT/eval
    rc, _, err = run_cli("eval", vqa_run["config"], "--checkpoint", run / "best")
    assert rc == 0, err[-3000:]
    assert json.loads((run / "best" / "eval" / "metrics.json").read_text()) == scores


def test_predict_cli_answers_like_the_evaluation(vqa_run, assets):
    run = vqa_run["run"]
    image = assets["vqa_test_image"]  # question 2000 of karpathy_test
    rc, out, err = run_cli("predict", run / "best", "--image", image, "--prompt", "what color is it",
                           "--num-beams", "1", "--max-new-tokens", "4")
    assert rc == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"answer", "seconds"}
    assert isinstance(result["answer"], str) and result["answer"]
    assert isinstance(result["seconds"], float) and result["seconds"] >= 0
    preds = {p["question_id"]: p["answer"]
             for p in json.loads((run / f"eval_epoch{best_epoch(run)}" / "predictions.json").read_text())}
    assert result["answer"] == preds[2000]  # same preprocessing, prompt and (greedy) decoding
    rc, out, err = run_cli("predict", run / "best", "--image", image, "--prompt", "what color is it")  # beams
    assert rc == 0 and "answer" in json.loads(out.strip().splitlines()[-1])
    rc, _, err = run_cli("predict", run / "best", "--image", assets["root"] / "nope.jpg")
    assert rc == 2 and "nope.jpg" in err and "no such file" in err
    rc, _, err = run_cli("predict", run / "best", "--video", image)  # an image model asked about a "video"
    assert rc == 2 and "image" in err


# =========================================================================== other task types


def test_coco_captioning_recipe(assets):
    base = assets["base"]
    run = base / "runs" / "coco"
    cfg = write_config(base / "cfg" / "coco.yaml", recipe(
        assets, "coco", run, train={"epochs": 1, "batch_size": 8, "optim": {**FAST_OPTIM, "lr": 1e-2}},
        eval={"caption_metrics": CHEAP_CAPTION_METRICS}))
    rc, out, err = run_cli("train", cfg)
    assert rc == 0, err[-3000:]
    best = check_run_outputs(run, "caption", epochs=1)
    assert {"CIDEr", "Bleu_4", "ROUGE_L"} <= set(best) and "METEOR" not in best
    preds = json.loads((run / "eval_epoch0" / "predictions.json").read_text())
    # the COCO server's format: the integer cocoid, not the file name
    assert sorted(p["image_id"] for p in preds) == list(range(500, 508))


@needs_av
def test_video_qa_recipe(assets):
    base = assets["base"]
    run = base / "runs" / "msrvtt_qa"
    cfg = write_config(base / "cfg" / "msrvtt_qa.yaml", recipe(
        assets, "msrvtt_qa", run, train={"epochs": 3, "batch_size": 4, "optim": {**FAST_OPTIM, "lr": 1e-2}}))
    rc, out, err = run_cli("train", cfg)
    assert rc == 0, err[-3000:]
    best = check_run_outputs(run, "qa", epochs=3)
    assert set(best) == {"epoch", "score", "accuracy"}  # exact-match accuracy
    preds = json.loads((run / "eval_epoch0" / "predictions.json").read_text())
    assert sorted(p["question_id"] for p in preds) == list(range(3008, 3013))


@needs_sf
def test_audio_captioning_recipe(assets):
    base = assets["base"]
    run = base / "runs" / "audiocaps"
    cfg = write_config(base / "cfg" / "audiocaps.yaml", recipe(
        assets, "audiocaps", run, train={"epochs": 2, "batch_size": 4, "optim": {**FAST_OPTIM, "lr": 1e-2}},
        eval={"caption_metrics": CHEAP_CAPTION_METRICS}))
    rc, out, err = run_cli("train", cfg)
    assert rc == 0, err[-3000:]
    check_run_outputs(run, "caption", epochs=2)
    preds = json.loads((run / "eval_epoch1" / "predictions.json").read_text())
    assert sorted(p["image_id"] for p in preds) == ["test00low", "test01high", "test02low"]


@needs_av
def test_zero_shot_video_qa_after_image_training(assets):
    """Paper Table 6: train on VQA images with a frame-wise image encoder, answer MSRVTT-QA videos."""
    base = assets["base"]
    run = base / "runs" / "zeroshot"
    cfg = recipe(assets, "vqa", run, train={"epochs": 1, "batch_size": 8})
    cfg["model"]["encoder"] = "framewise:" + assets["models"]["vit"]
    cfg["data"].update(eval_dataset="msrvtt_qa", eval_split="test", num_frames=2)
    rc, out, err = run_cli("train", write_config(base / "cfg" / "zeroshot.yaml", cfg))
    assert rc == 0, err[-3000:]
    metrics = json.loads((run / "eval_epoch0" / "metrics.json").read_text())
    assert set(metrics) == {"score", "accuracy"}  # exact match, the video QA metric
    preds = json.loads((run / "eval_epoch0" / "predictions.json").read_text())
    assert sorted(p["question_id"] for p in preds) == list(range(3008, 3013))


# =========================================================================== feature cache


def test_feature_cache_cli_then_training_equals_training_without(assets, tmp_path):
    from epalm.data.feature_cache import FeatureCache, StaleCacheError
    from epalm.recipes.run import load_run_config, run_train

    cfg_dict = recipe(assets, "vqa", tmp_path / "plain", train={"epochs": 2, "batch_size": 4})
    cfg_dict["model"]["encoder"] = assets["models"]["vit_pooler"]
    cfg_dict["data"]["feature_cache_dtype"] = "float32"  # float16 (the default) rounds the features
    cfg = write_config(tmp_path / "vqa.yaml", cfg_dict)
    cache = tmp_path / "cache"

    rc, out, err = run_cli("train", cfg)  # data.augment=false, no cache
    assert rc == 0, err[-3000:]
    rc, out, err = run_cli("cache-features", cfg, f"data.feature_cache={cache}", "data.augment=false")
    assert rc == 0, err[-3000:]
    info = json.loads(out.strip().splitlines()[-1])
    assert info == {"path": str(cache), "items": 24 + 12, "shape": [2, 24]}
    meta = FeatureCache.read_meta(cache)
    assert meta["fingerprint"]["preprocessing"]["image_size"] == 16

    rc, out, err = run_cli("train", cfg, f"data.feature_cache={cache}", f"train.output_dir={tmp_path / 'cached'}")
    assert rc == 0, err[-3000:]
    assert FeatureCache.read_meta(cache) == meta  # reused, not rebuilt
    plain, cached = trainable(tmp_path / "plain" / "checkpoint"), trainable(tmp_path / "cached" / "checkpoint")
    assert plain.keys() == cached.keys()
    for k in plain:  # same seed, same batches, float32 features: the very same weights
        assert torch.equal(cached[k], plain[k]), k
    assert (json.loads((tmp_path / "plain" / "eval_epoch1" / "predictions.json").read_text())
            == json.loads((tmp_path / "cached" / "eval_epoch1" / "predictions.json").read_text()))

    # changed preprocessing: the cache is refused, naming the field (CLI: exit 2 with the message)
    rc, out, err = run_cli("train", cfg, f"data.feature_cache={cache}", "data.mean=[0.5,0.5,0.5]",
                           f"train.output_dir={tmp_path / 'stale'}")
    assert rc == 2
    assert "stale feature cache" in err and "preprocessing.mean" in err and str(cache) in err
    stale = load_run_config(cfg, [f"data.feature_cache={cache}", "data.image_size=32",
                                  f"train.output_dir={tmp_path / 'stale2'}"])
    with pytest.raises(StaleCacheError, match=r"preprocessing\.image_size") as info:
        run_train(stale, progress=False)
    assert info.value.fields == ["preprocessing.image_size"]
    assert FeatureCache.read_meta(cache) == meta  # a stale cache is never overwritten


def test_cache_features_needs_a_directory(assets, tmp_path):
    cfg = write_config(tmp_path / "vqa.yaml", recipe(assets, "vqa", tmp_path / "run"))
    with pytest.raises(SystemExit, match="data.feature_cache"):
        run_cli("cache-features", cfg)


def test_feature_cache_of_an_encoder_with_missing_weights(assets, tmp_path):
    """A ViT saved without its pooler gets a random one on every load; epalm drops the unused pooler,
    so the cache fingerprint is stable and `epalm train` reuses what `epalm cache-features` built."""
    cfg = write_config(tmp_path / "vqa.yaml", recipe(assets, "vqa", tmp_path / "run", train={"epochs": 1}))
    cache = tmp_path / "cache"
    rc, out, err = run_cli("cache-features", cfg, f"data.feature_cache={cache}")
    assert rc == 0, err[-3000:]
    rc, out, err = run_cli("train", cfg, f"data.feature_cache={cache}")
    assert rc == 0, err[-2000:]


# =========================================================================== exact resume


class Interrupted(BaseException):
    """Stands for the process being killed: not an Exception, so nothing on the way catches it."""


def test_resume_through_the_cli_gives_identical_weights(assets, tmp_path, monkeypatch):
    import epalm.data

    # with augmentation on, so the restored RNG states matter too (crop, flip, RandAugment draws)
    train = {"epochs": 3, "batch_size": 4, "save_every": 1}
    cfg = write_config(tmp_path / "vqa.yaml", recipe(assets, "vqa", tmp_path / "straight", train=train,
                                                     data={"augment": True}))
    rc, out, err = run_cli("train", cfg)
    assert rc == 0, err[-3000:]
    straight = json.loads(out.strip().splitlines()[-1])

    # 6 training batches + 1 evaluation batch per epoch: the 10th collate call is epoch 1, batch 2
    real = epalm.data.make_collate_fn
    calls = []

    def crashing_make_collate_fn(tokenizer, **kw):
        collate = real(tokenizer, **kw)

        def crashing(items):
            calls.append(len(items))
            if len(calls) == 10:
                raise Interrupted
            return collate(items)

        return crashing

    monkeypatch.setattr(epalm.data, "make_collate_fn", crashing_make_collate_fn)
    resumed_dir = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        run_cli("train", cfg, f"train.output_dir={resumed_dir}")
    monkeypatch.setattr(epalm.data, "make_collate_fn", real)
    state = json.loads((resumed_dir / "checkpoint" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 8)

    rc, out, err = run_cli("train", cfg, f"train.output_dir={resumed_dir}", "--resume")
    assert rc == 0, err[-3000:]
    assert "resumed from" in out + err
    resumed = json.loads(out.strip().splitlines()[-1])
    assert {k: v for k, v in resumed.items() if k != "output_dir"} == {
        k: v for k, v in straight.items() if k != "output_dir"}
    a, b = trainable(tmp_path / "straight" / "checkpoint"), trainable(resumed_dir / "checkpoint")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (json.loads((tmp_path / "straight" / "eval_epoch2" / "predictions.json").read_text())
            == json.loads((resumed_dir / "eval_epoch2" / "predictions.json").read_text()))
    steps = [int(r["step"]) for r in csv.DictReader((resumed_dir / "metrics.csv").open())]
    assert steps == list(range(1, 19))  # each step logged once across the two runs


# =========================================================================== DDP (2 CPU processes, gloo)

DDP_SCRIPT = textwrap.dedent('''
    """Run by test_ddp_*: once alone, once as each of 2 gloo processes (env: RANK, WORLD_SIZE, ...)."""
    import json
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    from epalm.interface import cli
    from epalm.data import make_collate_fn
    from epalm.evaluation.evaluate import predict
    from epalm.core.model import EPALM
    from epalm.recipes.run import build_datasets, load_run_config, load_tokenizer
    from epalm.recipes.tiny import ColourDataset, collate, tiny_model
    from epalm.training.trainer import OptimConfig, TrainConfig, Trainer

    out, vqa_config = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)

    # 1. the tiny model: 23 samples in global batches of 8 (the last one 7: 4 + 3 across processes)
    cfg = TrainConfig(output_dir=str(out / "tiny"), epochs=2, batch_size=8, cpu=True, log_every=1, seed=0,
                      optim=OptimConfig(lr=1e-3, warmup_lr=3e-4, min_lr=1e-4, prompt_lr=1e-3))
    model = tiny_model()
    trainer = Trainer(model, ColourDataset(23), collate, cfg)
    acc = trainer.accelerator
    # the gradient of the uneven global batch (7 samples: 4 + 3) from the initial weights
    [(batch, size)] = next(trainer._loader(0, 2))
    assert size == 7
    total = acc.reduce(torch.tensor(float(trainer._label_tokens(batch))), reduction="sum")
    out_ = trainer.model(**{k: v for k, v in batch.items() if k in trainer.MODEL_KEYS}, return_logits=False)
    acc.backward(out_.loss_per_sample.sum() * acc.num_processes / total)  # the global token mean
    if acc.is_main_process:
        save_file({n: p.grad.contiguous() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad},
                  str(out / "tiny_grads.safetensors"))
        save_file({k: v.contiguous().clone() for k, v in trainer.unwrapped.trainable_state_dict().items()},
                  str(out / "tiny_init.safetensors"))
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.train()
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in trainer.unwrapped.trainable_state_dict().items()},
                  str(out / "tiny.safetensors"))

    # 2. distributed evaluation: 7 samples over the processes, each returned exactly once
    rc = load_run_config(vqa_config, ["data.max_eval_samples=7"])
    tokenizer = load_tokenizer(rc)
    torch.manual_seed(0)
    model = EPALM.from_config(rc.model)
    _, eval_ds = build_datasets(rc, tokenizer)
    rows = predict(model, eval_ds, make_collate_fn(tokenizer), tokenizer, rc.eval.generation, batch_size=2,
                   accelerator=acc, progress=False)
    (out / f"rows_rank{acc.process_index}.json").write_text(
        json.dumps([[r["sample_id"], r["prediction"]] for r in rows]))

    # 3. the whole recipe through the CLI (training + per-epoch distributed evaluation)
    code = cli.main(["train", vqa_config, f"train.output_dir={out / 'recipe'}", "train.epochs=2",
                     "train.optim.lr=1e-3", "train.optim.warmup_lr=3e-4", "train.optim.min_lr=1e-4"])
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: Path, args: list[str], world: int, timeout: float = 240) -> None:
    """Run ``python script *args`` as ``world`` torch.distributed ranks on this host (one process
    when ``world == 1``, without distributed env) and fail with each failing rank's log."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root / "src"), env.get("PYTHONPATH")])))
    port = free_port()
    procs = []
    for rank in range(world):
        e = dict(env)
        if world > 1:
            e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                     LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"{' '.join(args)}: world {world} rank {rank} failed:\n{log[-5000:]}"


@pytest.fixture(scope="module")
def ddp_runs(assets, tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    script = base / "ddp_script.py"
    script.write_text(DDP_SCRIPT)
    config = write_config(base / "vqa.yaml", recipe(assets, "vqa", base / "unused", train={"batch_size": 8}))
    launch_ranks(script, [str(base / "one"), config], world=1)
    launch_ranks(script, [str(base / "two"), config], world=2)
    return base


def test_ddp_two_processes_match_one_process(ddp_runs):
    from safetensors.torch import load_file

    def load(*parts):
        return load_file(str(ddp_runs.joinpath(*parts)))

    # global loss normalisation: 4 + 3 samples on 2 processes give the 7-sample gradient
    g1, g2 = load("one", "tiny_grads.safetensors"), load("two", "tiny_grads.safetensors")
    for k in g1:  # float32 summation order only: ~3e-7 relative (per-process means would be off by ~1e-1)
        assert float((g2[k] - g1[k]).norm() / g1[k].norm()) < 1e-5, k
    # same global batch -> same trained weights
    init, one = load("one", "tiny_init.safetensors"), load("one", "tiny.safetensors")
    two = load("two", "tiny.safetensors")
    assert one.keys() == two.keys()
    assert max(float((one[k] - init[k]).abs().max()) for k in one) > 1e-3  # it did train
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=k)
    final = load("one", "tiny", "checkpoint", "epalm_weights.safetensors")
    assert all(torch.equal(final[k], one[k]) for k in one)
    # the recipe through the CLI: same weights, evaluation written once with every sample
    r1, r2 = ddp_runs / "one" / "recipe", ddp_runs / "two" / "recipe"
    a, b = trainable(r1 / "checkpoint"), trainable(r2 / "checkpoint")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    for e in range(2):
        p1 = json.loads((r1 / f"eval_epoch{e}" / "predictions.json").read_text())
        p2 = json.loads((r2 / f"eval_epoch{e}" / "predictions.json").read_text())
        assert sorted(p["question_id"] for p in p2) == list(range(2000, 2012))
        assert p1 == p2
    assert len(list(csv.DictReader((r2 / "metrics.csv").open()))) == 2 * 3  # logged by one process only
    assert (r2 / "best" / "epalm_weights.safetensors").is_file() and (r2 / "curves.png").is_file()


def test_ddp_evaluation_returns_every_sample_once(ddp_runs):
    one = json.loads((ddp_runs / "one" / "rows_rank0.json").read_text())
    ranks = [json.loads((ddp_runs / "two" / f"rows_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # gathered on every process
    ids = [sid for sid, _ in ranks[0]]
    assert sorted(ids) == sorted(sid for sid, _ in one) and len(ids) == len(set(ids)) == 7
    assert dict(ranks[0]) == dict(one)  # the same predictions as one process
