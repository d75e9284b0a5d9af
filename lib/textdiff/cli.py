"""The ``textdiff`` command: parses arguments and calls the engine; nothing else lives here."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .accel.heap import reuse_freed_heap

DEVICE_HELP = "torch device, e.g. cpu, cuda:1 (default: cuda when present, else cpu)"
PRECISION_HELP = "compute precision (default auto: bf16/fp16 on CUDA, bf16 on CPUs with native bf16, else fp32)"


BACKBONE_HELP = "UNet2DModel folder, hub id, or 'default' (the shipped backbone, he-cxr-h200)"


TTA_HELP = "average inference over K flips/rotations of the image (1-8; K times the backbone time)"


def _recipes_default() -> str:
    from .recipes import DEFAULT

    return DEFAULT


def _recipe_names() -> list[str]:
    from .recipes import names

    return names()


def _campaign_default(name: str):
    import dataclasses

    from .campaign import CampaignConfig

    return {f.name: f.default for f in dataclasses.fields(CampaignConfig)}[name]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(",", " ").split()]


def _region(text: str) -> tuple[str, list[str]]:
    name, _, members = text.partition("=")
    classes = [v.strip() for v in members.split("+") if v.strip()]
    if not name.strip() or not classes:
        raise argparse.ArgumentTypeError(f"expected NAME=CLASS+CLASS, got {text!r}")
    return name.strip(), classes


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or len(set(names)) != len(names) or "background" in names:
        raise argparse.ArgumentTypeError(f"expected distinct class names other than 'background', got {text!r}")
    return names


def _default(section: str, name: str):
    """A field's default, read from the config dataclass (the one place defaults are written)."""
    import dataclasses

    from .model import ModelConfig
    from .train import TrainConfig

    field = {f.name: f for f in dataclasses.fields(ModelConfig if section == "model" else TrainConfig)}[name]
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def _help(text: str, section: str, name: str) -> str:
    return f"{text} (default: the recipe's, else {_default(section, name)})"


FLAG = dict(action="store_const", const=True, default=None)  # given or not: an absent flag leaves the recipe's value
# option dest -> (section, field, value from the option); only options given on the command line are applied
OPTION_FIELDS = {
    "backbone": ("model", "backbone", None), "text_encoder": ("model", "text_encoder", None),
    "blocks": ("model", "blocks", None), "steps": ("model", "steps", None), "window": ("model", "window", None),
    "tile": ("model", "tile", None), "scale": ("model", "scale", None), "max_tokens": ("model", "max_tokens", None),
    "no_text": ("model", "use_text", lambda v: not v), "include_image": ("model", "include_image", None),
    "position": ("model", "position", None), "upsampler_output": ("model", "upsampler_input", lambda v: not v),
    "head_dim": ("model", "head_dim", None), "text_min_stride": ("model", "text_min_stride", None),
    "subpixel": ("model", "subpixel", None), "precision": ("model", "precision", None),
    "labels": ("model", "labels", lambda names: {"background": 0} | {n: i + 1 for i, n in enumerate(names)}),
    "test_time_variants": ("model", "test_time_variants", None),
    "image_path": ("model", "image_path", lambda v: [w for w in v if w] or None), "ema": ("train", "ema", None),
    "companion": ("model", "companion", lambda v: [w for w in v if w] or None),
    "companion_weight": ("model", "companion_weight", None), "companion_steps": ("train", "companion_steps", None),
    "clicks": ("model", "clicks", None), "compact": ("model", "compact", lambda v: [k for k in v if k] or None),
    "select": ("train", "select", None), "unlabeled_weight": ("train", "unlabeled_weight", None),
    "epochs": ("train", "epochs", None), "train_steps": ("train", "train_steps", None),
    "val_every": ("train", "val_every", None), "lr": ("train", "lr", None),
    "batch_size": ("train", "batch_size", None), "variants": ("train", "variants", None),
    "no_feature_augment": ("train", "feature_augment", lambda v: not v),
    "text_dropout": ("train", "text_dropout", None), "seed": ("train", "seed", None),
    "cache_dir": ("train", "cache_dir", None), "cache_max_gb": ("train", "cache_max_gb", lambda v: v or None),
    "cache_bits": ("train", "cache_bits", None),
}


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", help=_help(BACKBONE_HELP, "model", "backbone"))
    p.add_argument("--text-encoder", help=_help("transformers folder or hub id ('default': embedded MiniLM-L6)",
                                                "model", "text_encoder"))
    p.add_argument("--blocks", type=_ints, help=_help("decoder block indices, ADM output_blocks numbering "
                                                      "(None: one per resolution)", "model", "blocks"))
    p.add_argument("--steps", type=_ints, help=_help("diffusion steps", "model", "steps"))
    p.add_argument("--window", type=int, help=_help("side of the random training windows", "model", "window"))
    p.add_argument("--tile", type=int, help=_help("largest side the backbone sees at once; larger images go in "
                                                  "overlapping tiles", "model", "tile"))
    p.add_argument("--scale", type=float, help=_help("working scale: images are resized by this", "model", "scale"))
    p.add_argument("--max-tokens", type=int, help=_help("report token budget", "model", "max_tokens"))
    p.add_argument("--no-text", **FLAG, help="train the same head without the report (ablation)")
    p.add_argument("--include-image", action=argparse.BooleanOptionalAction,
                   help=_help("feed the clean image to the head as one more full-resolution input", "model",
                              "include_image"))
    p.add_argument("--position", action=argparse.BooleanOptionalAction,
                   help=_help("tell the report attention where each image token lies in the whole image", "model",
                              "position"))
    p.add_argument("--upsampler-output", **FLAG,
                   help="hook upsampler units' outputs, not their inputs (the head then does not learn the 2x "
                        "upsampling; 4x larger cached map, slower extraction)")
    p.add_argument("--head-dim", type=int, help=_help("width of the head's report attention", "model", "head_dim"))
    p.add_argument("--text-min-stride", type=int,
                   help=_help("scales at least this coarse attend to the report (1 = every scale, as in the paper)",
                              "model", "text_min_stride"))
    p.add_argument("--subpixel", action=argparse.BooleanOptionalAction,
                   help=_help("a head without full-resolution maps (the image folded into 2x2 blocks): ~1.2x faster "
                              "head epochs on CPU, ~0.01 lower Dice on MoNuSeg's small nuclei", "model", "subpixel"))
    p.add_argument("--image-path", type=_ints, metavar="WIDTHS",
                   help=_help("widths of a trainable U-Net on the clean image joined to the head, e.g. "
                              "16,32,64,128,256; 0 = none", "model", "image_path"))
    p.add_argument("--companion", type=_ints, metavar="WIDTHS",
                   help=_help("widths of a plain U-Net trained on the labels beside the head, whose probabilities "
                              "inference averages with the head's, e.g. 16,32,64,128,256; 0 = the head alone",
                              "model", "companion"))
    p.add_argument("--companion-weight", type=float,
                   help=_help("the companion's share of the averaged probabilities", "model", "companion_weight"))
    p.add_argument("--companion-steps", type=int,
                   help=_help("training batches of the companion U-Net", "train", "companion_steps"))
    p.add_argument("--clicks", **FLAG, help="train a head that also reads annotator clicks (placed on its own errors "
                                            "while training; with no clicks it segments as a plain head)")
    p.add_argument("--compact", type=_ints, metavar="COUNTS",
                   help=_help("channels kept per hooked block, e.g. 64,64,48,48: a fixed projection onto each "
                              "block's principal directions (fitted on the first training images) shrinks the "
                              "feature cache and click memory; 0 = every channel", "model", "compact"))
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help=_help(PRECISION_HELP, "model",
                                                                                       "precision"))
    p.add_argument("--labels", type=_names, metavar="NAMES",
                   help="foreground class names, comma-separated; masks hold their indices 1, 2, ... (a {0, 255} "
                        "mask is one class) (default: the recipe's)")
    p.add_argument("--test-time-variants", type=int, metavar="K",
                   help=_help(TTA_HELP + " when the model is used", "model", "test_time_variants"))


def _device(name: str | None):
    import torch

    return torch.device(name) if name else None


def recipe_configs(args) -> tuple[dict, dict]:
    """ModelConfig and TrainConfig keyword arguments: the recipe's values, then the options given."""
    from . import recipes

    recipe = recipes.load(args.recipe)
    for dest, (section, name, convert) in OPTION_FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            recipe[section][name] = convert(value) if convert else value
    if getattr(args, "epochs", None) is not None and getattr(args, "train_steps", None) is None:
        recipe["train"].pop("train_steps", None)  # epochs asked for: not the recipe's step budget
    return recipe["model"], recipe["train"]


def cmd_train(args) -> int:
    from .data import read_lvit
    from .model import ModelConfig, TextDiffModel
    from .train import TRAIN_STATE_NAME, TrainConfig, train

    if args.cache_max_gb is not None and args.cache_max_gb < 0:  # before minutes of loading and extraction
        raise ValueError(f"--cache-max-gb must be >= 0 (0 = no limit), got {args.cache_max_gb}")
    model_kw, train_kw = recipe_configs(args)
    samples = [s for folder in args.data for s in read_lvit(folder, masks=args.masks)]
    val = [s for folder in args.val for s in read_lvit(folder, masks=args.masks)] if args.val else []
    if args.limit:
        samples = samples[: args.limit]
    if args.val_limit:
        val = val[-args.val_limit:]
    labeled = {s.image.resolve() for s in samples}
    unlabeled = [s for folder in args.unlabeled or [] for s in read_lvit(folder, require_masks=False)
                 if s.image.resolve() not in labeled]
    config = ModelConfig(**model_kw)
    train_config = TrainConfig(**train_kw, checkpoint=True, resume=args.resume)
    from .distributed import setup, teardown

    _, world, device = setup()  # under torchrun: one process per device, images sharded
    has_state = (Path(args.out) / TRAIN_STATE_NAME).is_file()
    if has_state != args.resume:
        print(f"note: {args.out} holds a stopped run's training state; starting over (--resume continues it)"
              if has_state else f"note: no training state in {args.out} to resume; starting from epoch 1",
              file=sys.stderr)
    model = TextDiffModel.build(config, _device(args.device) or device, seed=train_config.seed)
    summary = train(model, samples, val, args.out, train_config, unlabeled_samples=unlabeled)
    teardown()
    best, partner = summary["best"], summary.get("companion") or {}
    val = f"val Dice {best['dice']:.4f}" if best["dice"] is not None else "no validation"
    kept = "the last epoch" if train_config.select == "last" else f"best epoch {best['epoch']}"
    if "dropped" in partner:
        kept += f", companion U-Net dropped ({partner['dropped']})"
    elif partner:
        kept += f" + a companion U-Net of {partner['steps']} steps"
        if "dice" in partner:
            val = f"val Dice {partner['dice']:.4f} ({val.removeprefix('val Dice ')} for the head alone)"
    print(f"saved {args.out}: {kept}, {val}, {summary['wall_s']:.0f} s", file=sys.stderr)
    return 0


def cmd_campaign(args) -> int:
    from .campaign import CampaignConfig, run_campaign
    from .data import read_lvit
    from .model import ModelConfig, TextDiffModel
    from .train import TrainConfig

    model_kw, train_kw = recipe_configs(args)
    pool = [s for folder in args.pool for s in read_lvit(folder, masks=args.masks)]
    holdout = [s for folder in args.holdout for s in read_lvit(folder, masks=args.masks)]
    if args.pool_limit:
        pool = pool[: args.pool_limit]
    if args.holdout_limit:
        holdout = holdout[-args.holdout_limit:]
    config = CampaignConfig(strategy=args.strategy, start=args.start, batch=args.batch, until=args.until,
                            seed=args.seed, round_steps=args.round_steps)
    train_kw.setdefault("cache_dir", str(Path(args.out) / "feature-cache"))  # every round reuses the features
    train_config = TrainConfig(**train_kw | {"seed": args.seed})
    model = TextDiffModel.build(ModelConfig(**model_kw), _device(args.device), seed=args.seed)
    record = run_campaign(model, pool, holdout, args.out, config, train_config)
    print(json.dumps({"strategy": record["strategy"], "rounds": [{k: r[k] for k in ("labels", "dice", "iou")}
                                                                 for r in record["rounds"]]}))
    return 0


def cmd_score(args) -> int:
    from . import distributed
    from .campaign import score_pool
    from .data import read_lvit
    from .model import TextDiffModel
    from .train import FeatureCache

    rank, world, device = distributed.setup()  # under torchrun: one process per GPU (gloo on CPU), images sharded
    samples = sorted((s for folder in args.data for s in read_lvit(folder, require_masks=False)),
                     key=lambda s: s.name)
    model = TextDiffModel.load(args.model, _device(args.device) if args.device else device)
    cache = FeatureCache(model, args.cache_dir, bits=args.cache_bits)
    scores = score_pool(model, samples, cache, progress=True)
    if rank == 0:
        text = json.dumps({"model": str(args.model), "images": len(scores), "processes": world, "entropy": scores},
                          indent=1)
        if args.out:
            Path(args.out).write_text(text + "\n")
        else:
            print(text)
    distributed.teardown()
    return 0


def _load(args):
    from .model import TextDiffModel

    return TextDiffModel.load(args.model, _device(args.device)).use_test_time_variants(args.test_time_variants)


def cmd_evaluate(args) -> int:
    from .data import read_lvit
    from .evaluate import evaluate

    samples = [s for folder in args.data for s in read_lvit(folder, masks=args.masks)]
    if args.limit:
        samples = samples[-args.limit:]
    result = evaluate(_load(args), samples, args.overlays, use_reports=not args.ignore_reports,
                      clicks=args.clicks, regions=dict(args.region or []))
    if args.json:
        print(json.dumps(result))
    else:
        for name, v in result["per_image"].items():
            print(f"{name:40s} Dice {v['dice']:.4f}  IoU {v['iou']:.4f}")
        for count, dice in result.get("dice_by_clicks", {}).items():
            print(f"{'after ' + str(count) + ' clicks':40s} Dice {dice:.4f}")
        if len(result["per_class"]) > 1:
            for name, v in result["per_class"].items():
                print(f"{'class ' + name:40s} Dice {v['dice']:.4f}  IoU {v['iou']:.4f}")
        for name, v in result.get("per_region", {}).items():
            print(f"{'region ' + name:40s} Dice {v['dice']:.4f}  IoU {v['iou']:.4f}")
        print(f"{'mean over ' + str(result['n']) + ' images':40s} Dice {result['dice']:.4f}  IoU {result['iou']:.4f}")
    return 0


def cmd_infer(args) -> int:
    from tqdm.auto import tqdm

    from .data import check_label_path, read_image, write_label

    image = read_image(args.image)
    check_label_path(args.out, image.is_volume)
    model = _load(args)
    clicks = None
    if args.clicks:
        from .clicks import read_clicks

        if image.is_volume:
            raise ValueError("--clicks: clicks are taken on 2D images")
        clicks = read_clicks(args.clicks, model.config.labels, image.size_hw)
    label = model.predict(image, args.report, progress=lambda it: tqdm(it, desc="slices", unit="slice"),
                          clicks=clicks)
    out = write_label(label, image, args.out, scale_255=args.scale_255)
    shape = "x".join(map(str, label.shape))
    print(f"wrote {out} ({shape}, foreground {float((label > 0).mean()):.1%})", file=sys.stderr)
    return 0


def cmd_pretrain(args) -> int:
    from .pretrain import PretrainConfig, pretrain, unet_config

    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError("--ema-decay must be in [0, 1)")
    config = PretrainConfig(images=args.images, out=args.out, size=args.size, scale=args.scale or [1.0],
                            steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            checkpoint_every=args.checkpoint_every, minutes=args.minutes, precision=args.precision,
                            ema_decay=args.ema_decay, init=args.init)
    if args.channels and args.init:
        raise ValueError("--channels and --init exclude each other: --init takes the architecture of its backbone")
    if args.channels:
        config.unet = unet_config(args.channels)
    out = pretrain(config, resume=args.resume)
    print(f"backbone written to {out}", file=sys.stderr)
    return 0


def cmd_import_lvit(args) -> int:
    from .studies import import_lvit

    labels = False if args.no_labels else (args.labeled if args.labeled is not None else True)
    result = import_lvit(args.folder, args.studies, labels)
    print(f"imported {result['images']} images ({result['labeled']} labeled) into {result['studies']}", file=sys.stderr)
    return 0


def cmd_convert_adm(args) -> int:
    from .convert import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.out_dir, args.flags)
    print(f"wrote diffusers UNet2DModel to {out}; use it with --backbone {out} (see README for block indices)",
          file=sys.stderr)
    return 0


def cmd_prune_cache(args) -> int:
    from .train import CACHE_FILE_NAME, prune_cache

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no feature cache folder at {folder}")
    if args.max_gb < 0:
        raise ValueError(f"--max-gb must be >= 0, got {args.max_gb}")
    before = sum(p.stat().st_size for p in folder.glob("*.safetensors") if CACHE_FILE_NAME.fullmatch(p.name))
    freed = prune_cache(folder, int(args.max_gb * 2**30))
    print(f"{folder}: {before / 2**30:.2f} GB -> {(before - freed) / 2**30:.2f} GB ({freed / 2**30:.2f} GB freed, "
          "least recently used first)")
    return 0


def cmd_benchmark(args) -> int:
    from . import benchmark

    result = benchmark.run(args.backbone, Path(args.data) if args.data else benchmark.DEFAULT_DATA, args.model,
                           args.windows, args.epochs, args.measured_epochs, args.reference_steps,
                           tuple(args.skip or ()), adm=args.adm, blocks=args.blocks, pool=args.pool,
                           pool_data=Path(args.pool_data) if args.pool_data else None, pool_bits=args.cache_bits,
                           pool_compact=args.compact)
    print(benchmark.table(result), file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textdiff",
        description="TextDiff: report-guided, label-efficient segmentation on frozen diffusion features.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log progress details; show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="few-shot training of the fusion head on LViT-format folders")
    p.add_argument("--data", action="append", required=True, help="LViT split folder (repeatable)")
    p.add_argument("--val", action="append", help="LViT folder for model selection (repeatable)")
    p.add_argument("--unlabeled", action="append",
                   help="LViT-style folder (img/, reports optional) of images to learn from without labels "
                        "(repeatable; their masks are never read, images also in --data are skipped)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--masks", default="labelcol", help="mask folder beside img/ in each LViT folder (default: "
                                                        "%(default)s)")
    p.add_argument("--recipe", default=_recipes_default(),
                   help="a shipped recipe (" + ", ".join(_recipe_names()) + ") or a .toml file of ModelConfig/"
                        "TrainConfig fields; options given here override it (default: %(default)s, the shipped "
                        "model's)")
    _add_model_options(p)
    p.add_argument("--epochs", type=int, help=_help("passes over the training windows (replaces the recipe's "
                                                    "--train-steps)", "train", "epochs"))
    p.add_argument("--train-steps", type=int, help=_help("optimizer steps of the run, which then decide the epochs",
                                                         "train", "train_steps"))
    p.add_argument("--val-every", type=int, help=_help("validate every N epochs (and after the last)", "train",
                                                       "val_every"))
    p.add_argument("--lr", type=float, help=_help("Adam learning rate of the head", "train", "lr"))
    p.add_argument("--batch-size", type=int, help=_help("windows per head step", "train", "batch_size"))
    p.add_argument("--variants", type=int, help=_help("image-space flip/rotation variants cached per image (1-8)",
                                                      "train", "variants"))
    p.add_argument("--no-feature-augment", **FLAG, help="no flips/rotations of the cached features")
    p.add_argument("--text-dropout", type=float, help=_help("chance a window trains without its report", "train",
                                                            "text_dropout"))
    p.add_argument("--seed", type=int, help=_help("seed of the head's initialisation and sampling", "train", "seed"))
    p.add_argument("--ema", type=float, help=_help("decay of the moving average of the head's weights that is "
                                                   "validated and saved (0 = off)", "train", "ema"))
    p.add_argument("--unlabeled-weight", type=float,
                   help=_help("weight of the consistency loss on --unlabeled images", "train", "unlabeled_weight"))
    p.add_argument("--select", choices=["best", "last"],
                   help=_help("which epoch's head is saved: the best on validation, or the last", "train", "select"))
    p.add_argument("--limit", type=int, help="use only the first N training samples")
    p.add_argument("--val-limit", type=int, help="use only the last N validation samples")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run from the training state it left in --out (same data and options); "
                        "every run leaves one after each epoch until it completes")
    p.add_argument("--cache-dir", help="also keep frozen features on disk here (reused across runs)")
    p.add_argument("--cache-max-gb", type=float,
                   help=_help("the cache folder's size limit in GB: least recently used feature files are deleted "
                              "beyond it (0 = no limit; the running job's own files are kept)", "train",
                              "cache_max_gb"))
    p.add_argument("--cache-bits", type=int, choices=[8, 16],
                   help=_help("bits per cached feature value: 8 stores bytes with a scale and offset per channel "
                              "(half the disk and page cache)", "train", "cache_bits"))
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("campaign", help="simulate an annotation campaign: a strategy picks the images to label, "
                                        "their masks are revealed, the head is retrained; held-out Dice per round")
    p.add_argument("--pool", action="append", required=True, help="LViT folder of the images to pick from (their "
                                                                  "masks are read only once picked; repeatable)")
    p.add_argument("--holdout", action="append", required=True, help="LViT folder evaluated after every round "
                                                                     "(repeatable)")
    p.add_argument("--pool-limit", type=int, help="use only the first N pool images")
    p.add_argument("--holdout-limit", type=int, help="evaluate only the last N held-out images")
    p.add_argument("--out", required=True, help="folder of the campaign record, its head and feature cache "
                                                "(a stopped campaign resumes from it)")
    p.add_argument("--masks", default="labelcol", help="mask folder beside img/ (default: %(default)s)")
    from .campaign import STRATEGIES, STRATEGY_HELP

    p.add_argument("--strategy", choices=STRATEGIES, default=_campaign_default("strategy"),
                   help=STRATEGY_HELP + " (default: %(default)s)")
    p.add_argument("--start", type=int, default=_campaign_default("start"),
                   help="labeled images before the first round (default: %(default)s)")
    p.add_argument("--batch", type=int, default=_campaign_default("batch"),
                   help="images labeled per round (default: %(default)s)")
    p.add_argument("--until", type=int, default=_campaign_default("until"),
                   help="stop at this many labeled images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=_campaign_default("seed"), help="seed of the first labels, the "
                                                                               "head and sampling (default: 0)")
    p.add_argument("--round-steps", type=int, help="optimizer steps of each round after the first, warm-started "
                                                   "(default: the recipe's step budget)")
    p.add_argument("--recipe", default=_recipes_default(), help="training recipe (default: %(default)s)")
    _add_model_options(p)
    p.add_argument("--train-steps", type=int, help=_help("optimizer steps of the first round", "train",
                                                         "train_steps"))
    p.add_argument("--cache-dir", help="feature cache folder (default: OUT/feature-cache)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_campaign)

    p = sub.add_parser("evaluate", help="per-image mean Dice / IoU at native resolution")
    p.add_argument("--data", action="append", required=True, help="LViT split folder (repeatable)")
    p.add_argument("--model", required=True, help="model folder written by textdiff train")
    p.add_argument("--masks", default="labelcol", help="mask folder beside img/ in each LViT folder (default: "
                                                        "%(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--overlays", help="write image/ground truth/prediction PNGs here")
    p.add_argument("--limit", type=int, help="evaluate only the last N samples")
    p.add_argument("--ignore-reports", action="store_true", help="run without the reports (no-text path)")
    p.add_argument("--clicks", type=_ints, metavar="COUNTS",
                   help="also score after simulated corrective clicks, e.g. 0,1,3,5: each click goes to the most "
                        "interior pixel of the largest wrong region, with the true class there")
    p.add_argument("--region", action="append", type=_region, metavar="NAME=A+B",
                   help="also score a union of classes as one structure, e.g. lungs=lung+lesion (repeatable)")
    p.add_argument("--test-time-variants", type=int, metavar="K", help=TTA_HELP + " (default: the model's)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="uncertainty (mean entropy) of every image of LViT folders; shards across "
                                     "processes under torchrun")
    p.add_argument("--data", action="append", required=True, help="LViT split folder (repeatable; masks not needed)")
    p.add_argument("--model", required=True, help="model folder written by textdiff train (or 'default')")
    p.add_argument("--out", help="write the scores here as JSON (default: print them)")
    p.add_argument("--cache-dir", help="keep the frozen features here: scoring again after a new head of the same "
                                       "backbone and blocks runs only the head")
    p.add_argument("--cache-bits", type=int, choices=[8, 16], default=_default("train", "cache_bits"),
                   help="bits per cached feature value (default: %(default)s)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("infer", help="segment one image or volume")
    p.add_argument("--model", required=True, help="model folder written by textdiff train (or 'default')")
    p.add_argument("--image", required=True, help="2D image, volume file or DICOM series folder")
    p.add_argument("--report", help="report text (omit to run without text)")
    p.add_argument("--out", required=True, help=".png for 2D, .nii.gz / .nrrd for volumes")
    p.add_argument("--scale-255", action="store_true", help="write labels as 0/255 instead of 0/1")
    p.add_argument("--clicks", help='JSON file of clicks [{"y": row, "x": column, "label": name}, ...] in the '
                                    "image's pixels (a model trained with --clicks)")
    p.add_argument("--test-time-variants", type=int, metavar="K", help=TTA_HELP + " (default: the model's)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("pretrain", help="train a diffusion backbone (DDPM) on unlabeled images")
    p.add_argument("--images", action="append", required=True, help="folder of images (repeatable)")
    p.add_argument("--out", required=True, help="backbone folder to write (save_pretrained + recipe.json)")
    p.add_argument("--size", type=int, default=256, help="random crop size")
    p.add_argument("--scale", type=float, action="append", help="resize factor, once or once per --images")
    p.add_argument("--steps", type=int, default=20000, help="optimizer steps in total (default 20000)")
    p.add_argument("--batch-size", type=int, default=8, help="crops per step in each process (default 8)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    p.add_argument("--ema-decay", type=float, default=0.999,
                   help="EMA decay of the saved weights (after a warm-up); ~1 - 1/steps averages over the last steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, crops and noise (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)")
    p.add_argument("--minutes", type=float, help="stop (checkpointed) after this much time; --resume goes on")
    p.add_argument("--resume", action="store_true", help="go on from the checkpoint in --out")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help=PRECISION_HELP)
    p.add_argument("--channels", type=_ints, help="UNet widths per level (default 32,64,128,192)")
    p.add_argument("--init", help="start from this backbone (folder, hub id, or a shipped name such as 'default') "
                                  "instead of random weights: adapts it to the images")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("import-lvit", help="turn an LViT-format folder into a MONAI Label studies folder")
    p.add_argument("folder", help="LViT split folder (img/, labelcol/, *_text.xlsx)")
    p.add_argument("studies", help="studies folder to create or extend")
    p.add_argument("--no-labels", action="store_true", help="import images and reports only")
    p.add_argument("--labeled", type=int, help="import only the first N masks as final labels")
    p.set_defaults(func=cmd_import_lvit)

    p = sub.add_parser("convert-adm", help="convert an OpenAI guided-diffusion UNet checkpoint to diffusers",
                       description="Pass the MODEL_FLAGS exactly as guided-diffusion's README prints them, e.g. "
                                   "--attention_resolutions 32,16,8 --class_cond False --image_size 256 ...")
    p.add_argument("checkpoint", help="guided-diffusion .pt file (loaded with weights_only=True)")
    p.add_argument("out_dir", help="diffusers save_pretrained folder to write")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="guided-diffusion flags")
    p.set_defaults(func=cmd_convert_adm)

    p = sub.add_parser("prune-cache", help="shrink a --cache-dir folder, least recently used feature files first")
    p.add_argument("folder", help="the --cache-dir folder of textdiff train")
    p.add_argument("--max-gb", type=float, default=0.0, help="size to keep (default 0: delete every feature file)")
    p.set_defaults(func=cmd_prune_cache)

    p = sub.add_parser("benchmark", help="measure extraction/training speed-ups, REST infer time, peak memory")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.add_argument("--backbone", default="default", help=BACKBONE_HELP)
    p.add_argument("--model", default="default", help="model folder served for the REST infer timing")
    p.add_argument("--blocks", type=_ints, help="decoder blocks for extraction and training instead of the model's "
                                                "(e.g. 0,2, the chest X-ray choice: the early exit skips more)")
    p.add_argument("--data", help="MoNuSeg LViT root (default ../shared/data/monuseg)")
    p.add_argument("--windows", type=int, default=4, help="256x256 windows timed for extraction")
    p.add_argument("--epochs", type=int, default=50, help="epochs of the training comparison (default 50, the paper's)")
    p.add_argument("--measured-epochs", type=int, default=3,
                   help="epochs the fast path really runs; the rest are totalled from their mean time (default 3)")
    p.add_argument("--reference-steps", type=int, default=24,
                   help="reference-loop steps timed after one warm-up step (then scaled; default 24)")
    p.add_argument("--skip", action="append", choices=["extract", "train", "infer"],
                   help="leave this part out (repeatable)")
    p.add_argument("--pool", type=_ints, metavar="SIZES",
                   help="also time the annotation loop at these pool sizes, e.g. 200,2000: extraction per image, "
                        "cache bytes per image, rescoring the pool from the cache after a new head, peak RSS "
                        "(chest-xray recipe, fresh head)")
    p.add_argument("--pool-data", help="LViT folder of the pool (default ../shared/data/covid-qu-ex/Train_Folder)")
    p.add_argument("--cache-bits", type=int, choices=[8, 16], default=_default("train", "cache_bits"),
                   help="bits per cached feature value for --pool (default: %(default)s)")
    p.add_argument("--compact", type=_ints, metavar="COUNTS", help="compact channels per block for --pool")
    p.add_argument("--adm", action="store_true",
                   help="also time the full ADM-256 layout (random weights, the paper's blocks) in windows/s against "
                        "the device's physical limit (~1 min on a 2-core CPU; meant for GPUs)")
    p.set_defaults(func=cmd_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    # a command is its own process: every model does tens of multi-MB allocations per forward (accel/heap.py); a host
    # process (the MONAI Label server) keeps glibc's defaults unless it asks
    reuse_freed_heap()
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        if args.verbose:
            raise
        print(f"textdiff {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
