"""How many examples does the easy-VQA yes/no *comparison* need? (issue 12, item 2)

    PYTHONPATH=src python benchmarks/yesno_probe.py [--steps 4000] [--out benchmarks/results/yesno-probe-cpu.json]

No LM in the loop: a 2-layer MLP (hidden 1024, GELU, AdamW lr 1e-3) reads *both* inputs directly,
the quickstart's own image feature (the cached DINOv2-S 56 px [CLS] of the last layer, exactly
the cache ``epalm quickstart`` uses) and the question (the mean of the LM's input embeddings of its
tokens), and is trained on the 28,407 yes/no training questions only. Every input is standardised
with training statistics. It is a *lower bound* on what any connector on these features needs:
eP-ALM's connector has to reach the same comparison through a frozen LM.

Rows:
* ``image+question``: batch sizes 16, 64, 256;
* ``question only`` (image zeroed): the question-only prior, the blind baseline's;
* ``oracle attributes``: the image replaced by one-hot colour (8) + shape (3), read from the
  image's own open questions: whether the difficulty is the feature or the comparison.

``--variants`` runs instead the image+question probe under other sampling and learning rates
(``benchmarks/results/yesno-probe-variants-cpu.json``): uniform, or balanced so that yes and no weigh
the same within each distinct question (``question``) or each template (``template``); lr 1e-3,
3e-3, 1e-2. Neither balancing nor a higher lr makes the comparison cheaper.

Prints one JSON line; writes ``--out``. Accuracy is on all yes/no test questions.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from _common import easy_vqa_attributes, machine_info, quickstart_features

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "easy_vqa.yaml"
CHECKPOINTS = (100, 200, 400, 800, 1600, 2400, 4000, 8000)


def question_vectors(parts, samples) -> dict[str, torch.Tensor]:
    table = parts.lm.get_input_embeddings().weight.detach().float()
    tok = parts.tokenizer
    return {q: table[tok(q, add_special_tokens=False).input_ids].mean(0) for q in {s.question for s in samples}}


def oracle_attributes(samples) -> dict[str, torch.Tensor]:
    from epalm.data.easy_vqa import EASY_VQA_COLORS

    shapes = ("circle", "rectangle", "triangle")
    out = {}
    for media, a in easy_vqa_attributes(samples).items():
        v = torch.zeros(len(EASY_VQA_COLORS) + len(shapes))
        if "color" in a:
            v[EASY_VQA_COLORS.index(a["color"])] = 1
        if "shape" in a:
            v[len(EASY_VQA_COLORS) + shapes.index(a["shape"])] = 1
        out[media] = v
    return out


def standardise(train: torch.Tensor, *others: torch.Tensor):
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(x - mu) / sd for x in (train, *others)]


def balanced_weights(keys: list) -> torch.Tensor:
    """Sampling weights under which every distinct key (e.g. ``(question, answer)``) weighs the same."""
    from collections import Counter

    counts = Counter(keys)
    return torch.tensor([1.0 / counts[k] for k in keys])


def fit(x_tr, y_tr, x_te, y_te, batch: int, steps: int, lr: float, seed: int,
        weights: torch.Tensor | None = None) -> list[dict]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x_tr.shape[1], 1024), nn.GELU(), nn.Linear(1024, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    curve, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        b = (torch.randint(0, len(x_tr), (batch,), generator=gen) if weights is None
             else torch.multinomial(weights, batch, replacement=True, generator=gen))
        loss = nn.functional.binary_cross_entropy_with_logits(model(x_tr[b])[:, 0], y_tr[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in CHECKPOINTS or step == steps:
            with torch.no_grad():
                acc = ((model(x_te)[:, 0] > 0).float() == y_te).float().mean().item()
            curve.append({"step": step, "examples_seen": step * batch, "yes_no_accuracy": round(100 * acc, 1),
                          "s": round(time.perf_counter() - t0, 1)})
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--variants", action="store_true", help="balanced sampling and higher lrs (see the doc)")
    args = ap.parse_args()
    args.out = args.out or Path("benchmarks/results/" + ("yesno-probe-variants-cpu.json" if args.variants
                                                         else "yesno-probe-cpu.json"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from epalm.recipes import cached

    parts = cached.load_parts(cached.load_cached_config(CONFIG))
    cfg, samples, train_idx, test_idx, feats, reused = quickstart_features(CONFIG, parts)
    image = feats[:, -1].float()
    qvec = question_vectors(parts, samples)
    oracle = oracle_attributes(samples)
    tr = [i for i in train_idx if samples[i].answer_type == "yes/no"]
    te = [i for i in test_idx if samples[i].answer_type == "yes/no"]
    y = torch.tensor([samples[i].answers[0] == "yes" for i in range(len(samples))]).float()
    q = torch.stack([qvec[s.question] for s in samples])
    att = torch.stack([oracle.get(s.media_id, torch.zeros(11)) for s in samples])
    inputs = {
        "image+question": torch.cat([image, q], 1),
        "question only": torch.cat([torch.zeros_like(image), q], 1),
        "oracle attributes+question": torch.cat([att, q], 1),
    }
    runs = []
    if args.variants:  # the image+question probe only, under other sampling and learning rates
        x_tr, x_te = standardise(inputs["image+question"][tr], inputs["image+question"][te])
        keys = {"uniform": None, "question": [(samples[i].question, samples[i].answers[0]) for i in tr],
                "template": [(samples[i].template, samples[i].answers[0]) for i in tr]}
        grid = [(k, 64, 1e-3) for k in keys] + [("uniform", b, lr) for lr in (3e-3, 1e-2) for b in (16, 64)]
        for sampling, batch, lr in grid:
            w = None if keys[sampling] is None else balanced_weights(keys[sampling])
            curve = fit(x_tr, y[tr], x_te, y[te], batch, 2400, lr, args.seed, weights=w)
            runs.append({"input": "image+question", "sampling": sampling, "batch": batch, "lr": lr, "curve": curve})
            print(json.dumps(runs[-1]), flush=True)
    for name, x in ({} if args.variants else inputs).items():
        x_tr, x_te = standardise(x[tr], x[te])
        batches = (16, 64, 256) if name == "image+question" else (64,)
        for batch in batches:
            curve = fit(x_tr, y[tr], x_te, y[te], batch, args.steps, args.lr, args.seed)
            runs.append({"input": name, "batch": batch, "lr": args.lr, "curve": curve})
            print(json.dumps(runs[-1]), flush=True)
    majority = max(y[te].mean().item(), 1 - y[te].mean().item())
    result = {"benchmark": "yesno_probe", "n_train_yes_no": len(tr), "n_test_yes_no": len(te),
              "majority_answer_accuracy": round(100 * majority, 1), "features_reused": reused,
              "runs": runs, "machine": machine_info(torch.device("cpu"))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from epalm.io import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
