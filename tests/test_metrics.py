"""Metrics follow the official scorers: VQA v2 vqaEval.py, exact match, pycocoevalcap; writers are atomic."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

import epalm.io as eio
from epalm.evaluation import metrics as M
from epalm.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from epalm.evaluation.metrics import (
    JavaNotFoundError,
    caption_scores,
    exact_match_accuracy,
    normalize_exact_match,
    normalize_vqa_answer,
    process_punctuation,
    vqa_accuracy,
    vqa_score,
    write_caption_predictions,
    write_metrics,
    write_vqa_predictions,
)

# ---------------------------------------------------------------------------------------------
# VQA normalisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("yes", "yes"),
        ("Yes", "yes"),
        ("yes.", "yes"),  # periods not followed by a digit are removed
        ("yes!", "yes"),  # "!" becomes a space, split() drops it
        ("two", "2"),
        ("Two dogs", "2 dogs"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # manualMap stops at ten
        ("a dog", "dog"),
        ("the red one", "red 1"),
        ("an apple", "apple"),
        ("the", ""),
        ("dont", "don't"),
        ("Dont know", "don't know"),
        ("isnt", "isn't"),
        ("the dont", "don't"),  # contractions after article removal
        ("somebody'd", "somebodyd"),  # official table quirk
        ("Im", "im"),  # capitalised keys never match: text is lower-cased first
        ("it's", "it's"),  # apostrophe is not in the punctuation list
        ("3.5", "3.5"),  # period followed by a digit is kept
        ("1,000", "1000"),  # digit,digit present: every punctuation mark is deleted
        ("1,000 (approx)", "1000 approx"),
        ("red, white", "red white"),  # "," touches a space: deleted
        ("red,white", "red white"),  # otherwise replaced by a space
        ("black-and-white", "black and white"),
        ("t-shirt", "t shirt"),
        ("left / right", "left right"),
        ("a/b", "b"),  # "/" -> space, then the article "a" is dropped
        ("mr. smith", "mr smith"),
        ("u.s.a.", "usa"),
        ("10:30", "10:30"),  # ":" is not in the list
        (" yes\tno\n", "yes no"),
        ("  many   spaces  ", "many spaces"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_period_strip_count_quirk() -> None:
    # Official code passes re.UNICODE (32) as sub()'s positional *count*: only 32 periods go.
    assert process_punctuation("x" + "." * 40) == "x" + "." * 8


def test_process_punctuation_keeps_spaces() -> None:
    # Ground-truth answers only get this step, which doesn't strip: "yes!" -> "yes ".
    assert process_punctuation("yes!") == "yes "
    assert process_punctuation("yes !") == "yes "


# ---------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        # mean over 10 leave-one-out subsets of min(1, matches among the other 9 / 3):
        (0, 0.0),
        (1, 0.3),  # matching annotator left out: 0; 9 others: 1/3 each -> 9*(1/3)/10 = 0.3
        (2, 0.6),  # 2 subsets keep 1 match (1/3), 8 keep 2 (2/3) -> (2/3 + 16/3)/10 = 0.6
        (3, 0.9),  # 3 subsets keep 2 (2/3), 7 keep 3 (1) -> (2 + 7)/10 = 0.9, not 1.0
        (4, 1.0),  # every subset keeps >= 3 matches
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(matches: int, expected: float) -> None:
    gts = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_accuracy("yes", gts) == pytest.approx(expected)


def test_vqa_accuracy_normalises_prediction() -> None:
    assert vqa_accuracy("Two.", ["2"] * 10) == pytest.approx(1.0)
    assert vqa_accuracy("the dog", ["dog"] * 10) == pytest.approx(1.0)
    assert vqa_accuracy("dont know", ["don't know"] * 10) == pytest.approx(1.0)


def test_vqa_ground_truth_only_gets_punctuation_when_annotators_disagree() -> None:
    # GT "two" is not mapped to "2" (no processDigitArticle on GT): only the three "2" match.
    gts = ["two"] * 7 + ["2"] * 3
    assert vqa_accuracy("two", gts) == pytest.approx(0.9)
    assert vqa_accuracy("2", gts) == pytest.approx(0.9)
    # Unanimous GT is compared raw: "yes." never equals the normalised prediction "yes".
    assert vqa_accuracy("yes.", ["yes."] * 10) == 0.0
    # Disagreeing GT gets processPunctuation: "yes." -> "yes", 9 matches -> 1.0.
    assert vqa_accuracy("yes", ["yes."] * 9 + ["no"]) == pytest.approx(1.0)


def test_vqa_accuracy_accepts_answer_dicts_and_any_count() -> None:
    assert vqa_accuracy("yes", [{"answer": "yes", "answer_id": i} for i in range(10)]) == 1.0
    # 3 identical answers: each leave-one-out subset has 2 matches -> 2/3.
    assert vqa_accuracy("yes", ["yes"] * 3) == pytest.approx(2 / 3)
    with pytest.raises(TypeError):
        vqa_accuracy("yes", "yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def _naive_vqa_accuracy(pred: str, gts: list[str]) -> float:
    """Reference: explicit leave-one-out subsets, per the VQA paper's definition."""
    pred = normalize_vqa_answer(pred)
    if len(set(gts)) > 1:
        gts = [process_punctuation(g) for g in gts]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        accs.append(min(1.0, sum(o == pred for o in others) / 3))
    return sum(accs) / len(accs)


def test_vqa_accuracy_matches_explicit_subsets() -> None:
    rng = random.Random(0)
    vocab = ["yes", "no", "2", "two", "red", "the red", "yes."]
    for _ in range(300):
        gts = [rng.choice(vocab) for _ in range(10)]
        pred = rng.choice(vocab)
        assert vqa_accuracy(pred, gts) == pytest.approx(_naive_vqa_accuracy(pred, gts))


def test_vqa_score_overall_and_breakdowns() -> None:
    annotations = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["red"] * 10}
    predictions = {1: "Yes", 2: "two", 3: "blue"}  # accuracies 1.0, 0.6, 0.0
    answer_types = {1: "yes/no", 2: "number", 3: "other"}
    out = vqa_score(predictions, annotations, answer_types, per_question=True)
    assert out["overall"] == 53.33  # round(100 * 1.6 / 3, 2)
    assert out["perAnswerType"] == {"yes/no": 100.0, "number": 60.0, "other": 0.0}
    assert out["perQuestionType"] == {}
    assert out["n_questions"] == 3
    assert out["perQuestion"] == {1: 100.0, 2: 60.0, 3: 0.0}


def test_vqa_score_official_annotation_entries() -> None:
    entry = {
        "question_id": 7,
        "answer_type": "yes/no",
        "question_type": "is the",
        "answers": [{"answer": "no", "answer_id": i + 1} for i in range(10)],
    }
    out = vqa_score({7: "No"}, {7: entry})
    assert out == {
        "overall": 100.0,
        "perAnswerType": {"yes/no": 100.0},
        "perQuestionType": {"is the": 100.0},
        "n_questions": 1,
    }


def test_vqa_score_requires_same_questions() -> None:
    with pytest.raises(ValueError, match="without prediction"):
        vqa_score({1: "yes"}, {1: ["yes"] * 10, 2: ["no"] * 10})
    with pytest.raises(ValueError, match="int vs str"):
        vqa_score({"1": "yes"}, {1: ["yes"] * 10})


# ---------------------------------------------------------------------------------------------
# GQA / video QA exact match
# ---------------------------------------------------------------------------------------------


def test_normalize_exact_match() -> None:
    assert normalize_exact_match("  The  Cat! ") == "the cat"
    assert normalize_exact_match("Yes.") == "yes"
    assert normalize_exact_match("t-shirt") == "t-shirt"  # only trailing punctuation goes


def test_exact_match_accuracy() -> None:
    # GQA: mappings keyed by question id
    assert exact_match_accuracy({"q1": "Yes.", "q2": "left"}, {"q1": "yes", "q2": "right"}) == 50.0
    # MSRVTT-QA / MSVD-QA: aligned sequences
    assert exact_match_accuracy(["man ", "Dog"], ["man", "dog"]) == 100.0
    assert exact_match_accuracy(["cat"], [["dog", "cat"]]) == 100.0  # any accepted answer
    with pytest.raises(ValueError):
        exact_match_accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        exact_match_accuracy({"q1": "a"}, {"q2": "a"})
    with pytest.raises(ValueError):
        exact_match_accuracy([], [])


# ---------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------

PREDS = {
    1: "A dog runs on the grass.",
    2: "two cats sleeping on a couch",
    3: "A man riding a bike down a street!",
}
REFS = {
    1: ["A dog is running on the grass.", "a brown dog runs across a lawn"],
    2: ["Two cats sleep on a sofa.", "Cats lying on a couch."],
    3: ["A man rides a bicycle down the street.", "a person riding a bike on a road"],
}


@pytest.fixture(scope="module")
def coco() -> types.ModuleType:
    pytest.importorskip("pycocoevalcap")
    if shutil.which("java") is None:
        pytest.skip("caption metrics need Java")
    return sys.modules["pycocoevalcap"]


@pytest.fixture(scope="module")
def scores(coco: types.ModuleType) -> dict:
    return caption_scores(PREDS, REFS)  # all metrics, one METEOR JVM for the module


def _direct_tokenize(preds: dict, refs: dict) -> tuple[dict, dict]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    res = tok.tokenize({k: [{"caption": v}] for k, v in preds.items()})
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    return gts, res


def test_tokenizer_matches_pycocoevalcap(coco: types.ModuleType) -> None:
    gts, res = _direct_tokenize(PREDS, REFS)
    java = shutil.which("java")
    assert M._ptb_tokenize({k: [v] for k, v in PREDS.items()}, java) == res
    assert M._ptb_tokenize(REFS, java) == gts
    assert res[3] == ["a man riding a bike down a street"]  # lower-cased, punctuation dropped


def test_tokenizer_line_breaks_do_not_shift_captions(coco: types.ModuleType) -> None:
    # pycocoevalcap's own tokenizer would put "runs" on image 2 and drop "a cat".
    out = M._ptb_tokenize({1: ["a dog\rruns"], 2: ["a cat\u2028sits"]}, shutil.which("java"))
    assert out == {1: ["a dog runs"], 2: ["a cat sits"]}


def test_caption_scores_match_pycocoevalcap_scorers(coco: types.ModuleType, scores: dict) -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _direct_tokenize(PREDS, REFS)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        assert scores[f"Bleu_{n + 1}"] == pytest.approx(bleu[n], rel=1e-12)
    assert scores["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
    assert scores["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-12)
    assert 0.0 < scores["METEOR"] < 1.0
    assert scores["CIDEr"] > 0
    assert scores["n_images"] == 3
    assert all(isinstance(scores[m], float) for m in M.CAPTION_METRICS if m != "SPICE")


def test_spice_reported_not_raised(coco: types.ModuleType, scores: dict) -> None:
    assert "SPICE" in scores
    if scores["SPICE"] is None:
        assert "SPICE" in scores["unavailable"]
        assert isinstance(scores["unavailable"]["SPICE"], str) and scores["unavailable"]["SPICE"]


def test_spice_unavailable_without_corenlp_jars(tmp_path) -> None:
    # A package dir without the CoreNLP jars: no download attempt, no exception.
    score, reason = M._spice({1: ["a dog"]}, {1: ["a dog"]}, tmp_path)
    assert score is None
    assert "stanford-corenlp-3.6.0" in reason and "offline" in reason


def test_spice_failure_is_reported(monkeypatch: pytest.MonkeyPatch, coco: types.ModuleType, tmp_path) -> None:
    class BrokenSpice:
        def __init__(self) -> None:
            raise OSError("no network")

    fake = types.ModuleType("pycocoevalcap.spice.spice")
    fake.Spice = BrokenSpice  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycocoevalcap.spice.spice", fake)
    monkeypatch.setattr(M, "_spice_unavailable_reason", lambda pkg_dir: None)
    out = caption_scores({1: "a dog"}, {1: ["a dog"]}, metrics=["SPICE"])
    assert out["SPICE"] is None
    assert out["unavailable"] == {"SPICE": "SPICE failed: OSError: no network"}


def test_meteor_failure_raises_and_reaps_jvm(monkeypatch: pytest.MonkeyPatch, coco: types.ModuleType) -> None:
    from pycocoevalcap.meteor import meteor as meteor_mod

    procs = []

    def dying_jvm(self) -> None:  # stands in for a JVM that dies at start (e.g. no 2 GB heap)
        code = "import sys; sys.stderr.write('Could not reserve enough space'); sys.exit(1)"
        self.meteor_p = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lock = threading.Lock()
        procs.append(self.meteor_p)

    monkeypatch.setattr(meteor_mod.Meteor, "__init__", dying_jvm)
    with pytest.raises(RuntimeError, match="METEOR scorer failed.*Could not reserve"):
        M._meteor({1: ["a dog"]}, {1: ["a dog"]})
    assert procs[0].poll() is not None


def test_identical_captions(coco: types.ModuleType) -> None:
    caps = {
        1: "a dog runs on the green grass",
        2: "two cats sleep on a red couch",
        3: "a man rides a bike down the street",
    }
    out = caption_scores(caps, {k: [v] for k, v in caps.items()}, metrics=("BLEU", "CIDEr"))
    # BLEU's smoothing constants (tiny=1e-15, small=1e-9) keep it a hair below 1.
    assert out["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    # CIDEr-D of a perfect candidate is 10 (x10 scaling of the mean cosine similarity).
    assert out["CIDEr"] == pytest.approx(10.0)
    assert set(out) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "unavailable", "n_images"}


def test_cider_single_image_is_zero(coco: types.ModuleType) -> None:
    # idf = log(#images / df) = log(1/1) = 0 for every n-gram of a one-image corpus.
    out = caption_scores({1: "a dog runs"}, {1: ["a dog runs"]}, metrics=["CIDEr"])
    assert out["CIDEr"] == 0.0


def test_caption_input_validation(coco: types.ModuleType) -> None:
    with pytest.raises(ValueError, match="no references"):
        caption_scores({1: "a"}, {2: ["a"]}, metrics=["BLEU"])
    with pytest.raises(ValueError, match="without prediction"):
        caption_scores({1: "a"}, {1: ["a"], 2: ["b"]}, metrics=["BLEU"])
    out = caption_scores({1: "a dog"}, {1: ["a dog"], 2: ["b"]}, metrics=["Bleu_1"], allow_missing_predictions=True)
    assert set(out) == {"Bleu_1", "unavailable", "n_images"} and out["n_images"] == 1
    with pytest.raises(ValueError, match="unknown caption metric"):
        caption_scores({1: "a"}, {1: ["a"]}, metrics=["BLEURT"])
    with pytest.raises(ValueError, match="non-empty list"):
        caption_scores({1: "a"}, {1: "a"}, metrics=["BLEU"])  # type: ignore[dict-item]


def test_missing_java_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(M, "_require_pycocoevalcap", lambda: tmp_path)
    monkeypatch.setattr(M.shutil, "which", lambda name: None)
    with pytest.raises(JavaNotFoundError, match="apt-get install -y openjdk-17-jre-headless"):
        caption_scores({1: "a dog"}, {1: ["a dog"]})


def test_missing_pycocoevalcap_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "pycocoevalcap" or n.startswith("pycocoevalcap.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(ImportError, match=r"pip install 'epalm\[eval\]'"):
        caption_scores({1: "a dog"}, {1: ["a dog"]})


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def test_write_vqa_predictions(tmp_path) -> None:
    path = write_vqa_predictions(tmp_path / "vqa.json", {np.int64(3): "yes", "1": "2"})
    assert json.loads(path.read_text()) == [
        {"question_id": 1, "answer": "2"},
        {"question_id": 3, "answer": "yes"},
    ]
    with pytest.raises(TypeError):
        write_vqa_predictions(tmp_path / "bad.json", {1: None})  # type: ignore[dict-item]
    assert not (tmp_path / "bad.json").exists()


def test_write_caption_predictions(tmp_path) -> None:
    path = write_caption_predictions(tmp_path / "sub" / "caps.json", {np.int64(42): "a dog", "img_7": "a cat"})
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"image_id": 42, "caption": "a dog"},
        {"image_id": "img_7", "caption": "a cat"},
    ]


def test_write_metrics_is_strict_json(tmp_path) -> None:
    metrics = {"CIDEr": np.float64(1.25), "SPICE": float("nan"), "n": np.int32(3), "per": {1: np.array([0.5])}}
    path = write_metrics(tmp_path / "metrics.json", metrics)

    def reject(const: str) -> None:
        raise AssertionError(f"non-standard JSON constant {const}")

    assert json.loads(path.read_text(), parse_constant=reject) == {
        "CIDEr": 1.25,
        "SPICE": None,
        "n": 3,
        "per": {"1": [0.5]},
    }


def test_atomic_write_json_serialisation_failure_leaves_original(tmp_path) -> None:
    path = tmp_path / "out.json"
    path.write_text('{"old": true}\n')
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert path.read_text() == '{"old": true}\n'
    assert os.listdir(tmp_path) == ["out.json"]


def test_atomic_write_io_failure_leaves_original_and_no_temp(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.json"
    path.write_text("old")

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(eio.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"new": 1})
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]


def test_atomic_write_roundtrip_and_modes(tmp_path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    new = atomic_write_text(tmp_path / "a" / "b.txt", "héllo")
    assert new.read_text(encoding="utf-8") == "héllo"
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
    existing = tmp_path / "secret.bin"
    existing.write_bytes(b"old")
    existing.chmod(0o600)
    atomic_write_bytes(existing, b"new")
    assert existing.read_bytes() == b"new"
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    atomic_write_json(tmp_path / "u.json", {"k": "é"})
    assert (tmp_path / "u.json").read_text(encoding="utf-8") == '{\n  "k": "é"\n}\n'
    assert sorted(os.listdir(tmp_path)) == ["a", "secret.bin", "u.json"]


# ------------------------------------------------------------------ the two official scorer versions
def test_vqa_scorer_versions_on_known_inputs():
    from epalm.evaluation.metrics import vqa_accuracy, vqa_score

    unanimous = ["2"] * 10
    # pre-2021 (default, the eP-ALM release): the prediction is always normalised
    assert vqa_accuracy("Two", unanimous) == 1.0
    assert vqa_accuracy("the 2.", unanimous) == 1.0
    # 2021 (GT-Vision-Lab/VQA a013f00): no normalisation at all when the 10 answers agree
    assert vqa_accuracy("Two", unanimous, scorer="2021") == 0.0
    assert vqa_accuracy("  2\n", unanimous, scorer="2021") == 1.0  # only newline/tab/space cleaning
    # annotators disagree: both versions normalise the prediction ...
    mixed = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("Two", mixed) == vqa_accuracy("Two", mixed, scorer="2021") == pytest.approx(0.9)
    # ... but only 2021 applies the digit/article step to the ground truth
    gts = ["two"] * 4 + ["three"] * 6
    assert vqa_accuracy("2", gts) == 0.0
    assert vqa_accuracy("2", gts, scorer="2021") == 1.0
    scores = vqa_score({1: "Two", 2: "2"}, {1: unanimous, 2: gts}, scorer="2021")
    assert scores["overall"] == 50.0
    assert vqa_score({1: "Two", 2: "2"}, {1: unanimous, 2: gts})["overall"] == 50.0
    with pytest.raises(ValueError, match="scorer"):
        vqa_accuracy("2", unanimous, scorer="2017")
