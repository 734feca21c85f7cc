"""Linear-probe ceiling of quickstart-audio (issue 12 item 4): same Whisper features, same split.

    PYTHONPATH=src python benchmarks/audio_probe.py

Builds (or reuses) exactly the feature cache ``epalm quickstart-audio`` uses, splits with the
same ``grouped_split`` (seed 0, test fraction 0.25) and fits sklearn LogisticRegression on the
last layer's pooled token and on all 6 layers concatenated. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from collections import Counter

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from epalm.data.registry import get_dataset
from epalm.recipes import cached

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "drumkits.yaml"


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
    reused = info["reused"]
    t_feat = time.perf_counter()
    feats = x_all[[row[s.media_id] for s in samples]].numpy()
    y = np.array([s.answers[0] for s in samples])
    out = {"n_train": len(train_idx), "n_test": len(test_idx), "features_reused": reused,
           "features_s": round(t_feat - t0, 1), "classes_test": dict(Counter(y[test_idx]))}
    for name, x in (("last layer", feats[:, -1]), (f"all {x_all.shape[1]} layers", feats.reshape(len(feats), -1))):
        for c in (0.1, 1.0, 10.0):
            t = time.perf_counter()
            scaler = StandardScaler().fit(x[train_idx])
            clf = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(x[train_idx]), y[train_idx])
            acc = float((clf.predict(scaler.transform(x[test_idx])) == y[test_idx]).mean())
            out[f"{name}, C={c}"] = {"accuracy": round(100 * acc, 1), "fit_s": round(time.perf_counter() - t, 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=CONFIG, help="the quickstart-audio recipe (default: %(default)s)")
    main(ap.parse_args().config)
