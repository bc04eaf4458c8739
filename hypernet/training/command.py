"""``python -m hypernet check-dataset`` and ``python -m hypernet train`` (also under ``torchrun ... -m hypernet train``).

Nothing here imports ComfyUI at module level: check-dataset without --base runs on torch alone; train and
check-dataset --base put ComfyUI (--comfy DIR or $LORARAR_COMFY) on sys.path and import the pack's adapter
(nodes/training.py), which runs with ComfyUI's own loaders. ``python -m hypernet`` runs this module inside the pack
(hypernet/__main__.py), so the adapter and the command line share one import of every module: an error the adapter
raises is the LoraRarError the command line prints as one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from ..checkpoints import default_search_dirs, resolve_hypernet
from ..errors import LoraRarError
from .dataset import check_dataset
from .output import refuse_existing
from .recipe import MIXED_PRECISION, Recipe

COMFY_ENV = "LORARAR_COMFY"


def add_parsers(commands) -> None:
    check = commands.add_parser("check-dataset", help="list what is wrong with a training dataset (before any GPU time)")
    check.add_argument("dataset", type=Path, help="dataset folder (split.json, subjects/, styles/; docs/TRAINING.md)")
    check.add_argument("--base", type=Path, help="also check every LoRA against this base checkpoint (loads it through ComfyUI)")
    check.add_argument("--comfy", type=Path, help=f"ComfyUI folder (default ${COMFY_ENV})")

    train = commands.add_parser("train", help="train a LoRA.rar hypernetwork for a base model (docs/TRAINING.md)")
    train.add_argument("--dataset", required=True, type=Path, help="dataset folder (docs/TRAINING.md)")
    train.add_argument("--base", required=True, type=Path, help="base checkpoint ComfyUI loads (.safetensors / .ckpt)")
    train.add_argument("--out", required=True, type=Path, help="hypernetwork to write (.safetensors); the run folder "
                       "<out>.training/ beside it holds the checkpoint, the log and the encoded dataset")
    train.add_argument("--comfy", type=Path, help=f"ComfyUI folder (default ${COMFY_ENV})")
    train.add_argument("--resume", action="store_true", help="continue the run folder's checkpoint exactly")
    train.add_argument("--overwrite", action="store_true", help="replace --out and start over an existing run folder")
    train.add_argument("--cache-dir", type=Path, help="where the encoded dataset (latents, conditionings) is kept "
                       "(default: the run folder); runs on the same base, dataset and resolution share it")
    train.add_argument("--init", help="start from this hypernetwork: fine-tuning; a published name (sdxl, koala-700m), "
                       "a published .pth or a trained file (a path, or a name in $LORARAR_WEIGHTS_DIR or weights/)")
    defaults = Recipe()
    train.add_argument("--lr", type=float, default=defaults.learning_rate, help="AdamW learning rate (constant)")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument("--lambda", dest="similarity_lambda", type=float, default=defaults.similarity_lambda,
                       help="weight of SUM |cos(m_subject, m_style)| over the layers")
    train.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="max gradient norm")
    train.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs; one random pair (per batch slot) each")
    train.add_argument("--steps-per-pair", type=int, default=defaults.steps_per_pair, help="optimiser steps per epoch")
    train.add_argument("--batch-pairs", type=int, default=defaults.batch_pairs,
                       help="pairs per process per step; effective batch = processes x this (N here = N torchrun ranks of 1)")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--resolution", type=int, default=defaults.resolution, help="training crop in pixels (multiple of 8)")
    train.add_argument("--mixed-precision", choices=("auto", *MIXED_PRECISION), default="auto",
                       help="autocast of the model forward; auto (default): fp16 on a GPU as the published recipe, "
                       "no on the CPU")
    train.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute transformer blocks in backward (GPU memory); default: on with a GPU, as the "
                       "published recipe, off on the CPU")
    train.add_argument("--fixed-style-prompt", metavar="TEXT", help="encode TEXT for every style instead of its caption "
                       "(reproduces the reference's defect, for comparison: 'a women in 3d rendering style')")
    train.add_argument("--hidden", type=int, default=defaults.hidden, help="hidden units of a new hypernetwork")
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0: at the end and on stop only)")
    train.add_argument("--validate-every", type=int, default=50, help="steps between validations (0: none)")


def recipe_from(args: argparse.Namespace) -> Recipe:
    if args.resolution % 8:
        raise LoraRarError(f"--resolution {args.resolution}: must be a multiple of 8 (the VAE's latent grid)")
    gpu = _cuda_available()
    precision = ("fp16" if gpu else "no") if args.mixed_precision == "auto" else args.mixed_precision
    checkpointing = gpu if args.gradient_checkpointing is None else args.gradient_checkpointing
    return Recipe(learning_rate=args.lr, weight_decay=args.weight_decay, similarity_lambda=args.similarity_lambda,
                  grad_clip=args.grad_clip, epochs=args.epochs, steps_per_pair=args.steps_per_pair,
                  batch_pairs=args.batch_pairs, seed=args.seed, resolution=args.resolution,
                  mixed_precision=precision, gradient_checkpointing=checkpointing,
                  fixed_style_prompt=args.fixed_style_prompt, hidden=args.hidden)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def comfy_adapter(comfy: Path | None):
    """The pack's nodes/training.py imported inside ComfyUI at ``comfy`` (or $LORARAR_COMFY), forced onto the CPU
    when no CUDA device is present. Under torchrun each rank sees only its LOCAL_RANK GPU."""
    root = Path(comfy or os.environ.get(COMFY_ENV, ""))
    if not str(root) or not (root / "comfy" / "sd.py").is_file():
        raise LoraRarError(f"{root or '(not given)'}: no ComfyUI there; pass --comfy DIR or set ${COMFY_ENV} to the "
                           "ComfyUI folder (the one holding main.py)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("LOCAL_RANK", "0")  # before CUDA starts: one GPU per rank
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import torch

    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import utils.extra_config  # noqa: F401  (before ComfyUI's nodes.py, as main.py does)

    try:  # the pack's nodes/training.py, beside this hypernet/ package: the same import of the pack
        return importlib.import_module("...nodes.training", __package__)
    except ImportError as error:
        if "beyond top-level package" not in str(error):
            raise
        raise LoraRarError("the training commands run the pack's ComfyUI adapter: start them with `python -m hypernet` "
                           "from the pack's folder, not through a top-level import of hypernet") from None


def run_check_dataset(args: argparse.Namespace) -> int:
    # with --base, one pass reads each LoRA once, through the model's key map: each problem is listed once
    problems = (check_dataset(args.dataset) if args.base is None
                else comfy_adapter(args.comfy).check_against_model(args.dataset, args.base))
    for line in problems:
        print(line)
    print(f"{args.dataset}: {len(problems)} problem(s)" if problems else f"{args.dataset}: ready for training",
          file=sys.stderr)
    return 1 if problems else 0


def run_train(args: argparse.Namespace) -> int:
    recipe = recipe_from(args)
    if int(os.environ.get("RANK", "0")) == 0:  # before ComfyUI is even imported
        refuse_existing(args.out, args.resume, args.overwrite)
    # resolved as the loader node and the merge command resolve theirs, and before ComfyUI is even imported
    init = resolve_hypernet(args.init, default_search_dirs()) if args.init else None
    adapter = comfy_adapter(args.comfy)
    try:
        return _train(adapter, args, recipe, init)
    except KeyboardInterrupt:  # before the loop (loading, encoding): nothing to keep yet
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return 130


def _train(adapter, args: argparse.Namespace, recipe: Recipe, init) -> int:
    return adapter.train(dataset_dir=args.dataset, base=args.base, out=args.out, recipe=recipe, resume=args.resume,
                         overwrite=args.overwrite, init=init, cache_dir=args.cache_dir, checkpoint_every=args.checkpoint_every,
                         validate_every=args.validate_every)
