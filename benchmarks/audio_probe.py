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
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from _common import quickstart_features

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "drumkits.yaml"


def main(config: Path = CONFIG) -> None:
    t0 = time.perf_counter()
    cfg, samples, train_idx, test_idx, feats, reused = quickstart_features(config)
    feats = feats.numpy()
    t_feat = time.perf_counter()
    y = np.array([s.answers[0] for s in samples])
    out = {"n_train": len(train_idx), "n_test": len(test_idx), "features_reused": reused,
           "features_s": round(t_feat - t0, 1), "classes_test": dict(Counter(y[test_idx]))}
    for name, x in (("last layer", feats[:, -1]), (f"all {feats.shape[1]} layers", feats.reshape(len(feats), -1))):
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
