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

from epalm.evaluation.metrics import caption_scores
from _common import quickstart_features

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "tuxpaint.yaml"


def main(config: Path = CONFIG) -> None:
    t0 = time.perf_counter()
    cfg, samples, train_idx, test_idx, feats, reused = quickstart_features(config)
    include_svg = cfg.dataset_options.get("include_svg")
    t_feat = time.perf_counter()
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
