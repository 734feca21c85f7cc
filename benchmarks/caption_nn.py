"""Nearest-neighbour baseline of quickstart-caption (issue 12 item 4): same features, same split.

    PYTHONPATH=src python benchmarks/caption_nn.py

Builds (or reuses) exactly the DINOv2 feature cache ``epalm quickstart-caption`` uses, splits
it the same way (seed 0, test fraction 0.15) and captions each test stamp with the (first)
caption of the training stamp whose features are closest (cosine), scored by the same
``caption_scores`` (BLEU, ROUGE-L, CIDEr). Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from epalm.data.registry import get_dataset
from epalm.evaluation.metrics import caption_scores
from epalm.recipes import cached

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "tuxpaint.yaml"


def main(config: Path = CONFIG) -> None:
    t0 = time.perf_counter()
    cfg = cached.load_cached_config(config)
    spec = get_dataset(cfg.dataset)
    train = spec.load(cfg.root, cfg.train_split, **cfg.dataset_options)
    test = spec.load(cfg.root, cfg.test_split, **cfg.dataset_options)
    samples = train + test
    train_idx, test_idx = list(range(len(train))), list(range(len(train), len(samples)))
    parts = cached.load_parts(cfg)
    processor = cached.build_processor(cfg, spec, parts.tokenizer)
    media = {s.media_id: s.media_path for s in samples}
    x_all, row, info = cached.media_features(cfg, parts, processor, media, torch.device("cpu"), print)
    reused, include_svg = info["reused"], cfg.dataset_options.get("include_svg")
    t_feat = time.perf_counter()
    feats = x_all[[row[s.media_id] for s in samples]]
    refs = {samples[i].media_id: samples[i].captions for i in test_idx}
    out = {"n_train": len(train_idx), "n_test": len(test_idx), "svg_included": include_svg,
           "features_reused": reused, "features_s": round(t_feat - t0, 1)}
    for name, x in (("last [CLS]", feats[:, -1]), (f"all {feats.shape[1]} [CLS]", feats.flatten(1))):
        t = time.perf_counter()
        x = torch.nn.functional.normalize(x - x[train_idx].mean(0), dim=-1)
        nearest = (x[test_idx] @ x[train_idx].T).argmax(1).tolist()
        preds = {samples[i].media_id: samples[train_idx[j]].captions[0] for i, j in zip(test_idx, nearest)}
        s = caption_scores(preds, refs, metrics=["BLEU", "ROUGE_L", "CIDEr"])
        out[f"nearest neighbour, {name}"] = {k: round(float(s[k]), 4) for k in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr")}
        out[f"nearest neighbour, {name}"]["seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=CONFIG, help="the quickstart-caption recipe (default: %(default)s)")
    main(ap.parse_args().config)
