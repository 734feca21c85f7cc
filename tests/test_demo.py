"""``epalm demo``: the answer function, the Gradio app, and the page driven in a real headless browser.

The checkpoint is a tiny random OPT + tiny ViT + a tiny BPE tokenizer saved like a real run, so
``EPALM.from_pretrained`` and ``AutoTokenizer`` load it from disk. Its answers are random words:
the tests check that an answer and a time appear, never their content.

The browser test needs Debian's Chromium and ChromeDriver (``apt-get install -y chromium
chromium-driver``) and selenium; it is skipped only when the two binaries are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from epalm.interface import demo
from epalm.interface.cli import build_parser, main
from test_recipe import free_port

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "what colour is the square?"


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = ["what colour is the cat?", "a red square on a blue background", "how many dogs are there?",
              "two dogs play in the park", "what is the man holding? a kite", "the sky is blue and green"]
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<pad>", "</s>"], show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer)
    # OPT's convention: pad 1, bos = eos = "</s>" 2
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_tiny_checkpoint(root: Path) -> Path:
    """``root/lm`` (OPT + tokenizer), ``root/enc`` (ViT), ``root/ckpt`` (the eP-ALM save_pretrained folder)."""
    from transformers import OPTConfig, OPTForCausalLM, ViTConfig, ViTModel

    from epalm.core.config import EPALMConfig
    from epalm.core.model import EPALM
    from epalm.data.processor import EPALMProcessor, MediaConfig

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    lm = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, ffn_dim=64,
                                  num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                                  dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2))
    with torch.no_grad():  # as epalm.recipes.tiny: large weights so that the random LM reacts to its prefix
        for p in lm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.4)
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                       image_size=16, patch_size=8)).save_pretrained(root / "enc")
    config = EPALMConfig(lm=str(root / "lm"), encoder=str(root / "enc"), variant="epalm", num_encoder_layers=2)
    processor = EPALMProcessor(tokenizer, MediaConfig(image_size=16))
    EPALM.from_config(config).save_pretrained(root / "ckpt", processor=processor)
    return root / "ckpt"


def _png(path: Path, colour=(200, 30, 30)) -> Path:
    from PIL import Image

    img = Image.new("RGB", (96, 64), (240, 240, 240))
    img.paste(Image.new("RGB", (48, 32), colour), (24, 16))
    img.save(path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("demo_ckpt"))


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    return demo.load_checkpoint(tiny_ckpt, device="cpu")


@pytest.fixture
def image(tmp_path) -> Path:
    return _png(tmp_path / "square.png")


# ------------------------------------------------------------------ no browser
def test_answer_question(loaded, image):
    model, processor = loaded
    assert demo.modality_of(model, processor) == "image"
    out = demo.answer_question(model, processor, image, QUESTION, num_beams=3, max_new_tokens=6)
    assert set(out) == {"answer", "seconds"}
    assert isinstance(out["answer"], str) and out["answer"]
    assert isinstance(out["seconds"], float) and out["seconds"] >= 0
    assert demo.answer_question(model, processor, image, QUESTION, 3, 6)["answer"] == out["answer"]
    caption = demo.answer_question(model, processor, str(image), "", num_beams=1, max_new_tokens=4)
    assert isinstance(caption["answer"], str)
    with pytest.raises(ValueError, match="num_beams"):
        demo.answer_question(model, processor, image, QUESTION, num_beams=0)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        demo.load_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match="epalm config"):
        demo.load_checkpoint(tmp_path)  # a folder without epalm_config.json


def test_handler_shows_errors_and_answers(loaded, image, tmp_path):
    import gradio as gr

    model, processor = loaded
    handle = demo.make_handler(model, processor, "image")
    with pytest.raises(gr.Error, match="Upload an image first"):
        handle(None, QUESTION, 3, 10)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(gr.Error, match="broken.png"):
        handle(str(broken), QUESTION, 3, 10)
    answer, seconds = handle(str(image), QUESTION, 2.0, 5.0)  # sliders may hand floats
    assert isinstance(answer, str) and answer
    assert isinstance(seconds, float) and seconds >= 0


def test_build_app_follows_the_modality(loaded):
    import gradio as gr

    model, processor = loaded

    def kinds(app):
        return {type(b).__name__ for b in app.blocks.values()}

    app = demo.build_app(model, processor)
    assert {"Image", "Textbox", "Slider", "Button", "Number"} <= kinds(app)
    assert "Audio" in kinds(demo.build_app(model, processor, "audio"))
    assert "Video" in kinds(demo.build_app(model, processor, "video"))
    assert app.analytics_enabled is False and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    with pytest.raises(ValueError, match="modality"):
        demo.build_app(model, processor, "smell")
    kwargs = demo.launch_kwargs()
    assert kwargs["server_name"] == "127.0.0.1" and kwargs["share"] is False
    assert isinstance(kwargs["theme"], gr.themes.Base)
    assert "googleapis" not in json.dumps([f.stylesheet() for f in kwargs["theme"]._font + kwargs["theme"]._font_mono
                                           if hasattr(f, "stylesheet")])


def test_missing_gradio_says_what_to_install(monkeypatch, tiny_ckpt, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'epalm\[demo\]'"):
        demo.require_gradio()
    assert main(["demo", str(tiny_ckpt)]) == 2
    assert "pip install 'epalm[demo]'" in capsys.readouterr().err


def test_cli_parser():
    args = build_parser().parse_args(["demo", "RUN/best", "--port", "7999"])
    assert (args.checkpoint, args.host, args.port, args.share, args.image_size) == ("RUN/best", "127.0.0.1", 7999,
                                                                                   False, None)
    assert args.func.__name__ == "_demo"


# ------------------------------------------------------------------ real browser
def _binary(name: str, debian_path: str) -> str | None:
    return debian_path if Path(debian_path).is_file() else shutil.which(name)


CHROMIUM = _binary("chromium", "/usr/bin/chromium")
CHROMEDRIVER = _binary("chromedriver", "/usr/bin/chromedriver")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromedriver: apt-get install -y chromium chromium-driver")


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`epalm demo` exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"`epalm demo` did not answer on {url} within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture
def demo_server(tiny_ckpt, tmp_path):
    """``epalm demo CKPT --port P`` in a subprocess, as a user runs it; yields its URL."""
    yield from _serve(tiny_ckpt, tmp_path)


def _serve(checkpoint: Path, tmp_path: Path):
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}  # uploads land here, not in /tmp/gradio
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "epalm.interface.cli", "demo", str(checkpoint), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for_server(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,800"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-', dir=tmp_path)}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # to list the page's requests
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _requested_urls(driver) -> set[str]:
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            urls.add(message["params"].get("request", {}).get("url") or message["params"].get("url", ""))
    return urls


@needs_chromium
def test_browser_upload_ask_and_see_the_answer(demo_server, browser, tmp_path, record_property):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)  # the CPU may be shared: generous, but it returns as soon as it can
    browser.get(demo_server)
    ask = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#ask"))

    # asking with no image: a clear message on the page
    ask.click()
    wait.until(lambda d: "Upload an image first" in d.find_element(By.TAG_NAME, "body").text)
    for close in browser.find_elements(By.CSS_SELECTOR, ".toast-close, [data-testid='toast-close']"):
        if close.is_displayed():
            close.click()

    # upload a PNG, type the question, ask
    browser.find_element(By.CSS_SELECTOR, "#media input[type=file]").send_keys(str(_png(tmp_path / "red.png")))
    # the preview's src is the server's copy once the upload is done (a blob: URL before)
    wait.until(lambda d: any((img.get_attribute("src") or "").startswith(demo_server)
                             for img in d.find_elements(By.CSS_SELECTOR, "#media img")))
    browser.find_element(By.CSS_SELECTOR, "#question textarea, #question input").send_keys(QUESTION)
    ask.click()
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea, #answer input")
                        .get_attribute("value"))
    seconds = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#seconds input").get_attribute("value"))
    screenshot = tmp_path / "epalm_demo.png"
    browser.save_screenshot(str(screenshot))
    record_property("screenshot", str(screenshot))
    print(f"screenshot: {screenshot}")

    assert answer.strip()
    assert float(seconds) >= 0

    # the page reached nothing but the local server (no analytics, no CDN fonts or scripts)
    host = urlparse(demo_server).netloc
    outside = sorted(u for u in _requested_urls(browser)
                     if urlparse(u).scheme in ("http", "https", "ws", "wss") and urlparse(u).netloc != host)
    assert not outside, f"the page made requests off localhost: {outside}"


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    """A quickstart-style run on the tiny models: ``RUN/model`` (weights + processor) and the
    ``RUN/predictions.json`` its own evaluation wrote (``epalm quickstart``'s exact code path)."""
    from test_quickstart import tiny_config, tiny_parts, write_easy_vqa

    from epalm.recipes.quickstart import run_quickstart

    tmp = tmp_path_factory.mktemp("quickstart_run")
    parts = tiny_parts(write_easy_vqa(tmp / "data"))
    run_quickstart(tiny_config(tmp, steps=30, num_test=18, skip_blind=True), parts)
    return tmp / "run"


@needs_chromium
def test_browser_answers_the_quickstart_test_images_as_its_evaluation(quickstart_run, browser, tmp_path):
    """``epalm demo RUN/model`` in a real browser gives, for the quickstart's test images and questions,
    exactly the answers the quickstart's evaluation recorded (default decoding: the run's)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    rows = json.loads((quickstart_run / "predictions.json").read_text())
    picked = {}
    for r in rows:  # a few questions with different (non-empty) recorded answers
        if r["prediction"]:
            picked.setdefault(r["prediction"], r)
    picked = list(picked.values())[:3]
    assert len(picked) >= 2
    server = _serve(quickstart_run / "model", tmp_path)
    url = next(server)
    try:
        wait = WebDriverWait(browser, 120)
        for r in picked:
            browser.get(url)  # a fresh page per question
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#ask"))
            browser.find_element(By.CSS_SELECTOR, "#media input[type=file]").send_keys(r["media_path"])
            wait.until(lambda d: any((img.get_attribute("src") or "").startswith(url)
                                     for img in d.find_elements(By.CSS_SELECTOR, "#media img")))
            browser.find_element(By.CSS_SELECTOR, "#question textarea, #question input").send_keys(r["question"])
            browser.find_element(By.CSS_SELECTOR, "#ask").click()
            answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea, #answer input")
                                .get_attribute("value"))
            assert answer == r["prediction"], (r["question"], r["media_path"])
    finally:
        next(server, None)  # stops the server
