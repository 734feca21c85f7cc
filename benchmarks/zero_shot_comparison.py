"""Can the frozen LM compare an attribute *stated in words* with the question? (issue 12, item 2)

    PYTHONPATH=src python benchmarks/zero_shot_comparison.py [--questions 300] [--lm weights:gemma3-270m ...]

No image and no training: each yes/no easy-VQA test question is preceded by the true attributes of
its image as text ("The image shows a red circle."; the instruct model gets its chat template), and
the answer is yes when the LM's next-token logit for yes / Yes / " yes" / " Yes" beats the same for
no. An LM that compares natively would leave a connector only the job of *naming* the attributes,
which the quickstart learns in minutes (colour and shape questions: 98-100%). Neither Gemma 3 270M
nor SmolLM2-135M-Instruct does: both answer by the question's polarity, near 50%.

Prints one JSON line per LM; appends them to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from _common import easy_vqa_attributes, machine_info

FORMAT = "The image shows a {color} {shape}.\nQuestion: {question}\nAnswer (yes or no):"  # base LMs
CHAT_FORMAT = "The image shows a {color} {shape}. {question} Answer yes or no."  # LMs with a chat template


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--lm", nargs="+", default=["weights:gemma3-270m", "weights:smollm2-135m-instruct"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/zero-shot-comparison-cpu.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from epalm.data.registry import get_dataset
    from epalm.weights.registry import load_registry_lm

    test = get_dataset("easy_vqa").load(None, "test")
    attrs = easy_vqa_attributes(test)
    pool = [s for s in test if s.answer_type == "yes/no" and len(attrs.get(s.media_id, {})) == 2]
    questions = random.Random(0).sample(pool, min(args.questions, len(pool)))
    for name in args.lm:
        lm, tok = load_registry_lm(name)
        lm.eval()
        first = lambda words: [tok(w, add_special_tokens=False).input_ids[0] for w in words]  # noqa: E731
        yes, no = first(("yes", "Yes", " yes", " Yes")), first(("no", "No", " no", " No"))
        chat = getattr(tok, "chat_template", None) is not None
        per: dict[str, list[int]] = {}
        for s in questions:
            a = attrs[s.media_id]
            fields = dict(color=a["color"], shape=a["shape"], question=s.question[0].upper() + s.question[1:])
            text = (CHAT_FORMAT if chat else FORMAT).format(**fields)
            if chat:
                text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
            enc = tok(text, return_tensors="pt", add_special_tokens=not chat)
            with torch.no_grad():
                logits = lm(**enc).logits[0, -1].float()
            pred = "yes" if logits[yes].max() > logits[no].max() else "no"
            per.setdefault(s.template, []).append(int(pred == s.answers[0]))
        hits = [h for v in per.values() for h in v]
        result = {"benchmark": "zero_shot_comparison", "lm": name, "chat_template": chat, "questions": len(hits),
                  "accuracy": round(100 * sum(hits) / len(hits), 1),
                  "per_template": {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(per.items())},
                  "machine": machine_info(torch.device("cpu"))}
        print(json.dumps(result), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
