"""Training a LoRA.rar hypernetwork through ComfyUI's own model: the adapter behind ``python -m hypernet train``.

The loop (hypernet/training/trainer.py) is torch only; this module gives it ComfyUI's side:

- the base checkpoint loaded by ``comfy.sd.load_checkpoint_guess_config`` (so any UNet ComfyUI detects works),
  once with its VAE and text encoders to encode the dataset (latents and conditionings cached in the run
  folder), then the diffusion model alone for training;
- the LoRAs read through ComfyUI's key map as the merge and ZipLoRA read them (``ModelView.read``);
- the branch injected by the one injector (branch.py), routed to the pair being trained (``RoutedMerge``), so the
  model is patched once for the whole run;
- the forward: ``noised_batch`` / ``prediction`` of sampling.py (ComfyUI's noise schedule and ``apply_model``).

Random crop: images are resized (shorter side to --resolution) and VAE-encoded once; each draw crops a
resolution/8 square from the latent (a crop on the 8-pixel grid of the image), so no VAE runs while training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import comfy.model_management
import comfy.sd
import torch

from ...hypernet.checkpoints import ResolvedHypernet
from ...hypernet.errors import LoraRarError, unforeseen_as_error
from ...hypernet.files import atomic_file, refuse_replacing
from ...hypernet.keys import attention_role
from ...hypernet.layers import LowRankLayer
from ...hypernet.methods.lorarar import HYPERNET_ROLES
from ...hypernet.model import LoraRarHypernet
from ...hypernet.training import distributed
from ...hypernet.training.dataset import Dataset, LoraCheck, check_dataset, load_dataset, read_rgb
from ...hypernet.model import new_hypernet, save_hypernet
from ...hypernet.training.output import refuse_existing, run_dir_for, training_metadata
from ...hypernet.training.recipe import Recipe
from ...hypernet.training.state import load_checkpoint
from ...hypernet.training.trainer import Trainer
from ...hypernet.ziplora import RoutedMerge, ZipLoraMerge
from .branch import inject
from .model import ModelView, diffusion_layers, model_class, model_layout, refuse_unsupported
from .sampling import encode_images, encode_text, loaded, model_conditioning, noised_batch, prediction, timestep_count

CACHE_FORMAT = 1


# ---- the dataset encoded once: latents and conditionings ---------------------------------------------------

def _image_tensor(path: Path, resolution: int) -> torch.Tensor:
    """IMAGE (1, H, W, 3) in [0, 1], the shorter side resized to ``resolution`` (the longer on the 8-pixel grid)."""
    import numpy as np
    from PIL import Image

    image = read_rgb(path)
    scale = resolution / min(image.size)
    size = tuple(max(resolution, int(round(side * scale / 8)) * 8) for side in image.size)
    image = image.resize(size, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def _plain_conditioning(conditioning: list) -> list:
    """A CONDITIONING's first entry as [cross_attn, {name: tensor or number}] (what a weights_only file holds)."""
    cross_attn, extras = conditioning[0]
    return [cross_attn.detach().float().cpu(), {k: (v.detach().float().cpu() if isinstance(v, torch.Tensor) else v) for k, v in extras.items()
                                       if isinstance(v, (torch.Tensor, int, float, str, bool))}]


def cache_key(base: Path, dataset: Dataset, recipe: Recipe) -> str:
    """What the cached encodings depend on: the base file (name, size, time), each entry's images and caption."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{base.resolve()}|{base.stat().st_size}|{base.stat().st_mtime_ns}|"
                            f"{recipe.resolution}|{recipe.fixed_style_prompt}".encode())
    for (kind, name), entry in sorted(dataset.entries.items()):
        digest.update(f"|{kind}/{name}|{entry.caption}".encode())
        for image in entry.images:
            digest.update(f"|{image.name}|{image.stat().st_size}|{image.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@torch.no_grad()  # the encoders' weights may say requires_grad: no graph may reach the training loop
def encode_entries(clip, vae, dataset: Dataset, recipe: Recipe) -> dict:
    """"<kind>/<name>" -> {"latents": [(C, h, w) per image], "conditioning": [cross_attn, extras], "caption": str}:
    every training image VAE-encoded (VAEEncode) and every caption CLIP-encoded (CLIPTextEncode)."""
    entries = {}
    for (kind, name), entry in sorted(dataset.entries.items()):
        caption = recipe.fixed_style_prompt if kind == "styles" and recipe.fixed_style_prompt else entry.caption
        latents = [encode_images(vae, _image_tensor(image, recipe.resolution))[0].cpu() for image in entry.images]
        entries[f"{kind}/{name}"] = {"latents": latents, "conditioning": _plain_conditioning(encode_text(clip, caption)),
                                     "caption": caption}
    return entries


def write_encodings(path: Path, entries: dict) -> None:
    with atomic_file(path) as temp:
        torch.save({"format": CACHE_FORMAT, "entries": entries}, temp)


def encode_dataset(base: Path, dataset: Dataset, recipe: Recipe, path: Path) -> None:
    """encode_entries with the base checkpoint's own VAE and text encoders, written to ``path`` (torch file)."""
    _, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(base), output_vae=True, output_clip=True)
    if clip is None or vae is None:
        raise LoraRarError(f"{base}: the checkpoint holds no text encoder or no VAE, which encoding the dataset needs")
    write_encodings(path, encode_entries(clip, vae, dataset, recipe))
    del clip, vae
    comfy.model_management.soft_empty_cache()


def read_encodings(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, or a pickle of more than tensors (refused by weights_only)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        if "weights_only" in str(error) or "Unsupported global" in str(error):  # never advise weights_only=False
            reason = "it holds more than tensors, numbers and strings; refused (only weights_only=True loads)"
        raise LoraRarError(f"{path}: unreadable encoded-dataset cache ({reason}); delete it to encode again") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("entries"), dict) or payload.get("format") != CACHE_FORMAT:
        raise LoraRarError(f"{path}: encodings of another format; delete it to encode again")
    return payload["entries"]


# ---- the model side of the loop -----------------------------------------------------------------------------

def _checkpointed_forward(original):
    """The block's forward recomputed in backward (torch.utils.checkpoint, non-reentrant: the hypernet's
    coefficients reach the branch from outside the block and still get their gradient)."""
    from torch.utils.checkpoint import checkpoint

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    return forward


class ComfyTask:
    """The trainer's Task on a ComfyUI MODEL: LoRA layers by the model's key map, draws from cached encodings."""

    def __init__(self, model, dataset: Dataset, encodings: dict, recipe: Recipe):
        self.model, self.dataset, self.encodings, self.recipe = model, dataset, encodings, recipe
        self.view = ModelView(model)
        self.paths = self.view.module_paths()
        self.shapes = self.view.shapes
        self.route = RoutedMerge(list(self.paths))
        self.device = model.load_device
        self.timesteps = timestep_count(model)
        self._conditions: dict[str, dict] = {}
        self.patched = self._inject()

    def layers(self, kind: str, name: str) -> dict[str, LowRankLayer]:
        path = str(self.dataset.entry(kind, name).lora)
        with unforeseen_as_error(path):
            lora = self.view.read(path)
        problem = misfit(lora, self.paths, self.shapes)
        if problem:
            raise LoraRarError(problem)
        refuse_unsupported(lora, self.paths, "training")
        return diffusion_layers(lora, self.paths)

    def _inject(self):
        """A clone of the model whose LoRA-capable layers run the routed branch (the one injector)."""
        patched, _, _ = inject(self.model, self.route, self.paths)  # what it skips (3x3 convs) no LoRA may patch: layers() refuses those
        if self.recipe.gradient_checkpointing:
            for name, module in self.model.model.diffusion_model.named_modules():
                if type(module).__name__ == "BasicTransformerBlock":
                    attribute = f"diffusion_model.{name}.forward"
                    patched.add_object_patch(attribute, _checkpointed_forward(patched.get_model_object(attribute)))
        return patched

    def attach(self, merge: ZipLoraMerge | None) -> None:
        self.route.attach(merge)

    def draw(self, kind: str, name: str, generator: torch.Generator):
        """A latent crop of one of the entry's images, its noise and timestep, all from ``generator`` (CPU)."""
        encoded = self.encodings[f"{kind}/{name}"]
        latents = encoded["latents"]
        latent = latents[int(torch.randint(len(latents), (1,), generator=generator))]
        size = self.recipe.resolution // 8
        top = int(torch.randint(latent.shape[1] - size + 1, (1,), generator=generator))
        left = int(torch.randint(latent.shape[2] - size + 1, (1,), generator=generator))
        crop = latent[None, :, top:top + size, left:left + size]
        noise = torch.randn(crop.shape, generator=generator)
        timestep = torch.randint(0, self.timesteps, (1,), generator=generator)
        crop = crop.to(self.device)
        key = f"{kind}/{name}"
        if key not in self._conditions:  # the same latent size every draw: built once per entry
            cross_attn, extras = encoded["conditioning"]
            self._conditions[key] = model_conditioning(self.patched, [[cross_attn.to(self.device), extras]], crop)
        return noised_batch(self.patched, crop, noise.to(self.device), timestep.to(self.device), self._conditions[key])

    def denoise(self, batch) -> torch.Tensor:
        return prediction(self.patched, batch)


def misfit(lora, paths: dict[str, str], shapes: dict) -> str | None:
    """Why a LoRA read through the model's key map cannot train on this model (one line naming the file), or None:
    layers the map does not place, a layer whose update does not fit the model's weight, no to_q / to_out.0 layer."""
    if lora.unmapped:
        return (f"{lora.path}: {len(lora.unmapped)} of its layers are not layers of this model (e.g. "
                f"{' '.join(sorted(lora.unmapped)[0].split())[:100]}): a LoRA for another base model?")
    layers = diffusion_layers(lora, paths)
    for name, layer in sorted(layers.items()):
        weight = shapes.get(f"{paths[name]}.weight")
        reason = layer.misfit(weight, shapes.get(f"{paths[name]}.bias")) if weight is not None else None
        if reason:
            return f"{lora.path}: layer {name}: {reason}: a LoRA for another base model?"
    if not any(attention_role(name) in HYPERNET_ROLES for name in layers):
        return f"{lora.path}: patches no to_q / to_out.0 layer of this model: nothing for the hypernet to merge"
    return None


def attention_widths(model) -> list[int]:
    """The widths H needs: the d_out of every to_q / to_out.0 layer of the model (one input layer per width)."""
    weights = model.model.state_dict()
    return sorted({int(weights[f"{path}.weight"].shape[0]) for name, path in ModelView(model).module_paths().items()
                   if attention_role(name) in HYPERNET_ROLES})


# ---- the command ---------------------------------------------------------------------------------------------

def _load_model(base: Path):
    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(base), output_vae=False, output_clip=False)
    if model is None:
        raise LoraRarError(f"{base}: ComfyUI found no diffusion model in this checkpoint")
    model.model.requires_grad_(False)  # only H trains; the base weights never get a gradient
    return model


def _initial_hypernet(init: ResolvedHypernet | None, widths: list[int], recipe: Recipe) -> LoraRarHypernet:
    if init is None:
        return new_hypernet(widths, hidden=recipe.hidden, seed=recipe.seed)
    net = init.net
    missing = sorted(set(widths) - set(net.widths))
    if missing:
        raise LoraRarError(f"{init.name}: serves attention widths {sorted(net.widths)}, the base model also has {missing}; "
                           "fine-tune from a hypernet made for this model family, or train a new one")
    return net


def train(*, dataset_dir: Path, base: Path, out: Path, recipe: Recipe, resume: bool = False, overwrite: bool = False,
          init: ResolvedHypernet | None = None, cache_dir: Path | None = None, checkpoint_every: int = 50, validate_every: int = 50) -> int:
    """``python -m hypernet train``: encode (rank 0, cached), train, write ``out`` (rank 0). Returns the exit code
    (0 done, 130 stopped by Ctrl-C / SIGTERM with the checkpoint kept). init: the --init hypernet, resolved by the
    command line (hypernet.checkpoints.resolve_hypernet, as the loader node and the merge command resolve theirs)."""
    world = distributed.world_from_env()
    run_dir = run_dir_for(out)
    if world.writer:
        refuse_existing(out, resume, overwrite)
    dataset = load_dataset(dataset_dir)
    if not base.is_file():
        raise LoraRarError(f"{base}: base checkpoint not found")
    if world.writer:  # --overwrite replaces --out, never one of the run's own inputs
        inputs = {"base checkpoint": str(base), **({"--init hypernet": str(init.net.source)} if init else {})}
        inputs.update({f"{kind[:-1]} LoRA {name}": str(entry.lora) for (kind, name), entry in dataset.entries.items()})
        refuse_replacing(out, inputs)
    if resume:  # a missing or unreadable checkpoint is said before the dataset is encoded
        load_checkpoint(run_dir)
    device = comfy.model_management.get_torch_device()
    distributed.start(world, device)
    try:
        encodings_path = Path(cache_dir or run_dir) / f"encodings-{cache_key(base, dataset, recipe)}.pt"
        if world.writer:
            run_dir.mkdir(parents=True, exist_ok=True)
            encodings_path.parent.mkdir(parents=True, exist_ok=True)
            if not encodings_path.is_file():
                encode_dataset(base, dataset, recipe, encodings_path)
        distributed.barrier(world)
        model = _load_model(base)
        task = ComfyTask(model, dataset, read_encodings(encodings_path), recipe)
        for kind, name in sorted(dataset.entries):  # a LoRA for another model: now, not when its pair is first drawn
            task.layers(kind, name)
        widths = attention_widths(model)
        hypernet = _initial_hypernet(init, widths, recipe)
        trainer = Trainer(hypernet, task, dataset.pairs("train"), dataset.pairs("validation"), recipe, run_dir, world,
                          checkpoint_every=checkpoint_every, validate_every=validate_every)
        with torch.inference_mode(False), torch.enable_grad(), loaded(task.patched):
            if resume:
                trainer.resume()
            result = trainer.run()
        if world.writer and not result.stopped:
            metadata = training_metadata(model_classes=[model_class(model)], widths=sorted(hypernet.widths),
                                         pairs=dataset.pairs("train"), recipe_json=recipe.to_json(world.size),
                                         steps=result.steps, base_model=base.name, layout=model_layout(model))
            save_hypernet(result.hypernet, out, metadata, overwrite=overwrite or resume)
            print(f"wrote {out} ({result.steps} steps, {result.seconds_per_step:.3g} s per step)")
        return 130 if result.stopped else 0
    finally:
        distributed.stop(world)


def check_against_model(dataset_dir: Path, base: Path) -> list[str]:
    """check-dataset --base: every problem of the dataset (hypernet/training/dataset.py), each LoRA read once, through
    the base model's key map, and also checked against the model: layers it does not place or whose shapes differ,
    no to_q / to_out.0 layer of it (one line each, naming the file)."""
    if not base.is_file():
        return [*check_dataset(dataset_dir), f"{base}: base checkpoint not found"]
    model = _load_model(base)
    view = ModelView(model)
    paths, shapes = view.module_paths(), view.shapes

    def read(path: Path):
        with unforeseen_as_error(str(path)):
            return view.read(str(path))

    def misfit_here(lora) -> str | None:
        problem = misfit(lora, paths, shapes)
        return f"{problem} (base {base.name}, {model_class(model)})" if problem else None

    return check_dataset(dataset_dir, LoraCheck(read, misfit_here))
