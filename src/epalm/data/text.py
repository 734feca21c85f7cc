"""Text templates, tokenization for a causal LM, and batch collation.

Templates (as in the release): VQA/GQA/video QA ``question + "?" + "</a>" + answer`` (the ``?`` is
not doubled when the question already ends with one; pass ``question_mark="always"`` for the
release's literal ``question + "?"``), captions ``caption``. Each example is

    [BOS] + tokens(prompt) + tokens(target) + [EOS]

with BOS only when the tokenizer has one. Prompt and target are tokenized *separately* (no special
tokens added by the tokenizer), so the prompt tokens seen in training are exactly those given at
generation time. ``labels`` follow the Hugging Face convention (aligned with ``input_ids``, the
model shifts them): with ``loss_on="answer"`` (default) only target tokens and EOS are labelled;
with ``loss_on="all"`` (the release) every token but BOS and padding is. Padding is masked by the
attention mask, never by token id, so an EOS used as pad still counts as a target.

The separator is tokenized as plain text by default. :func:`add_separator_token` registers it as
an additional special token (as the release does with id 50265) and refuses when the new id would
not fit the LM's embedding matrix -- it never resizes the LM.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "DEFAULT_SEPARATOR",
    "IGNORE_INDEX",
    "vqa_prompt",
    "vqa_text",
    "caption_text",
    "pad_token_id_of",
    "add_separator_token",
    "Encoded",
    "encode_example",
    "encode_prompt",
    "pad_sequences",
    "build_generation_inputs",
    "DataCollator",
    "make_collate_fn",
    "TruncatedTextWarning",
    "text_token_limit",
    "truncate_prompt",
]


class TruncatedTextWarning(UserWarning):
    """A training text was longer than the LM's positions and was cut (the answer is kept)."""


def text_token_limit(model: Any) -> int | None:
    """How many text tokens an EPALM's LM can take after its prefix (slot + soft prompt); None: no limit.

    The limit is the LM's ``max_position_embeddings`` (``n_positions`` for GPT-2) minus the prefix.
    """
    cfg = getattr(getattr(model, "lm", None), "config", None)
    positions = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
    if not isinstance(positions, int) or positions <= 0:
        return None
    config = model.config
    prefix = 1 + (config.prompt_len or 0)
    return max(1, positions - prefix)


def truncate_prompt(ids: list[int], max_length: int | None, keep_first: int = 0) -> list[int]:
    """Keep the first ``keep_first`` ids (BOS) and the *last* ones, ``max_length`` in all: the end of a
    prompt (``...?</a>``) is what the answer follows."""
    if max_length is None or len(ids) <= max_length:
        return ids
    tail = max(0, max_length - keep_first)
    return ids[:keep_first] + (ids[len(ids) - tail:] if tail else [])

DEFAULT_SEPARATOR = "</a>"
IGNORE_INDEX = -100

LossOn = Literal["answer", "all"]


def vqa_prompt(
    question: str, separator: str = DEFAULT_SEPARATOR, *, question_mark: Literal["auto", "always"] = "auto"
) -> str:
    """``question?</a>``: the generation prompt and the training prefix of QA examples."""
    q = question.strip()
    if question_mark == "always" or not q.endswith("?"):
        q += "?"
    return q + separator


def vqa_text(question: str, answer: str, separator: str = DEFAULT_SEPARATOR, **kw: Any) -> str:
    """Full QA training string ``question?</a>answer`` (EOS is added as a token, not as text)."""
    return vqa_prompt(question, separator, **kw) + answer.strip()


def caption_text(caption: str) -> str:
    """Caption training string: the caption itself (the prompt is empty, BOS only)."""
    return caption.strip()


def pad_token_id_of(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS (GPT-2 style tokenizers)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def add_separator_token(tokenizer: Any, separator: str = DEFAULT_SEPARATOR, num_embeddings: int | None = None) -> int:
    """Register ``separator`` as an additional special token and return its id.

    ``num_embeddings`` is the LM's embedding rows (OPT: 50272 for 50265 tokens); if the id would
    not fit, this raises instead of adding, because the frozen LM must not be resized.
    """
    vocab = tokenizer.get_vocab()
    if separator in vocab and separator in tokenizer.all_special_tokens:
        token_id = vocab[separator]
    else:
        new_id = len(tokenizer) if separator not in vocab else vocab[separator]
        if num_embeddings is not None and new_id >= num_embeddings:
            raise ValueError(
                f"separator {separator!r} would get id {new_id}, but the LM has only {num_embeddings} embedding "
                "rows; keep add_separator_token=False (plain-text separator) instead of resizing the frozen LM"
            )
        tokenizer.add_special_tokens({"additional_special_tokens": [separator]})
        token_id = tokenizer.convert_tokens_to_ids(separator)
    if num_embeddings is not None and token_id >= num_embeddings:
        raise ValueError(f"separator {separator!r} has id {token_id} >= {num_embeddings} LM embedding rows")
    return int(token_id)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _bos(tokenizer: Any, add_bos: bool | None) -> list[int]:
    if add_bos is None:
        add_bos = tokenizer.bos_token_id is not None
    if not add_bos:
        return []
    if tokenizer.bos_token_id is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token")
    return [int(tokenizer.bos_token_id)]


@dataclass
class Encoded:
    """One tokenized example; ``labels`` is aligned with ``input_ids`` (-100 = not a target)."""

    input_ids: list[int]
    labels: list[int]


def encode_prompt(tokenizer: Any, prompt: str, *, add_bos: bool | None = None) -> list[int]:
    """``[BOS] + tokens(prompt)``: what generation starts from (empty prompt = BOS only)."""
    return _bos(tokenizer, add_bos) + _ids(tokenizer, prompt)


def encode_example(
    tokenizer: Any,
    prompt: str,
    target: str,
    *,
    loss_on: LossOn = "answer",
    add_bos: bool | None = None,
    add_eos: bool = True,
    max_length: int | None = None,
) -> Encoded:
    """Tokenize ``[BOS] prompt target [EOS]`` and label it (see module doc for ``loss_on``).

    ``max_length`` (the LM's positions): a longer text loses the *start of the prompt* first, so the
    target (the answer) and the prompt's end (the separator) are kept; only a target longer than
    ``max_length`` on its own is cut at its end. BOS and EOS are always kept. A
    :class:`TruncatedTextWarning` says so.
    """
    if loss_on not in ("answer", "all"):
        raise ValueError(f"loss_on must be 'answer' or 'all', not {loss_on!r}")
    bos = _bos(tokenizer, add_bos)
    eos: list[int] = []
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; pass add_eos=False or set tokenizer.eos_token")
        eos = [int(tokenizer.eos_token_id)]
    p, t = _ids(tokenizer, prompt), _ids(tokenizer, target)
    body = p + t
    body_labels = (p if loss_on == "all" else [IGNORE_INDEX] * len(p)) + t
    if max_length is not None and len(bos) + len(body) + len(eos) > max_length:
        keep = max_length - len(bos) - len(eos)
        if keep < 0:
            raise ValueError(f"max_length={max_length} leaves no room for BOS/EOS")
        n = len(body)
        cut = max(0, len(p) - max(0, keep - len(t)))  # prompt tokens dropped from the start
        body, body_labels = body[cut:], body_labels[cut:]
        body, body_labels = body[:keep], body_labels[:keep]  # a target longer than keep on its own
        warnings.warn(f"text of {n + len(bos) + len(eos)} tokens is longer than the LM's {max_length} positions: "
                      f"{'the prompt was cut at its start' if len(t) <= keep else 'the target was cut'} "
                      f"({prompt[:40]!r}...)", TruncatedTextWarning, stacklevel=2)
    return Encoded(bos + body + eos, [IGNORE_INDEX] * len(bos) + body_labels + eos)


def pad_sequences(
    seqs: Sequence[Sequence[int] | torch.Tensor], pad_value: int, side: Literal["right", "left"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length id lists into (B, L) plus a 0/1 attention mask, padding ``side``."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', not {side!r}")
    tensors = [torch.as_tensor(s, dtype=torch.long) for s in seqs]
    length = max((t.numel() for t in tensors), default=0)
    out = torch.full((len(tensors), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(tensors), length), dtype=torch.long)
    for i, t in enumerate(tensors):
        n = t.numel()
        if n == 0:
            continue
        sl = slice(0, n) if side == "right" else slice(length - n, length)
        out[i, sl] = t
        mask[i, sl] = 1
    return out, mask


def build_generation_inputs(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    padding_side: Literal["left", "right"] = "left",
    add_bos: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Batch of prompts (e.g. ``vqa_prompt(q)``, or ``""`` for captioning), left-padded for generation."""
    ids = [encode_prompt(tokenizer, p, add_bos=add_bos) for p in prompts]
    input_ids, attention_mask = pad_sequences(ids, pad_token_id_of(tokenizer), padding_side)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class DataCollator:
    """``collate_fn`` for the datasets: pads text, stacks media, keeps the rest as lists.

    * ``input_ids``/``labels`` -> right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100
      on pads) for teacher forcing;
    * ``prompt_ids`` -> left-padded ``prompt_input_ids``, ``prompt_attention_mask`` for generation;
    * ``media``/``features`` tensors -> stacked;
    * anything else (``sample_id``, ``media_id``, ``question``, ``answers``, ...) -> a list.

    ``None`` items (samples skipped with ``on_error="skip"``) are dropped; a batch whose every item
    was skipped collates to ``None``.
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        padding_side: Literal["right", "left"] = "right",
        prompt_padding_side: Literal["left", "right"] = "left",
    ) -> None:
        self.pad_token_id = int(pad_token_id)
        self.padding_side, self.prompt_padding_side = padding_side, prompt_padding_side

    def __call__(self, batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        items = [b for b in batch if b is not None]
        if not items:
            return None
        out: dict[str, Any] = {}
        keys = list(items[0])
        if all("input_ids" in b for b in items):
            out["input_ids"], out["attention_mask"] = pad_sequences(
                [b["input_ids"] for b in items], self.pad_token_id, self.padding_side
            )
            labels, _ = pad_sequences([b["labels"] for b in items], IGNORE_INDEX, self.padding_side)
            out["labels"] = labels
        if all("prompt_ids" in b for b in items):
            out["prompt_input_ids"], out["prompt_attention_mask"] = pad_sequences(
                [b["prompt_ids"] for b in items], self.pad_token_id, self.prompt_padding_side
            )
        for key in keys:
            if key in ("input_ids", "labels", "prompt_ids"):
                continue
            values = [b.get(key) for b in items]
            if key in ("media", "features"):
                shapes = {tuple(v.shape) for v in values}
                if len(shapes) != 1:
                    raise ValueError(f"cannot stack '{key}' of different shapes {sorted(shapes)}")
                out[key] = torch.stack(values)
            else:
                out[key] = values
        return out


def make_collate_fn(tokenizer: Any, **kwargs: Any) -> DataCollator:
    """A :class:`DataCollator` padding with the tokenizer's pad id (or EOS when it has none)."""
    return DataCollator(pad_token_id_of(tokenizer), **kwargs)
