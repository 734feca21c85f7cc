"""``epalm demo CHECKPOINT``: a local Gradio app to ask a trained eP-ALM about an image, video or audio.

Upload the media, type a question (empty: a caption), pick the decoding options, and the app shows
the answer and the seconds it took (preprocessing + encoder + generation). The input widget follows
the checkpoint's encoder: an image, a video or an audio clip.

Needs the ``demo`` extra (``pip install 'epalm[demo]'``). The app stays off the internet: Gradio's
analytics and version check are disabled, no share link is made unless asked for (``--share``),
and the theme uses the fonts bundled with Gradio or the system's (no font CDN).

    from epalm.interface.demo import build_app, launch_kwargs, load_checkpoint
    model, processor = load_checkpoint("runs/quickstart/model")   # weights + the processor saved with them
    build_app(model, processor).launch(**launch_kwargs())
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from epalm.interface.inference import (  # noqa: F401 (re-exported)
    MODALITIES,
    answer_question,
    decoding_defaults,
    load_checkpoint,
    modality_of,
)

_LABEL = {"image": "Image", "video": "Video", "audio": "Audio"}
MAX_BEAMS, MAX_NEW_TOKENS = 8, 64


def require_gradio():
    """Import Gradio with analytics (and its version check) off; an actionable error when missing."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at Blocks() and launch()
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError as err:
        raise ImportError(
            "`epalm demo` needs Gradio, which is not installed: pip install 'epalm[demo]'") from err
    try:
        major = int(str(gradio.__version__).split(".")[0])
    except (AttributeError, ValueError):
        major = 6  # an unusual version string: try
    if major < 6:  # theme / ssr_mode / mcp_server are launch() arguments from Gradio 6 on
        raise ImportError(f"`epalm demo` needs Gradio 6, found {gradio.__version__}: "
                          "pip install -U 'epalm[demo]' (or 'gradio>=6,<7')")
    return gradio


# ------------------------------------------------------------------ model side (no Gradio)
# ------------------------------------------------------------------ Gradio side
def make_handler(model, processor, modality: str = "image"):
    """The app's callback ``(media_path, question, beams, max_new_tokens) -> (answer, seconds)``.

    Bad input (no file, unreadable file) raises ``gradio.Error``, which the page shows as a message.
    """
    gr = require_gradio()
    from epalm.errors import MediaError

    def handle(media_path, question, num_beams, max_new_tokens):
        if not media_path:
            raise gr.Error(f"Upload {'an' if modality[0] in 'aeiou' else 'a'} {modality} first, then ask.",
                           title=f"No {modality}", print_exception=False)
        try:
            out = answer_question(model, processor, media_path, question, num_beams, max_new_tokens)
        except (MediaError, ValueError) as err:
            raise gr.Error(public_message(err), title=f"Cannot answer about this {modality}",
                           print_exception=False) from err
        return out["answer"] or "(empty answer: the model generated only special tokens)", out["seconds"]

    return handle


_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[\\/][^\\/\s:'\"()]+)+[\\/]?")


def public_message(err: BaseException) -> str:
    """The error's message without the server's file paths (only file names are shown)."""
    from epalm.errors import MediaError

    if isinstance(err, MediaError):
        text = f"{Path(err.path).name}: {err.reason}" if err.reason else Path(err.path).name
    else:
        text = str(err)
    return _PATH.sub(lambda m: Path(m.group(0).rstrip("/\\")).name or "<path>", text)


def _theme(gr):
    """Gradio's default look with fonts served by the app itself or the system's (never a font CDN)."""
    sans = [gr.themes.LocalFont("IBM Plex Sans"), "ui-sans-serif", "system-ui", "sans-serif"]
    mono = [gr.themes.LocalFont("IBM Plex Mono"), "ui-monospace", "monospace"]
    return gr.themes.Default(font=sans, font_mono=mono)


def launch_kwargs(host: str = "127.0.0.1", port: int | None = 7860, share: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``Blocks.launch``: local, no share link unless asked, offline theme."""
    gr = require_gradio()
    return dict(server_name=host, server_port=port, share=share, theme=_theme(gr), ssr_mode=False,
                mcp_server=False, pwa=False, show_error=True, max_file_size="200mb")


def build_app(model, processor, modality: str | None = None, title: str = "eP-ALM demo"):
    """A ``gradio.Blocks`` app around any eP-ALM model (injectable: the tests pass a tiny one).

    ``processor``: the checkpoint's :class:`~epalm.data.processor.EPALMProcessor` (preprocessing,
    tokenizer, prompt). ``modality``: ``"image"``, ``"video"`` or ``"audio"`` (default: the processor's).
    Element ids: ``media``, ``question``, ``beams``, ``max-new-tokens``, ``ask``, ``answer``, ``seconds``.
    """
    gr = require_gradio()
    modality = modality or modality_of(model, processor)
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    handle = make_handler(model, processor, modality)
    config = model.config
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nLM `{config.lm}` · encoder `{config.encoder}` · variant `{config.variant}`. "
                    f"Upload {'an' if modality[0] in 'aeiou' else 'a'} {modality}, ask a question "
                    "(leave it empty for a caption) and press **Ask**.")
        with gr.Row():
            with gr.Column():
                common = dict(label=_LABEL[modality], elem_id="media", sources=["upload"])
                if modality == "image":
                    media = gr.Image(type="filepath", height=320, **common)
                elif modality == "audio":
                    media = gr.Audio(type="filepath", **common)
                else:
                    media = gr.Video(height=320, **common)
                question = gr.Textbox(label="Question", placeholder="e.g. what is happening?", lines=1,
                                      elem_id="question")
                with gr.Accordion("Decoding", open=False):
                    decoding = decoding_defaults(processor)  # the run's evaluation decoding
                    beams = gr.Slider(1, MAX_BEAMS, value=decoding["num_beams"], step=1, label="Beams",
                                      elem_id="beams")
                    max_new = gr.Slider(1, MAX_NEW_TOKENS, value=decoding["max_new_tokens"], step=1,
                                        label="Max new tokens", elem_id="max-new-tokens")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                seconds = gr.Number(label="Seconds", precision=3, interactive=False, elem_id="seconds")
        inputs, outputs = [media, question, beams, max_new], [answer, seconds]
        ask.click(handle, inputs, outputs, api_name="answer")
        question.submit(handle, inputs, outputs, api_name=False)
    return app


def launch(checkpoint: str | os.PathLike, host: str = "127.0.0.1", port: int = 7860, share: bool = False, *,
           image_size: int | None = None, device: str | None = None, block: bool = True):
    """Load ``checkpoint`` and serve the app on ``http://host:port`` (blocks until Ctrl-C).

    ``block=False`` returns the running app (close it with ``app.close()``).
    """
    require_gradio()  # fail before the (slow) model load
    model, processor = load_checkpoint(checkpoint, image_size=image_size, device=device)
    modality = modality_of(model, processor)
    app = build_app(model, processor, modality, title=f"eP-ALM: {Path(checkpoint).name}")
    app.queue(default_concurrency_limit=1)  # one generation at a time: the model is shared
    app.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs(host, port, share))
    where = app.local_url + (f" and {app.share_url}" if app.share_url else "")
    print(f"epalm demo: {checkpoint} ({modality}) on {where}" + (" -- Ctrl-C to stop" if block else ""), flush=True)
    if block:
        app.block_thread()
    return app
