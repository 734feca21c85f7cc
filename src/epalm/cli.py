"""``epalm`` command line: train / eval / predict / cache-features / params / tiny-demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from .recipe import load_run_config, run_train

    cfg = load_run_config(args.config, args.overrides)
    state = run_train(cfg, resume=args.resume)
    print(json.dumps({"output_dir": cfg.train.output_dir, **state}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .recipe import load_run_config, run_eval

    cfg = load_run_config(args.config, args.overrides)
    scores = run_eval(cfg, args.checkpoint, args.out)
    print(json.dumps(scores, default=str))
    return 0


def _cache_features(args: argparse.Namespace) -> int:
    from .encoders import load_encoder
    from .recipe import build_datasets, build_feature_cache, load_run_config, load_tokenizer

    cfg = load_run_config(args.config, args.overrides)
    if not cfg.data.feature_cache:
        raise SystemExit("set data.feature_cache=DIR (in the config or as an override)")
    encoder = load_encoder(cfg.model.encoder, num_layers=cfg.model.num_encoder_layers, **cfg.model.encoder_kwargs)
    cache = build_feature_cache(cfg, encoder, build_datasets(cfg, load_tokenizer(cfg)))
    print(json.dumps({"path": str(cache.path), "items": len(cache), "shape": list(cache.shape)}))
    return 0


def _predict(args: argparse.Namespace) -> int:
    import torch

    from .data import vqa_prompt
    from .data.text import encode_prompt
    from .model import EPALM
    from .recipe import DataConfig, RunConfig, load_tokenizer, media_loader

    media_path = args.image or args.video or args.audio
    if not Path(media_path).is_file():
        raise SystemExit(f"{media_path}: no such file")
    model = EPALM.from_pretrained(args.checkpoint)
    dataset = {"image": "coco", "video": "msrvtt_qa", "audio": "audiocaps"}[
        "image" if args.image else "video" if args.video else "audio"]
    # preprocess as in training: RUN/run_config.json sits next to RUN/best and RUN/checkpoint
    run_config = Path(args.checkpoint).parent / "run_config.json"
    trained = json.loads(run_config.read_text()).get("data", {}) if run_config.is_file() else {}
    encoder_size = getattr(getattr(model.encoder, "image_encoder", model.encoder), "image_size", None)
    size = args.image_size or trained.get("image_size") or (encoder_size[0] if encoder_size else 224)
    keep = {k: trained[k] for k in ("mean", "std", "num_frames", "audio_features") if trained.get(k) is not None}
    cfg = RunConfig(model=model.config, data=DataConfig(dataset=dataset, image_size=size, **keep))
    tokenizer = load_tokenizer(cfg)
    media = media_loader(cfg, for_cache=True)(media_path, False).unsqueeze(0)
    prompt = vqa_prompt(args.prompt) if args.prompt else ""
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    t0 = time.perf_counter()
    new = model.generate(media=media, input_ids=ids, max_new_tokens=args.max_new_tokens,
                         num_beams=args.num_beams, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(new[0], skip_special_tokens=True).strip()
    print(json.dumps({"answer": answer, "seconds": round(time.perf_counter() - t0, 3)}))
    return 0


def _params(args: argparse.Namespace) -> int:
    from .config import EPALMConfig
    from .presets import build_random

    model = build_random(EPALMConfig(lm=args.lm, encoder=args.encoder, variant=args.variant), device="meta")
    print(json.dumps({"lm": args.lm, "encoder": args.encoder, "variant": args.variant,
                      "inject_layers": [model.inject_start, model.inject_end], **model.parameter_report()}))
    return 0


def _tiny_demo(args: argparse.Namespace) -> int:
    import torch

    from .tiny import run

    torch.set_num_threads(1)  # tiny tensors
    print(json.dumps(run(args.output_dir, args.variant)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epalm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe (YAML config)", description="Train a paper recipe.")
    p.add_argument("config", help="YAML recipe, e.g. configs/vqa_epalm.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=1")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a recipe's evaluation split")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--checkpoint", required=True, help="a save_pretrained folder (e.g. RUN/best)")
    p.add_argument("--out", default=None, help="where predictions/metrics go (default CHECKPOINT/eval)")
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
    p.add_argument("--image-size", type=int, default=None,
                   help="default: the training run's data.image_size, else the encoder's input size")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=10)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:
        from .data.errors import MediaError
        from .feature_cache import CacheError

        # setup errors (config, files, unreadable media, stale feature cache): a message, no traceback
        if not isinstance(err, (ValueError, FileNotFoundError, KeyError, MediaError, CacheError)):
            raise
        print(f"epalm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
