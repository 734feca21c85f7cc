"""Evaluation metrics with the conventions of the official scorers, so numbers are comparable.

* VQA v2 accuracy: a faithful re-implementation of ``vqaEval.py`` (VQA API, GT-Vision-Lab),
  including its quirks (see :func:`vqa_accuracy`).
* GQA / MSRVTT-QA / MSVD-QA: exact match after light normalisation.
* Captioning (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE): ``pycocoevalcap`` scorers on
  PTB-tokenised text, imported lazily (``pip install 'epalm[eval]'``; needs Java).
* Writers for the official submission formats, atomic via :mod:`epalm.io`.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import shutil
import string
import subprocess
import tempfile
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from epalm.io import atomic_write_json

__all__ = [
    "normalize_vqa_answer",
    "process_punctuation",
    "process_digit_article",
    "vqa_accuracy",
    "vqa_score",
    "VQA_SCORERS",
    "normalize_exact_match",
    "exact_match",
    "exact_match_accuracy",
    "grouped_exact_match",
    "CAPTION_METRICS",
    "caption_scores",
    "JavaNotFoundError",
    "write_vqa_predictions",
    "write_caption_predictions",
    "write_metrics",
]

# ---------------------------------------------------------------------------------------------
# VQA v2 (official vqaEval.py tables and behaviour)
# ---------------------------------------------------------------------------------------------

# Official contraction table, verbatim including its oddities: the capitalised keys can never
# match (text is lower-cased first) and "somebody'd" maps to "somebodyd".
VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

VQA_MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

VQA_ARTICLES: tuple[str, ...] = ("a", "an", "the")

# Official regexes, verbatim. "(?!<=\d)" is a negative *lookahead* for the literal "<=" + digit
# (a typo for a lookbehind), so in effect every "." not followed by a digit is removed.
VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
VQA_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
VQA_PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)
# The official code calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in the
# positional ``count`` argument, so at most re.UNICODE == 32 periods are removed.
_VQA_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``.

    A punctuation mark is deleted if it touches a space anywhere in the input (or the input has a
    digit-comma-digit group such as "1,000"), otherwise it becomes a space; then periods not
    followed by a digit are removed. Apostrophes, colons, ``#``, ``$``, ``%``... are kept.
    """
    out = text
    has_digit_comma = VQA_COMMA_STRIP.search(text) is not None
    for p in VQA_PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return VQA_PERIOD_STRIP.sub("", out, count=_VQA_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words -> digits, drop articles,
    then expand apostrophe-less contractions ("dont" -> "don't"); words re-joined by one space."""
    words = [VQA_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """The full normalisation the official script applies to a *predicted* answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def _gt_answer_strings(value: Any) -> list[str]:
    """Accept ``["yes", ...]``, ``[{"answer": "yes"}, ...]`` or an official annotation entry."""
    if isinstance(value, Mapping):
        value = value["answers"]
    if isinstance(value, str):
        raise TypeError("ground-truth answers must be a list of strings, got a single string")
    answers = [a["answer"] if isinstance(a, Mapping) else a for a in value]
    if not answers:
        raise ValueError("a question needs at least one ground-truth answer")
    for a in answers:
        if not isinstance(a, str):
            raise TypeError(f"ground-truth answer must be str, got {type(a).__name__}")
    return answers


VQA_SCORERS = ("pre-2021", "2021")


def vqa_accuracy(prediction: str, gt_answers: Sequence[str] | Sequence[Mapping[str, Any]],
                 scorer: str = "pre-2021") -> float:
    """VQA accuracy of one prediction, in [0, 1], exactly as the official ``vqaEval.py``.

    For each of the N annotators, the prediction scores ``min(1, matches among the other N-1
    answers / 3)``; the result is the mean over the N leave-one-out subsets. With 10 answers:
    1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.

    ``scorer`` picks the version of the official script (GT-Vision-Lab/VQA):

    * ``"pre-2021"`` (default; the eP-ALM release and the papers of its time): the prediction
      always gets the full normalisation (:func:`normalize_vqa_answer`), the ground-truth answers
      only :func:`process_punctuation` (no digit/article/contraction step, no strip), and only when
      the annotators disagree.
    * ``"2021"`` (the repository since commit a013f00, 2021-03-11, "Fixed processing answers
      bug"): prediction and answers are stripped of newlines, tabs and outer spaces; when the
      annotators disagree both get :func:`process_punctuation` + :func:`process_digit_article`;
      when all answers agree, nothing is normalised (``"Two"`` no longer matches ``"2"``).

    VQA v2 ground truth is already normalised, so the versions differ only on unnormalised
    predictions of unanimous questions and on hand-made annotations.
    """
    if scorer not in VQA_SCORERS:
        raise ValueError(f"scorer must be one of {VQA_SCORERS}, got {scorer!r}")
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be str, got {type(prediction).__name__}")
    gts = _gt_answer_strings(gt_answers)
    if scorer == "pre-2021":
        pred = normalize_vqa_answer(prediction)
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
    else:
        def clean(text: str) -> str:
            return text.replace("\n", " ").replace("\t", " ").strip()

        gts = [clean(a) for a in gts]
        pred = clean(prediction)
        if len(set(gts)) > 1:
            gts = [process_digit_article(process_punctuation(a)) for a in gts]
            pred = process_digit_article(process_punctuation(pred))
    total_matches = sum(a == pred for a in gts)
    accs = []
    for a in gts:  # leave annotator i out: its own answer no longer counts
        others = total_matches - (a == pred)
        accs.append(min(1.0, others / 3))
    return sum(accs) / len(accs)


def _check_same_ids(pred_ids: Iterable[Hashable], gt_ids: Iterable[Hashable], what: str) -> None:
    """Raise with examples when predictions and ground truth don't cover the same ids."""
    pred_set, gt_set = set(pred_ids), set(gt_ids)
    if pred_set == gt_set:
        return
    missing = sorted(map(repr, gt_set - pred_set))[:5]
    extra = sorted(map(repr, pred_set - gt_set))[:5]
    raise ValueError(
        f"predictions and ground truth cover different {what}s: "
        f"{len(gt_set - pred_set)} without prediction (e.g. {missing}), "
        f"{len(pred_set - gt_set)} without ground truth (e.g. {extra}). "
        "Check the id types too (int vs str keys after a JSON round trip)."
    )


def vqa_score(
    predictions: Mapping[Hashable, str],
    annotations: Mapping[Hashable, Any],
    answer_types: Mapping[Hashable, str] | None = None,
    question_types: Mapping[Hashable, str] | None = None,
    *,
    ndigits: int = 2,
    per_question: bool = False,
    scorer: str = "pre-2021",
) -> dict[str, Any]:
    """Official VQA v2 scores, as percentages rounded to ``ndigits`` (like ``VQAEval(n=2)``).

    ``annotations`` maps question id -> the 10 annotator answers (strings, ``{"answer": ...}``
    dicts, or the official annotation entry, whose ``answer_type``/``question_type`` are then
    used when the explicit mappings are not given). Like the official ``loadRes``, predictions
    must cover exactly the annotated questions.

    ``scorer``: ``"pre-2021"`` (default, the eP-ALM release) or ``"2021"`` (the official
    repository today); see :func:`vqa_accuracy`.

    Returns ``{"overall", "perAnswerType", "perQuestionType", "n_questions"}`` (+ ``"perQuestion"``
    when ``per_question``); the breakdowns are empty when no types are known.
    """
    if not annotations:
        raise ValueError("no annotations to evaluate against")
    _check_same_ids(predictions.keys(), annotations.keys(), "question id")

    def type_of(qid: Hashable, given: Mapping[Hashable, str] | None, key: str) -> str | None:
        if given is not None:
            return given[qid]
        entry = annotations[qid]
        return entry.get(key) if isinstance(entry, Mapping) else None

    accs: dict[Hashable, float] = {}
    by_ans: dict[str, list[float]] = {}
    by_ques: dict[str, list[float]] = {}
    for qid, gt in annotations.items():
        acc = vqa_accuracy(predictions[qid], gt, scorer=scorer)
        accs[qid] = acc
        if (atype := type_of(qid, answer_types, "answer_type")) is not None:
            by_ans.setdefault(atype, []).append(acc)
        if (qtype := type_of(qid, question_types, "question_type")) is not None:
            by_ques.setdefault(qtype, []).append(acc)

    def pct(values: Sequence[float]) -> float:
        return round(100 * float(sum(values)) / len(values), ndigits)

    result: dict[str, Any] = {
        "overall": pct(list(accs.values())),
        "perAnswerType": {t: pct(v) for t, v in by_ans.items()},
        "perQuestionType": {t: pct(v) for t, v in by_ques.items()},
        "n_questions": len(accs),
    }
    if per_question:
        result["perQuestion"] = {q: round(100 * a, ndigits) for q, a in accs.items()}
    return result


# ---------------------------------------------------------------------------------------------
# GQA / video QA exact match
# ---------------------------------------------------------------------------------------------

_TRAILING_PUNCT = string.punctuation


def normalize_exact_match(answer: str) -> str:
    """Lower-case, collapse whitespace, strip trailing punctuation ("Yes." -> "yes").

    GQA and MSRVTT-QA / MSVD-QA answers are single words or short phrases compared verbatim;
    this only removes surface noise a generative LM adds.
    """
    return " ".join(answer.lower().split()).rstrip(_TRAILING_PUNCT).strip()


def exact_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """Whether ``prediction`` equals one of ``answers`` after :func:`normalize_exact_match`."""
    accepted = [answers] if isinstance(answers, str) else list(answers)
    norm = normalize_exact_match(prediction)
    return any(norm == normalize_exact_match(a) for a in accepted)


def grouped_exact_match(preds: Sequence[str], gts: Sequence[str | Sequence[str]],
                        groups: Sequence[Hashable] | None = None) -> dict[str, Any]:
    """Exact-match accuracy as a fraction (0-1), overall and per group (any sample attribute:
    answer type, class, template...): ``{"accuracy": float, "groups": {group: float}}``."""
    if len(preds) != len(gts) or (groups is not None and len(groups) != len(preds)):
        raise ValueError(f"{len(preds)} predictions, {len(gts)} ground truths"
                         + (f", {len(groups)} groups" if groups is not None else ""))
    if not preds:
        raise ValueError("nothing to evaluate")
    hits = [exact_match(p, g) for p, g in zip(preds, gts)]
    by: dict[Hashable, list[bool]] = {}
    for g, h in zip(groups or [], hits):
        if g is not None:
            by.setdefault(g, []).append(h)
    return {"accuracy": sum(hits) / len(hits),
            "groups": {g: sum(v) / len(v) for g, v in sorted(by.items(), key=lambda kv: str(kv[0]))}}


def exact_match_accuracy(
    preds: Mapping[Hashable, str] | Sequence[str],
    gts: Mapping[Hashable, str | Sequence[str]] | Sequence[str | Sequence[str]],
) -> float:
    """Percentage (0-100) of predictions equal to the ground truth after
    :func:`normalize_exact_match` (:func:`exact_match`). A ground truth may be a list of
    acceptable answers. Mappings must have the same keys; sequences the same length.
    """
    if isinstance(preds, Mapping) != isinstance(gts, Mapping):
        raise TypeError("preds and gts must both be mappings or both be sequences")
    if isinstance(preds, Mapping):
        _check_same_ids(preds.keys(), gts.keys(), "id")  # type: ignore[union-attr]
        pairs = [(preds[k], gts[k]) for k in gts]  # type: ignore[index]
    else:
        if isinstance(preds, str) or isinstance(gts, str):
            raise TypeError("preds and gts must be sequences of strings, not a single string")
        if len(preds) != len(gts):
            raise ValueError(f"{len(preds)} predictions for {len(gts)} ground truths")
        pairs = list(zip(preds, gts))
    if not pairs:
        raise ValueError("nothing to evaluate")
    return 100.0 * sum(exact_match(p, g) for p, g in pairs) / len(pairs)


# ---------------------------------------------------------------------------------------------
# Captioning (pycocoevalcap)
# ---------------------------------------------------------------------------------------------

CAPTION_METRICS: tuple[str, ...] = (
    "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE",
)
_METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "meteor": ("METEOR",),
    "rouge_l": ("ROUGE_L",),
    "rouge": ("ROUGE_L",),
    "cider": ("CIDEr",),
    "spice": ("SPICE",),
    **{m.lower(): (m,) for m in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")},
}
_DEFAULT_CAPTION_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")

_JAVA_INSTALL_HINT = (
    "Java was not found on PATH; pycocoevalcap's PTB tokenizer, METEOR and SPICE run on the JVM. "
    "Install it, e.g. `apt-get install -y openjdk-17-jre-headless` (Debian/Ubuntu), "
    "`conda install -c conda-forge openjdk`, or `brew install openjdk`."
)
# Characters that Java's line reader or Python's str.splitlines treat as line breaks. One left in
# a caption would shift every following caption to the wrong image in the tokenizer's output.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


class JavaNotFoundError(RuntimeError):
    """Raised when caption metrics need Java and none is on PATH."""


def _require_pycocoevalcap() -> Path:
    """Import pycocoevalcap lazily (it is an optional extra); return its package directory."""
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    except ImportError as e:
        raise ImportError(
            "caption metrics need pycocoevalcap: `pip install 'epalm[eval]'` "
            "(or `pip install pycocoevalcap`)"
        ) from e
    return Path(ptb.__file__).resolve().parent.parent


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(_JAVA_INSTALL_HINT)
    return java


def _ptb_tokenize(captions: Mapping[Hashable, Sequence[str]], java: str) -> dict[Hashable, list[str]]:
    """pycocoevalcap's ``PTBTokenizer.tokenize`` (same jar, flags and punctuation filter).

    Re-implemented only for robustness: the temp file goes to the system temp dir rather than
    into site-packages (which may be read-only), tokenizer chatter is kept off stderr, Java
    failures raise, and the output is checked to have one line per caption.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = Path(ptb.__file__).resolve().parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    ids = [k for k, caps in captions.items() for _ in caps]
    sentences = [_LINE_BREAKS.sub(" ", c) for caps in captions.values() for c in caps]
    fd, tmp = tempfile.mkstemp(prefix="epalm_ptb_", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write("\n".join(sentences).encode("utf-8"))
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", tmp]
        proc = subprocess.run(cmd, capture_output=True, check=False)
    finally:
        os.unlink(tmp)
    if proc.returncode != 0:
        raise RuntimeError(
            f"PTB tokenizer failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}"
        )
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(sentences) or any(lines[len(sentences):]):
        raise RuntimeError(
            f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} captions"
        )
    out: dict[Hashable, list[str]] = {k: [] for k in captions}
    for k, line in zip(ids, lines):
        words = [w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS]
        out[k].append(" ".join(words))
    return out


def _resolve_metrics(metrics: Iterable[str]) -> list[str]:
    names: list[str] = []
    for m in [metrics] if isinstance(metrics, str) else metrics:
        group = _METRIC_GROUPS.get(m.lower())
        if group is None:
            raise ValueError(f"unknown caption metric {m!r}; choose from BLEU, {', '.join(CAPTION_METRICS)}")
        names += [g for g in group if g not in names]
    return [m for m in CAPTION_METRICS if m in names]  # canonical order


def _spice_unavailable_reason(pkg_dir: Path) -> str | None:
    """Why SPICE can't run, or None. Checked *before* ``Spice()``, whose constructor would try
    to download Stanford CoreNLP (and hang or fail offline)."""
    lib = pkg_dir / "spice" / "lib"
    needed = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    missing = [p.name for p in needed if not p.exists()]
    if missing:
        return (
            f"SPICE needs Stanford CoreNLP 3.6.0 jars ({', '.join(missing)}) in {lib}; "
            "pycocoevalcap downloads them from nlp.stanford.edu on first use, which is impossible "
            "offline. Run `python -m pycocoevalcap.spice.get_stanford_models` on a machine with "
            "network access, or copy the two jars there."
        )
    return None


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    metrics: Iterable[str] = _DEFAULT_CAPTION_METRICS,
    allow_missing_predictions: bool = False,
) -> dict[str, Any]:
    """COCO caption metrics (pycocoevalcap, PTB-tokenised, corpus level, 0-1 scale like ``COCOEvalCap``).

    ``metrics`` picks among BLEU (Bleu_1..4), METEOR, ROUGE_L, CIDEr, SPICE. Images are those of
    ``predictions``; every one needs references. References without a prediction raise unless
    ``allow_missing_predictions`` (then they are ignored, as with
    ``cocoEval.params['image_id'] = cocoRes.getImgIds()``).

    Returns ``{metric: float | None, ..., "unavailable": {metric: reason}, "n_images": int}``.
    SPICE never raises: when it cannot run it is ``None`` with a reason. CIDEr's idf comes from
    the references of the evaluated images, so a single image always scores 0.
    """
    wanted = _resolve_metrics(metrics)
    if not predictions:
        raise ValueError("no predictions to evaluate")
    missing_refs = [k for k in predictions if k not in references]
    if missing_refs:
        raise ValueError(f"{len(missing_refs)} predicted images have no references, e.g. {missing_refs[:5]}")
    if not allow_missing_predictions:
        _check_same_ids(predictions.keys(), references.keys(), "image id")
    for k, cap in predictions.items():
        if not isinstance(cap, str):
            raise TypeError(f"prediction for {k!r} must be str, got {type(cap).__name__}")
        refs = references[k]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references for {k!r} must be a non-empty list of strings")

    pkg_dir = _require_pycocoevalcap()
    java = _require_java()

    res = _ptb_tokenize({k: [predictions[k]] for k in predictions}, java)
    gts = _ptb_tokenize({k: list(references[k]) for k in predictions}, java)

    result: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    bleu = [m for m in wanted if m.startswith("Bleu_")]
    if bleu:
        from pycocoevalcap.bleu.bleu import Bleu

        scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for m in bleu:
            result[m] = float(scores[int(m[-1]) - 1])
    if "METEOR" in wanted:
        result["METEOR"] = _meteor(gts, res)
    if "ROUGE_L" in wanted:
        from pycocoevalcap.rouge.rouge import Rouge

        result["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in wanted:
        from pycocoevalcap.cider.cider import Cider

        result["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if "SPICE" in wanted:
        result["SPICE"], reason = _spice(gts, res, pkg_dir)
        if reason is not None:
            unavailable["SPICE"] = reason
    result["unavailable"] = unavailable
    result["n_images"] = len(predictions)
    return result


def _meteor(gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]]) -> float:
    """METEOR 1.5 via pycocoevalcap (a JVM with a 2 GB heap); the JVM is always reaped."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    proc = meteor.meteor_p
    try:
        return float(meteor.compute_score(gts, res)[0])
    except (ValueError, OSError) as e:  # a dead JVM answers '' -> float('') ValueError
        proc.kill()
        proc.wait()
        try:
            proc.stdin.close()
        except OSError:  # unflushed bytes to a dead process: BrokenPipeError
            pass
        err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
        raise RuntimeError(
            "METEOR scorer failed (it runs `java -jar -Xmx2G meteor-1.5.jar`, which needs ~2 GB "
            f"of free memory): {type(e).__name__}: {e}. JVM stderr: {err}"
        ) from e
    finally:
        # compute_score keeps its lock if it raised; Meteor.__del__ would then block forever.
        if meteor.lock.locked():
            meteor.lock.release()
        if proc.poll() is None:
            proc.stdin.close()
            proc.kill()
            proc.wait()
        # (Meteor.__del__ later repeats close/kill/wait, harmlessly.)


def _spice(
    gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]], pkg_dir: Path
) -> tuple[float | None, str | None]:
    """SPICE score, or ``(None, reason)``; never raises."""
    reason = _spice_unavailable_reason(pkg_dir)
    if reason is not None:
        return None, reason
    try:
        from pycocoevalcap.spice.spice import Spice

        score = float(Spice().compute_score(gts, res)[0])
    except Exception as e:  # noqa: BLE001 - SPICE is best effort by contract
        return None, f"SPICE failed: {type(e).__name__}: {e}"
    if math.isnan(score):
        return None, "SPICE returned NaN"
    return score, None


# ---------------------------------------------------------------------------------------------
# Writers (official submission formats)
# ---------------------------------------------------------------------------------------------


def _plain_id(x: Any) -> Any:
    """numpy/torch integer ids -> int so json can encode them; other ids unchanged."""
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return int(x)
    return x


def write_vqa_predictions(path: str | os.PathLike[str], predictions: Mapping[Hashable, str]) -> Path:
    """VQA evaluation-server results file: ``[{"question_id": int, "answer": str}]``, sorted by id."""
    rows = []
    for qid, answer in predictions.items():
        if not isinstance(answer, str):
            raise TypeError(f"answer for question {qid!r} must be str, got {type(answer).__name__}")
        rows.append({"question_id": int(qid), "answer": answer})  # type: ignore[call-overload]
    rows.sort(key=lambda r: r["question_id"])
    return atomic_write_json(path, rows, indent=None)


def write_caption_predictions(path: str | os.PathLike[str], predictions: Mapping[Hashable, str]) -> Path:
    """COCO captions results file: ``[{"image_id": id, "caption": str}]``.

    Integer ids are written as ints (the COCO server requires them); other ids (e.g. Flickr30k
    file stems) are kept as given.
    """
    rows = []
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"caption for image {image_id!r} must be str, got {type(caption).__name__}")
        rows.append({"image_id": _plain_id(image_id), "caption": caption})
    return atomic_write_json(path, rows, indent=None)


def _json_safe(obj: Any) -> Any:
    """Metrics -> strict JSON: numpy scalars/arrays to Python, NaN/inf to null, keys to str."""
    if isinstance(obj, Mapping):
        return {str(_plain_id(k)): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy / torch
        return _json_safe(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj  # let json raise on anything else, before the file is touched


def write_metrics(path: str | os.PathLike[str], metrics: Mapping[str, Any]) -> Path:
    """Pretty, strict JSON of a metrics dict (numpy values and NaN handled), written atomically."""
    return atomic_write_json(path, _json_safe(metrics), indent=2)
