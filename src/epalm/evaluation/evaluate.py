"""Open-ended evaluation: generate answers / captions, score them with the official metrics,
write predictions in the official submission formats and an HTML page of examples.

Distributed evaluation shards the dataset by index (rank::world), gathers every shard and keeps
each sample exactly once. Under FSDP every process must run the same number of generation steps
(each step gathers parameters from all of them): the shards are padded to equal length by
repeating samples (dropped again when gathering) and ``generate`` runs with ``synced_gpus``.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate.utils import send_to_device
from torch.utils.data import Dataset, Subset

from epalm.data.loading import default_num_workers, make_loader
from epalm.io import atomic_write_text
from epalm.evaluation.metrics import exact_match
from epalm.core.model import EPALM
from epalm.training.parallel import is_sharded


@dataclass
class DecodingConfig:
    """Decoding of an evaluation: greedy (num_beams=1), beam search (3), or sampling.

    Not transformers' ``GenerationConfig``: these are only the options a recipe's ``eval.generation``
    section sets; :meth:`kwargs` turns them into ``generate`` keyword arguments.
    """

    max_new_tokens: int = 10
    num_beams: int = 1
    do_sample: bool = False
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None

    def kwargs(self) -> dict[str, Any]:
        out = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": self.do_sample}
        if self.do_sample:
            out.update({k: v for k, v in (("top_k", self.top_k), ("top_p", self.top_p),
                                           ("temperature", self.temperature)) if v is not None})
        return out


def _media_kwargs(batch: dict) -> dict[str, torch.Tensor]:
    if "features" in batch:
        return {"features": batch["features"]}
    return {"media": batch["media"]}


@torch.no_grad()
def predict(
    model: EPALM,
    dataset: Dataset,
    collate: Callable[[list], dict],
    tokenizer: Any,
    generation: DecodingConfig | None = None,
    batch_size: int = 64,
    accelerator: Any = None,
    progress: bool = True,
    num_workers: int | None = None,
) -> list[dict[str, Any]]:
    """Generate for every sample; rows ``{sample_id, media_id, prediction, ...}`` in dataset order.

    ``num_workers``: DataLoader worker processes (None: :func:`~epalm.data.loading.default_num_workers`).
    """
    from tqdm.auto import tqdm

    generation = generation or DecodingConfig()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    indices = list(range(rank, len(dataset), world))
    sharded = is_sharded(model)
    extra = {}
    if sharded and world > 1:  # equal shards (repeats are dropped when gathering), generation in lock-step
        per_rank = -(-len(dataset) // world)
        indices += [indices[-1] if indices else 0] * (per_rank - len(indices))
        extra["synced_gpus"] = True
    device = accelerator.device if accelerator is not None else next(
        p for p in model.parameters() if p.requires_grad).device
    workers = default_num_workers(len(indices)) if num_workers is None else num_workers
    loader = make_loader(Subset(dataset, indices), batch_size=batch_size, collate_fn=collate, num_workers=workers,
                         pin_memory=device.type == "cuda", persistent=False)
    model.eval()
    rows: list[dict[str, Any]] = []
    for batch in tqdm(loader, desc="generate", unit="batch", disable=not progress or rank != 0):
        if batch is None:  # every sample of this batch was skipped (on_error="skip")
            continue
        batch = send_to_device(batch, device, non_blocking=True)
        new = model.generate(input_ids=batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"],
                             pad_token_id=getattr(tokenizer, "pad_token_id", None) or tokenizer.eos_token_id,
                             **_media_kwargs(batch), **generation.kwargs(), **extra)
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, text in enumerate(texts):
            row = {"prediction": text.strip()}
            for key in ("sample_id", "media_id", "question", "answers", "references", "answer_type"):
                if key in batch:
                    row[key] = batch[key][i]
            rows.append(row)
    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    seen: dict[Any, dict] = {}
    for row in rows:  # each sample exactly once
        seen.setdefault(row.get("sample_id"), row)
    order = {s.id: i for i, s in enumerate(getattr(dataset, "samples", []))}
    return sorted(seen.values(), key=lambda r: order.get(r.get("sample_id"), len(order)))


def score(kind: str, rows: Sequence[dict[str, Any]], caption_metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """``kind``: "vqa" (official VQA accuracy), "exact_match" (GQA, video QA), "caption" (COCO metrics).

    ``caption_metrics``: a subset of BLEU, METEOR, ROUGE_L, CIDEr, SPICE (default: all of them).
    """
    from epalm.evaluation import metrics

    if kind == "vqa":
        result = metrics.vqa_score({r["sample_id"]: r["prediction"] for r in rows},
                                   {r["sample_id"]: r["answers"] for r in rows},
                                   answer_types={r["sample_id"]: r.get("answer_type") or "all" for r in rows})
        return {"score": result["overall"], "accuracy": result["overall"], **{
            f"accuracy_{k}": v for k, v in result.get("perAnswerType", {}).items()}}
    if kind == "exact_match":
        acc = metrics.exact_match_accuracy([r["prediction"] for r in rows], [r["answers"] for r in rows])
        return {"score": acc, "accuracy": acc}
    if kind == "caption":
        extra = {"metrics": list(caption_metrics)} if caption_metrics else {}
        result = metrics.caption_scores({r["sample_id"]: r["prediction"] for r in rows},
                                        {r["sample_id"]: r["references"] for r in rows}, **extra)
        return {"score": result.get("CIDEr"), **result}
    raise ValueError(f"unknown metric kind {kind!r}: use 'vqa', 'exact_match' or 'caption'")


def write_predictions(out_dir: Path, kind: str, rows: Sequence[dict[str, Any]], scores: dict) -> None:
    """Official formats: VQA ``[{question_id, answer}]``, COCO ``[{image_id, caption}]``; plus metrics.json.

    ``image_id`` is the sample id (COCO: the integer ``cocoid`` the evaluation server expects; MSR-VTT:
    the video id; AudioCaps: the clip's stem), not the media file's stem.
    """
    from epalm.evaluation import metrics

    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "caption":
        metrics.write_caption_predictions(out_dir / "predictions.json",
                                          {r["sample_id"]: r["prediction"] for r in rows})
    else:
        metrics.write_vqa_predictions(out_dir / "predictions.json",
                                      {r["sample_id"]: r["prediction"] for r in rows})
    metrics.write_metrics(out_dir / "metrics.json", scores)


def _thumbnail(path: str | None, size: int = 160) -> str:
    if not path:
        return ""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im).convert("RGB")  # transparent pixels on white, not black
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except Exception:  # audio / video / unreadable: show the path only
        return f"<code>{html.escape(str(path))}</code>"
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def write_examples_html(path: Path, rows: Sequence[dict[str, Any]], media_paths: dict | None = None,
                        title: str = "epalm predictions", limit: int = 100) -> Path:
    """A self-contained HTML page: media (inline thumbnail), question, prediction, ground truth."""
    media_paths = media_paths or {}
    cells = []
    for r in list(rows)[:limit]:
        truth = r.get("answers") or r.get("references") or []
        ok = exact_match(r["prediction"], [str(t) for t in truth])
        cells.append(
            f"<tr class={'ok' if ok else 'bad'}><td>{_thumbnail(media_paths.get(r.get('sample_id')))}</td>"
            f"<td>{html.escape(str(r.get('question', '')))}</td><td><b>{html.escape(r['prediction'])}</b></td>"
            f"<td>{html.escape(', '.join(map(str, truth[:5])))}</td></tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}}td{{padding:4px 10px;border-bottom:1px solid #ddd}}
tr.ok b{{color:#070}}tr.bad b{{color:#a00}}</style></head><body><h1>{html.escape(title)}</h1>
<table><tr><th>media</th><th>question</th><th>prediction</th><th>ground truth</th></tr>
{''.join(cells)}</table></body></html>"""
    atomic_write_text(path, page)
    return path
