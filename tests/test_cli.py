"""The ``epalm`` command line and recipe configs: help, every shipped YAML, config errors, bad inputs.

Configs: every ``configs/*.yaml`` present when the tests are collected must parse (with the
recipe's own checks) and, when its LM and encoder are in ``epalm.core.presets``, build on the meta
device. Errors: a missing or malformed config, a mistyped key anywhere and an unreadable media file
end the CLI with exit code 2 and a message naming the culprit (no traceback); with
``data.on_error=skip`` a corrupt image is skipped with a warning naming it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from epalm.interface import cli
from epalm.data import MediaError, SkippedSampleWarning
from epalm.recipes.run import CAPTION_DATASETS, RunConfig, load_run_config, media_loader, run_config_from_dict

from test_recipe import (  # the tiny models and fixture writers of the recipe tests
    QUESTION,
    build_models,
    coco_name,
    fixture_corpus,
    recipe,
    run_cli,
    write_config,
    write_json,
    write_small_vqa_root,
)

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # written by others: test whatever exists
DATASETS = {"vqa_v2", "vqa_v2_standard", "gqa", "coco", "msrvtt_qa", "msvd_qa", "msrvtt_caption", "audiocaps"}
CORE_SUBCOMMANDS = ["train", "eval", "predict", "cache-features", "params", "tiny-demo"]


def _subcommands() -> list[str]:
    parser = cli.build_parser()
    return sorted(next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices)


SUBCOMMANDS = _subcommands()  # whatever exists (others add subcommands): every one needs a working --help


# =========================================================================== help and entry points


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help_works_for_every_subcommand(sub, capsys):
    argv = ["--help"] if sub is None else [sub, "--help"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: epalm{'' if sub is None else ' ' + sub}")
    if sub is None:
        assert all(s in out for s in SUBCOMMANDS)


def test_the_documented_subcommands_exist():
    assert set(CORE_SUBCOMMANDS) <= set(SUBCOMMANDS)


def test_module_entry_point_and_usage_errors():
    done = subprocess.run([sys.executable, "-m", "epalm.interface.cli", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--resume" in done.stdout
    done = subprocess.run([sys.executable, "-m", "epalm.interface.cli", "frobnicate"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "invalid choice" in done.stderr
    with pytest.raises(SystemExit) as info:  # eval without --checkpoint: argparse's usage error
        cli.main(["eval", "x.yaml"])
    assert info.value.code == 2


def test_params_counts_a_preset_without_downloading(capsys):
    assert cli.main(["params", "--lm", "facebook/opt-125m", "--variant", "epalm"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lm"] == "facebook/opt-125m" and report["variant"] == "epalm"
    assert 0 < report["trainable"] < report["total"] and report["trainable_percent"] < 5
    assert report["inject_layers"] == [7, 12]  # the release's 19..31 of 32, scaled to 12 layers
    rc, _, err = run_cli("params", "--lm", "no/such-lm")
    assert rc == 2 and "no/such-lm" in err


# =========================================================================== shipped configs


def _needs_configs():
    if not CONFIGS:
        pytest.skip("configs/ has no YAML yet")


@pytest.mark.parametrize("path", CONFIGS or [None], ids=[p.name for p in CONFIGS] or ["none"])
def test_shipped_config_parses(path):
    if path is None:
        _needs_configs()
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)
    assert run_config_from_dict(cfg.to_dict()) == cfg  # what run_config.json records rebuilds the run
    assert cfg.data.dataset in DATASETS and (cfg.data.eval_dataset or cfg.data.dataset) in DATASETS
    kind = cfg.metric_kind()
    assert kind in ("vqa", "exact_match", "caption")
    assert (kind == "caption") == ((cfg.data.eval_dataset or cfg.data.dataset) in CAPTION_DATASETS)
    assert cfg.train.batch_size % cfg.train.grad_accum == 0
    assert callable(media_loader(cfg)) and callable(media_loader(cfg, dataset=cfg.data.eval_dataset))


@pytest.mark.parametrize("path", CONFIGS or [None], ids=[p.name for p in CONFIGS] or ["none"])
def test_shipped_config_builds_on_meta(path):
    from epalm.core.presets import ENCODER_CONFIGS, LM_CONFIGS, build_random

    if path is None:
        _needs_configs()
    cfg = load_run_config(path)
    # every shipped recipe names architectures that epalm.core.presets knows (no download needed)
    assert cfg.model.lm in LM_CONFIGS, cfg.model.lm
    assert cfg.model.encoder.removeprefix("framewise:") in ENCODER_CONFIGS, cfg.model.encoder
    model = build_random(cfg.model, device="meta")
    report = model.parameter_report()
    assert 0 < report["trainable"] < report["total"]
    assert 0 <= model.inject_start < model.inject_end <= len(model.engine.anatomy.layers)


# =========================================================================== config errors

BASE = {"model": {"lm": "facebook/opt-125m"}, "data": {"dataset": "vqa_v2"}, "train": {"epochs": 1},
        "eval": {"batch_size": 8}}


@pytest.mark.parametrize("patch, key", [
    ({"train": {"epocs": 3}}, "epocs"),
    ({"train": {"optim": {"lrr": 1e-4}}}, "lrr"),
    ({"data": {"datset": "coco"}}, "datset"),
    ({"model": {"encodr": "vit"}}, "encodr"),
    ({"eval": {"metrik": "vqa"}}, "metrik"),
    ({"eval": {"generation": {"beams": 3}}}, "beams"),
    ({"trian": {"epochs": 3}}, "trian"),
])
def test_mistyped_key_is_named_and_exits_2(tmp_path, patch, key):
    data = json.loads(json.dumps(BASE))
    for section, values in patch.items():
        if section in data and isinstance(values, dict):
            data[section].update(values)
        else:
            data[section] = values
    path = write_config(tmp_path / "bad.yaml", data)
    with pytest.raises(ValueError, match=rf"unknown .*'{key}'"):
        load_run_config(path)
    for sub in (["train", path], ["eval", path, "--checkpoint", str(tmp_path)], ["cache-features", path]):
        rc, out, err = run_cli(*sub)
        assert rc == 2, (sub, err)
        assert key in err and str(path) in err and err.startswith(f"epalm {sub[0]}: error:")
        assert "Traceback" not in err


def test_mistyped_override_and_bad_values(tmp_path):
    path = write_config(tmp_path / "ok.yaml", BASE)
    assert load_run_config(path, ["train.epochs=3", "train.optim.lr=1e-3", "data.mean=[0.5,0.5,0.5]"]).train.epochs == 3
    cfg = load_run_config(path, ["train.optim.lr=1e-3", "eval.generation.num_beams=3"])
    assert cfg.train.optim.lr == 1e-3 and isinstance(cfg.train.optim.lr, float)  # YAML 1.1 would say "1e-3"
    for override, needle in [("train.epocs=3", "epocs"), ("train.optim.betas2=1", "betas2"),
                             ("train.epochs", "section.key=value"), ("model.variant=nope", "unknown variant"),
                             ("train.mixed_precision=fp8", "mixed_precision"), ("train.on_nan=ignore", "on_nan"),
                             ("train.epochs.x=1", "not a section")]:
        rc, _, err = run_cli("train", path, override)
        assert rc == 2 and needle in err, (override, err)


def test_section_shapes(tmp_path):
    empty = tmp_path / "empty_sections.yaml"
    empty.write_text("model:\ndata:\ntrain:\neval:\n  generation:\n")
    cfg = load_run_config(empty)
    assert cfg == RunConfig()  # empty sections are the defaults
    bad = tmp_path / "bad_section.yaml"
    bad.write_text("train: 3\n")
    with pytest.raises(ValueError, match="section 'train' must be a mapping"):
        load_run_config(bad)
    assert load_run_config(write_config(tmp_path / "e.yaml", {})) == RunConfig()


def test_missing_and_malformed_config_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    for argv in (["train", missing], ["eval", missing, "--checkpoint", tmp_path], ["cache-features", missing]):
        rc, out, err = run_cli(*argv)
        assert rc == 2 and "no such config file" in err and str(missing) in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  lm: [unclosed\ntrain: {epochs: 1\n")
    rc, _, err = run_cli("train", broken)
    assert rc == 2 and "invalid YAML" in err and str(broken) in err
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n- data\n")
    rc, _, err = run_cli("train", listing)
    assert rc == 2 and "must be a mapping" in err


# =========================================================================== bad inputs (real runs)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Tiny models + a VQA v2 Karpathy root with one corrupt and one truncated image (and a clean copy)."""
    base = tmp_path_factory.mktemp("cli")
    models = build_models(base / "models", fixture_corpus())
    roots = {}
    for name in ("clean", "corrupt"):
        root = base / name
        write_small_vqa_root(root)
        if name == "corrupt":
            bad = root / "COCO/images/train2014" / coco_name("train2014", 3)
            bad.write_bytes(b"this is not a JPEG " * 10)
            cut = root / "COCO/images/val2014" / coco_name("val2014", 2)
            cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 3])
            roots["bad_train"], roots["bad_test"] = bad, cut
        roots[name] = root
    return {"base": base, "models": models, **roots}


def _cfg(small, tmp_path, root, **data):
    assets = {"models": small["models"], "root": root}
    cfg = recipe(assets, "vqa", tmp_path / "run", train={"epochs": 1, "batch_size": 4}, data=data)
    return write_config(tmp_path / "vqa.yaml", cfg)


def test_clean_fixture_trains(small, tmp_path):
    rc, out, err = run_cli("train", _cfg(small, tmp_path, small["clean"]))
    assert rc == 0, err[-3000:]
    assert len(json.loads((tmp_path / "run" / "eval_epoch0" / "predictions.json").read_text())) == 4


def test_corrupt_image_raises_media_error_naming_the_file(small, tmp_path):
    from epalm.recipes.run import run_train

    path = _cfg(small, tmp_path, small["corrupt"])
    rc, out, err = run_cli("train", path)
    assert rc == 2
    assert str(small["bad_train"]) in err and "unreadable image" in err and "Traceback" not in err
    with pytest.raises(MediaError, match="unreadable image") as info:
        run_train(load_run_config(path), progress=False)
    assert info.value.path == str(small["bad_train"])


def test_corrupt_images_are_skipped_with_a_warning(small, tmp_path):
    path = _cfg(small, tmp_path, small["corrupt"], on_error="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, out, err = run_cli("train", path)
    assert rc == 0, err[-3000:]
    skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning)]
    assert any(str(small["bad_train"]) in m and "12" in m for m in skipped), skipped  # question 12
    assert any(str(small["bad_test"]) in m and "21" in m for m in skipped), skipped  # question 21
    preds = json.loads((tmp_path / "run" / "eval_epoch0" / "predictions.json").read_text())
    assert sorted(p["question_id"] for p in preds) == [20, 22, 23]  # the unreadable one is not answered
    assert (tmp_path / "run" / "best" / "epalm_config.json").is_file()


def test_missing_image_and_missing_annotations(small, tmp_path):
    root = small["base"] / "missing"
    write_json(root / "vqa/karpathy_train.json", [{"question_id": 1, "question": QUESTION, "answer": "red",
                                                    "image": "train2014/nope.jpg"}])
    write_json(root / "vqa/karpathy_test.json", [{"question_id": 2, "question": QUESTION, "answer": "red",
                                                   "image": "train2014/nope.jpg"}])
    rc, _, err = run_cli("train", _cfg(small, tmp_path, root))
    assert rc == 2 and "nope.jpg" in err and "file not found" in err
    rc, _, err = run_cli("train", _cfg(small, tmp_path, small["base"] / "no-such-root"))
    assert rc == 2 and "karpathy_train.json" in err


def test_predict_and_eval_with_a_bad_checkpoint(small, tmp_path):
    image = small["clean"] / "COCO/images/val2014" / coco_name("val2014", 1)
    rc, _, err = run_cli("predict", tmp_path / "no-checkpoint", "--image", image)
    assert rc == 2 and "no-checkpoint" in err
    rc, _, err = run_cli("eval", _cfg(small, tmp_path, small["clean"]), "--checkpoint", tmp_path / "no-checkpoint")
    assert rc == 2 and "no-checkpoint" in err


# =========================================================================== portable checkpoints
def test_tiny_demo_checkpoint_loads_alone_from_another_folder(tmp_path):
    """``epalm tiny-demo``'s random models exist nowhere else: the checkpoint carries them."""
    import shutil

    from epalm.core.model import EPALM
    from epalm.recipes.tiny import ColourDataset, accuracy, run

    result = run(str(tmp_path / "demo"), epochs=3)
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "demo" / "final", moved)
    shutil.rmtree(tmp_path / "demo")
    model = EPALM.from_pretrained(moved)
    assert accuracy(model.eval(), ColourDataset(48, seed=1)) == result["accuracy_after"]


def test_train_checkpoint_is_portable_and_predicts(small, tmp_path):
    """``epalm train``'s best/ holds the processor and names the models relative to itself: the run and
    the models moved together load with from_pretrained(path) alone; already-loaded models are accepted too."""
    import os
    import shutil

    from transformers import AutoModelForCausalLM

    from epalm.core.encoders import load_encoder
    from epalm.core.model import EPALM
    from epalm.data.processor import EPALMProcessor

    rc, out, err = run_cli("train", _cfg(small, tmp_path, small["clean"]))
    assert rc == 0, err[-3000:]
    best = tmp_path / "run" / "best"
    config = json.loads((best / "epalm_config.json").read_text())
    assert not os.path.isabs(config["lm"]) and not os.path.isabs(config["encoder"])
    assert EPALMProcessor.from_pretrained(best).media.image_size == 16
    models = small["base"] / "models"
    common = Path(os.path.commonpath([models, best]))
    new_root = tmp_path / "other-machine"
    for folder in (models, tmp_path / "run"):
        shutil.copytree(folder, new_root / folder.relative_to(common))
    moved = new_root / best.relative_to(common)
    model = EPALM.from_pretrained(moved)
    reference = EPALM.from_pretrained(best, lm=AutoModelForCausalLM.from_pretrained(small["models"]["lm"]),
                                      encoder=load_encoder(small["models"]["vit"], num_layers=2))
    for (name, a), b in zip(model.trainable_state_dict().items(), reference.trainable_state_dict().values()):
        assert torch.equal(a, b), name
    image = small["clean"] / "COCO/images/val2014" / coco_name("val2014", 1)
    rc, out, err = run_cli("predict", moved, "--image", image, "--prompt", QUESTION)
    assert rc == 0, err[-3000:]
    assert "answer" in json.loads(out.strip().splitlines()[-1])
