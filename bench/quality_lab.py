"""The merge-quality lab: a tiny world where a diffusion model ComfyUI loads draws shapes in styles, LoRAs of unseen
shapes and styles, and every merge method of the pack scored by shape and style judges (docs/QUALITY.md).

    .host/0.33.0/venv/bin/python bench/quality_lab.py            # the full lab, gates asserted (docs/QUALITY.md)
    .host/0.33.0/venv/bin/python bench/quality_lab.py --quick    # every stage at toy sizes, gates not asserted

Every stage is cached under --cache (default .cache/quality_lab/<mode>) by a key of its recipe and inputs, so a
rerun reuses what is built and redoes what changed. Everything is made here from --seed: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devkit import quality_models, quality_world  # noqa: E402  (torch/numpy; ComfyUI imported when a stage runs)
from devkit.synthetic_models import comfy_root, locked, save_atomic  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    """Every size of the lab; the full and quick modes are two instances (FULL, QUICK)."""

    seed: int = 0
    family: str = "sd15"  # devkit/quality_models.FAMILIES
    judge_steps: int = 0  # 0: the world module's default
    autoencoder_steps: int = 500
    autoencoder_batch: int = 16
    base_poses: int = 48  # renders per base (shape, style) combination, encoded once
    base_steps: int = 300
    base_batch: int = 32
    base_lr: float = 1e-3
    lora_rank: int = 8
    lora_images: int = 48
    lora_steps: int = 50
    lora_batch: int = 8
    lora_lr: float = 3e-3
    lora_subjects: int = 8  # of the world's lora_train split (quick: fewer)
    lora_styles: int = 8
    held_out: int = 2
    sample_steps: int = 12
    cfg: float = 4.0
    sampler: str = "dpmpp_2m"
    scheduler: str = "karras"
    gate_images: int = 6  # per base combination (36 combinations: 216 samples)
    gate_combinations: int = 36  # how many base combinations the base gate samples (quick: a few)
    gate_lora_images: int = 12
    seeds: int = 4  # sampling seeds per (pair, method): the confidence interval is over these
    images_per_seed: int = 4
    hypernet_epochs: int = 120
    hypernet_steps_per_pair: int = 2
    ziplora_steps: int = 100

    def key(self, *fields: str, parent: str = "") -> str:
        """A cache key of ``fields``, the stage's ``parent`` key (what it is built from) and LAB_VERSION."""
        values = json.dumps({name: getattr(self, name) for name in fields}, sort_keys=True)
        return hashlib.sha256(f"{LAB_VERSION} {parent} {values}".encode()).hexdigest()[:12]

    # Each stage's key holds its parent's: a change upstream rebuilds everything built from it.
    def autoencoder_key(self) -> str:
        return self.key("seed", "family", "autoencoder_steps", "autoencoder_batch")

    def base_key(self) -> str:
        return self.key("base_poses", "base_steps", "base_batch", "base_lr", parent=self.autoencoder_key())

    def lora_key(self) -> str:
        return self.key("lora_rank", "lora_images", "lora_steps", "lora_batch", "lora_lr", parent=self.base_key())

    def dataset_key(self) -> str:
        return self.key("lora_subjects", "lora_styles", "held_out", parent=self.lora_key())

    def hypernet_key(self) -> str:
        return self.key("hypernet_epochs", "hypernet_steps_per_pair", parent=self.dataset_key())


# Bump when a stage's code changes what it builds (a loop, a constant of devkit/quality_models.py): every key changes.
LAB_VERSION = 1
FULL = Recipe()
QUICK = replace(FULL, judge_steps=20, autoencoder_steps=4, base_poses=2, base_steps=3, lora_images=4, lora_steps=2,
                lora_subjects=2, lora_styles=2, held_out=1, sample_steps=2, gate_images=1, gate_lora_images=1,
                seeds=2, images_per_seed=1, hypernet_epochs=1, ziplora_steps=2, gate_combinations=2)

METHOD_COLUMNS = ("direct", "np-lora", "k-lora", "k-lora-linear", "est-lora", "ssr-merge", "zip-lora", "lorarar", "b-lora")
BASELINES = ("no LoRA", "subject only", "style only")
IMAGE_PX = 64  # renders and samples; the VAE makes 8x8 latents of them (devkit/quality_models.py)
GATES = {"base shape": 0.90, "base style": 0.90, "lora alone": 0.80, "judge": 0.98}


def write_text_atomic(path: Path, text: str) -> None:
    from hypernet.files import atomic_file

    with atomic_file(path) as temp:
        temp.write_text(text)


def say(line: str) -> None:
    print(f"[quality-lab {time.strftime('%H:%M:%S')}] {line}", flush=True)


class Lab:
    """The stages in order, each cached under ``cache`` by its recipe key (a file that exists is reused)."""

    def __init__(self, recipe: Recipe, cache: Path):
        self.recipe, self.cache = recipe, cache
        self.family = quality_models.FAMILIES[recipe.family]
        self.world = quality_world.World(seed=recipe.seed, size=IMAGE_PX)
        self.judged = quality_world.World(seed=recipe.seed)  # the judges' world: the same concepts at their 32 px
        self.seconds: dict[str, float] = {}
        self.encodings: dict[str, list] = {}
        for folder in ("loras", "hypernets", "checkpoints", "work"):
            (cache / folder).mkdir(parents=True, exist_ok=True)
        import torch

        torch.manual_seed(recipe.seed)
        from devkit.comfy_server import in_process_host
        from devkit.loaded_pack import pack_module

        import logging

        logging.getLogger().setLevel(logging.ERROR)  # the host's optional nodes' import warnings are not the lab's
        self.nodes = in_process_host(cache / "loras", cache / "hypernets", cache / "work")
        self.sampling = pack_module(self.nodes, "nodes.adapter.sampling")

    # ---- concepts ------------------------------------------------------------------------------------------
    def subjects(self, part: str):
        shapes = self.world.split("shape", part)
        return shapes[: self.recipe.lora_subjects] if part == "lora_train" else shapes[: self.recipe.held_out]

    def styles(self, part: str):
        styles = self.world.split("style", part)
        return styles[: self.recipe.lora_styles] if part == "lora_train" else styles[: self.recipe.held_out]

    def reference_style(self):
        return self.world.split("style", "base")[0]  # the subject LoRAs' images are drawn in it

    def reference_shape(self):
        return self.world.split("shape", "base")[0]  # the style LoRAs' images show it

    def concept_seed(self, concept) -> int:
        """A training seed of its own per concept (a shape and a style of the same index must not share one)."""
        kind = quality_world.KINDS.index(concept.kind)
        return int(np.random.SeedSequence([self.recipe.seed, kind, concept.index]).generate_state(1)[0])

    def lora_examples(self, concept) -> tuple[list, str]:
        """(shape, style) pairs a concept's LoRA is trained on and its one caption (dataset layout: one caption)."""
        pair = (concept, self.reference_style()) if concept.kind == "shape" else (self.reference_shape(), concept)
        return [pair] * self.recipe.lora_images, self.world.caption(*pair)

    # ---- cached stages -------------------------------------------------------------------------------------
    def timed(self, stage: str, make):
        started = time.perf_counter()
        result = make()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started
        return result

    def judges(self):
        """The shape and style judges, trained once; their held-out accuracy is kept beside them (judge_accuracy)."""
        path = self.cache / f"judges-{self.recipe.key('seed', 'judge_steps')}.safetensors"
        scores = path.with_suffix(".json")
        if not (path.is_file() and scores.is_file()):
            steps = {"steps": self.recipe.judge_steps} if self.recipe.judge_steps else {}
            accuracy = self.timed("judges", lambda: quality_world.train_judges(self.judged, self.recipe.seed, path, **steps))
            write_text_atomic(scores, json.dumps(accuracy, indent=2) + "\n")
        if not hasattr(self, "_judges"):
            self.judge_accuracy = json.loads(scores.read_text())
            self._judges = quality_world.load_judges(path)
        return self._judges

    def autoencoder(self) -> dict:
        from safetensors.torch import load_file

        path = self.cache / f"autoencoder-{self.recipe.autoencoder_key()}.safetensors"
        if not path.is_file():
            every = [(a, b) for a in self.world.shapes for b in self.world.styles]

            def draw(count: int, step: int):
                rows = np.random.default_rng([self.recipe.seed, step]).integers(0, len(every), count)
                return self.world.batch([every[i] for i in rows], seed=step)

            state = self.timed("autoencoder", lambda: quality_models.train_autoencoder(
                draw, self.recipe.autoencoder_steps, self.recipe.autoencoder_batch, self.recipe.seed, say, self.family))
            save_atomic(state, path)
        return load_file(str(path))

    def base_checkpoint(self) -> Path:
        key = self.recipe.base_key()
        path = self.cache / "checkpoints" / f"quality-lab-{self.recipe.family}-{key}.safetensors"
        if path.is_file():
            return path
        initial = self.cache / "work" / f"initial-{key}.safetensors"
        quality_models.initial_checkpoint(initial, self.autoencoder(), self.recipe.seed, self.family)
        model, clip, vae = quality_models.load_checkpoint(initial, self.family)
        pairs = [(a, b) for a in self.world.split("shape", "base") for b in self.world.split("style", "base")]
        rows = [pair for pair in pairs for _ in range(self.recipe.base_poses)]
        data = self.timed("encode base set", lambda: quality_models.encode(
            self.sampling, model, clip, vae, self.world.batch(rows, seed=self.recipe.seed + 1),
            [self.world.caption(*pair) for pair in rows]))
        schedule = quality_models.Schedule(self.recipe.base_steps, self.recipe.base_batch, self.recipe.base_lr,
                                           self.recipe.seed)
        self.timed("base model", lambda: quality_models.train_base(self.sampling, model, data, schedule, say))
        unet, clip_sd, vae_sd = quality_models.parts_of(model, clip, vae)
        quality_models.save_checkpoint(path, model.model.model_config, unet, clip_sd, vae_sd,
                                       {"lorarar_quality_lab": json.dumps(asdict(self.recipe))})
        initial.unlink()
        return path

    def loaded_base(self):
        """(MODEL, CLIP, VAE) of the trained base, loaded once by ComfyUI's checkpoint loader."""
        if not hasattr(self, "_base"):
            self._base = quality_models.load_checkpoint(self.base_checkpoint(), self.family)
        return self._base

    def lora_name(self, concept) -> str:
        """The LoRA's file name in the lab's loras folder (what the nodes' lora widgets take)."""
        return f"{concept.kind}-{concept.token}-{self.recipe.lora_key()}.safetensors"

    def lora(self, concept) -> Path:
        """The concept's LoRA (kohya format, every attention projection of the UNet), trained once."""
        path = self.cache / "loras" / self.lora_name(concept)
        if path.is_file():
            return path
        model, clip, vae = self.loaded_base()
        pairs, caption = self.lora_examples(concept)
        data = quality_models.encode(self.sampling, model, clip, vae,
                                     self.world.batch(pairs, seed=[self.recipe.seed, 7, concept.index]), [caption] * len(pairs))
        schedule = quality_models.Schedule(self.recipe.lora_steps, self.recipe.lora_batch, self.recipe.lora_lr,
                                           self.concept_seed(concept), drop_prompt=0.0)
        state = self.timed("LoRAs", lambda: quality_models.train_lora(self.sampling, model, data, self.recipe.lora_rank,
                                                                    schedule, say, f"{concept.kind} {concept.name}"))
        missing = quality_models.unloaded_keys(model, state)
        if missing:
            raise RuntimeError(f"LoRA {concept.name}: ComfyUI's key map does not patch {missing[:3]} ...")
        save_atomic(state, path, {"ss_output_name": f"{concept.kind} {concept.name}"})
        return path

    def dataset(self) -> Path:
        """The hypernet's training set in the layout of docs/TRAINING.md: every LoRA with its images and caption."""
        from PIL import Image

        folder = self.cache / "work" / f"dataset-{self.recipe.dataset_key()}"
        split = {"train": {"subjects": [s.token for s in self.subjects("lora_train")],
                           "styles": [s.token for s in self.styles("lora_train")]},
                 "validation": {"subjects": [s.token for s in self.subjects("held_out")],
                                "styles": [s.token for s in self.styles("held_out")]}}
        for part in ("lora_train", "held_out"):
            for concept in (*self.subjects(part), *self.styles(part)):
                entry = folder / ("subjects" if concept.kind == "shape" else "styles") / concept.token
                (entry / "images").mkdir(parents=True, exist_ok=True)
                pairs, caption = self.lora_examples(concept)
                (entry / "caption.txt").write_text(caption + "\n")
                lora = entry / "lora.safetensors"
                lora.unlink(missing_ok=True)  # a link left by an earlier run may point at a file since removed
                lora.symlink_to(self.lora(concept))
                images = self.world.batch(pairs[:8], seed=[self.recipe.seed, 7, concept.index])
                for i, image in enumerate(images):
                    Image.fromarray(image).save(entry / "images" / f"{i}.png")
        (folder / "split.json").write_text(json.dumps(split, indent=2) + "\n")
        return folder

    def hypernet(self) -> Path:
        """A LoRA.rar hypernetwork trained by ``python -m hypernet train`` (the real command) on the training pairs."""
        import subprocess

        out = self.cache / "hypernets" / f"lab-{self.recipe.hypernet_key()}.safetensors"
        if out.is_file():
            return out
        dataset = self.dataset()
        command = [sys.executable, "-m", "hypernet", "train", "--dataset", str(dataset), "--base", str(self.base_checkpoint()),
                   "--out", str(out), "--resolution", str(self.world.size), "--epochs", str(self.recipe.hypernet_epochs),
                   "--steps-per-pair", str(self.recipe.hypernet_steps_per_pair), "--checkpoint-every", "0",
                   "--validate-every", "0", "--seed", str(self.recipe.seed), "--overwrite"]
        say("hypernet: " + " ".join(command[1:]))
        started = time.perf_counter()
        # the trainer's own progress lines go to this process's output
        proc = subprocess.run(command, cwd=REPO, env={**os.environ, "LORARAR_COMFY": str(comfy_root())})
        self.seconds["hypernet training"] = time.perf_counter() - started
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(f"quality lab: hypernet training failed (exit {proc.returncode}); its output is above")
        return out

    # ---- sampling and judging through the stock nodes --------------------------------------------------------
    def encoded(self, text: str) -> list:
        """CONDITIONING of ``text`` by the stock CLIPTextEncode, once per text (no LoRA of the lab touches CLIP)."""
        found = self.encodings.get(text)
        if found is None:
            found = self.encodings[text] = self.sampling.encode_text(self.loaded_base()[1], text)
        return found

    def sample(self, model, prompt: str, seed: int, count: int):
        """uint8 (count, H, W, 3): EmptyLatentImage -> KSampler (the stock sampler) -> VAEDecode, as a user runs them."""
        vae = self.loaded_base()[2]
        conditioning = self.encoded(prompt), self.encoded("")
        latent = self.nodes.EmptyLatentImage().generate(self.world.size, self.world.size, count)[0]
        images = self.sampling.sample_and_decode(model, vae, conditioning, latent, seed, self.recipe.sample_steps,
                                                 self.recipe.cfg, self.recipe.sampler, self.recipe.scheduler, 1.0)
        return (images.clamp(0, 1).numpy() * 255).round().astype(np.uint8)

    def classify(self, images):
        """(shape indices, style indices) of uint8 (N, 64, 64, 3) images by the judges, at their 32 px."""
        from PIL import Image

        size = self.judged.size
        small = np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BOX)) for image in images])
        return self.judges().classify(small)

    def with_lora(self, concept):
        """The base MODEL with the concept's LoRA, through the stock LoraLoaderModelOnly."""
        model = self.loaded_base()[0]
        return self.nodes.LoraLoaderModelOnly().load_lora_model_only(model, self.lora_name(concept), 1.0)[0]

    def base_gate(self, out: Path) -> dict:
        """The base model draws its own training combinations: judged shape and style accuracy; base-gate.png shows
        one sample per combination (rows: shapes, in the order of the base styles)."""
        model, rows = self.loaded_base()[0], {}
        hits = {"base shape": [], "base style": []}
        combinations = [(a, b) for a in self.world.split("shape", "base") for b in self.world.split("style", "base")]
        for shape, style in combinations[: self.recipe.gate_combinations]:
            images = self.sample(model, self.world.caption(shape, style), 1000 + shape.index * 16 + style.index,
                                 self.recipe.gate_images)
            shapes, styles = self.classify(images)
            hits["base shape"] += list(shapes == shape.index)
            hits["base style"] += list(styles == style.index)
            rows.setdefault(shape.name, []).append(images[0])
        styles = ", ".join(style.name for style in self.world.split("style", "base"))
        self.grid(f"base model: a row per shape; styles {styles}", rows, out, "base-gate.png")
        return {**{name: float(np.mean(values)) for name, values in hits.items()}, "samples": len(hits["base shape"])}

    def lora_gate(self) -> dict:
        """Each LoRA alone, prompted with its own caption, draws its concept: judged accuracy per LoRA."""
        alone = {}
        for concept in self.concepts():
            _, caption = self.lora_examples(concept)
            images = self.sample(self.with_lora(concept), caption, 2000 + concept.index, self.recipe.gate_lora_images)
            found = self.classify(images)[0 if concept.kind == "shape" else 1]
            alone[f"{concept.kind} {concept.name} ({concept.token})"] = float(np.mean(found == concept.index))
        return alone

    def concepts(self) -> list:
        """Every concept the lab trains a LoRA for: training and held-out subjects and styles."""
        return [c for part in ("lora_train", "held_out") for c in (*self.subjects(part), *self.styles(part))]

    def method_models(self, subject, style, hypernet):
        """Yield (column, MODEL or the refusal line, merge seconds, merged LoRA or None) for one held-out pair."""
        from devkit.loaded_pack import pack_module

        refusal = pack_module(self.nodes, "hypernet.errors").LoraRarError  # the class the pack as ComfyUI loaded it raises
        model, clip, vae = self.loaded_base()
        yield "no LoRA", model, 0.0, None, ""
        yield "subject only", self.with_lora(subject), 0.0, None, ""
        yield "style only", self.with_lora(style), 0.0, None, ""
        subject_pairs, subject_caption = self.lora_examples(subject)
        style_pairs, style_caption = self.lora_examples(style)
        merge = self.nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]()
        for method in METHOD_COLUMNS:
            started = time.perf_counter()
            try:
                if method == "zip-lora":
                    node = self.nodes.NODE_CLASS_MAPPINGS["LoraRarZipLora"]()
                    subject_images, style_images = (
                        quality_models.images_to_tensor(self.world.batch(pairs[:8], seed=[self.recipe.seed, 7, concept.index]))
                        for pairs, concept in ((subject_pairs, subject), (style_pairs, style)))
                    out = node.optimise(model, clip, vae, self.lora_name(subject), self.lora_name(style), subject_images,
                                        subject_caption, style_images, style_caption, **self.ziplora_settings())
                else:
                    # SSR-Merge calibrates on each LoRA's own prompt at the size the lab samples
                    calibration = {"subject_conditioning": self.encoded(subject_caption),
                                   "style_conditioning": self.encoded(style_caption),
                                   "ssr_merge_calibration_px": self.world.size} if method == "ssr-merge" else {}
                    out = merge.merge(model, hypernet, self.lora_name(subject), self.lora_name(style), 1.0, 1.0, 1.0, 1.0,
                                      method, "sum", **calibration)
            except refusal as error:
                yield method, str(error).splitlines()[0], time.perf_counter() - started, None, ""
                continue
            yield method, out[0], time.perf_counter() - started, out[2], out[3]

    def ziplora_settings(self) -> dict:
        """The ZipLoRA node's defaults (its widgets' defaults), with the recipe's step count."""
        required = self.nodes.NODE_CLASS_MAPPINGS["LoraRarZipLora"].INPUT_TYPES()["required"]
        names = ("learning_rate", "similarity_lambda", "seed", "stop_similarity")
        return {**{name: required[name][1]["default"] for name in names}, "steps": self.recipe.ziplora_steps}

    def evaluate(self, out: Path) -> dict:
        """Every column on every held-out pair: per seed, how many images show the subject, the style, both."""
        loader = self.nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]()
        hypernet = loader.load(self.hypernet().name)[0]
        names = {concept.token: f"{concept.name} pattern" for concept in self.styles("held_out")}
        write_text_atomic(out / "style_names.json", json.dumps(names, indent=2) + "\n")  # for evaluate --style-names
        found = {"counts": {}, "refused": {}, "merge_seconds": {}, "merge_reports": {}}
        for subject in self.subjects("held_out"):
            for style in self.styles("held_out"):
                pair = f"{subject.name} ({subject.token}) x {style.name} ({style.token})"
                say(f"pair {pair}: {self.world.caption(subject, style)!r}")
                first_images = {}
                for column, model, seconds, merged, report in self.method_models(subject, style, hypernet):
                    found["merge_seconds"].setdefault(column, []).append(seconds)
                    if isinstance(model, str):
                        found["refused"][column] = model
                        continue
                    if report:  # the merge node's own account: a merge that kept nothing would show here
                        found["merge_reports"].setdefault(column, {})[pair] = report.splitlines()[:3]
                    if column == "lorarar" and not (out / "coefficients.png").is_file():
                        self.coefficient_picture(merged, out)
                    counts, first_images[column] = self.score(model, subject, style, column, out)
                    found["counts"].setdefault(column, {})[pair] = counts
                self.grid(pair, first_images, out)
        found["merge_seconds"] = {k: float(np.mean(v)) for k, v in found["merge_seconds"].items()}
        return found

    def score(self, model, subject, style, column: str, out: Path) -> tuple[list, object]:
        """[[subject hits, style hits, both, images] per seed] of ``model`` on the pair's prompt, and seed 0's images."""
        prompt, counts, first = self.world.caption(subject, style), [], None
        for seed in range(self.recipe.seeds):
            images = self.sample(model, prompt, seed, self.recipe.images_per_seed)
            shapes, styles = self.classify(images)
            hit_subject, hit_style = shapes == subject.index, styles == style.index
            counts.append([int(hit_subject.sum()), int(hit_style.sum()), int((hit_subject & hit_style).sum()), len(images)])
            first = images if first is None else first
            self.keep(out, column, subject, style, seed, images)
        return counts, first

    def keep(self, out: Path, column: str, subject, style, seed: int, images) -> None:
        """Every scored image as a PNG, in the layout ``python -m hypernet evaluate`` reads (the paper's MLLM judge, for
        whoever has one configured): images/<column>/<subject>__<style>/, references/{subjects,styles}/<token>/."""
        from PIL import Image

        folder = out / "images" / column.replace(" ", "-") / f"{subject.token}__{style.token}"
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            Image.fromarray(image).save(folder / f"seed{seed}-{index}.png")
        for concept, kind in ((subject, "subjects"), (style, "styles")):
            references = out / "references" / kind / concept.token
            if not references.is_dir():
                references.mkdir(parents=True)
                pairs, _ = self.lora_examples(concept)
                for index, image in enumerate(self.world.batch(pairs[:4], seed=[self.recipe.seed, 7, concept.index])):
                    Image.fromarray(image).save(references / f"{index}.png")

    def coefficient_picture(self, merged, out: Path) -> None:
        from PIL import Image

        node = self.nodes.NODE_CLASS_MAPPINGS["LoraRarCoefficientPicture"]()
        image = node.draw(merged)[0][0]
        path = out / "coefficients.png"
        Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype("uint8")).save(path)

    def grid(self, title: str, columns: dict, out: Path, name: str = "") -> None:
        """A labelled picture (default: one per pair, a row of images per column), drawn with matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = list(columns)
        per_row = max(len(images) for images in columns.values())
        figure, axes = plt.subplots(len(rows), 1, figsize=(1.0 + per_row * 0.8, len(rows) * 0.9), squeeze=False)
        for axis, column in zip(axes[:, 0], rows):
            axis.imshow(np.concatenate(list(columns[column]), axis=1), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_ylabel(column, rotation=0, ha="right", va="center", fontsize=8)
        figure.suptitle(title, fontsize=9)
        figure.tight_layout()
        name = name or "grid-" + "".join(c if c.isalnum() else "-" for c in title).strip("-") + ".png"
        figure.savefig(out / name, dpi=100)
        plt.close(figure)


# ---- the report -----------------------------------------------------------------------------------------------

# Student's t, two-sided 95%, by degrees of freedom (seeds - 1); beyond 30, 2.04 (a slight overstatement, never an under-)
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18, 15: 2.13,
       20: 2.09, 25: 2.06, 30: 2.04}


def t95(df: int) -> float:
    """The table's value at the largest tabulated df not above ``df`` (rounding df down overstates the interval)."""
    return T95[max(k for k in T95 if k <= df)]


def column_scores(per_pair: dict) -> dict:
    """{subject, style, both: (mean %, half-width of the 95% interval over seeds %)} of one column: per seed, the
    fraction of images over every pair; the interval is Student's t over the seeds."""
    seeds = len(next(iter(per_pair.values())))
    totals = np.array([[sum(counts[seed][k] for counts in per_pair.values()) for k in range(4)] for seed in range(seeds)],
                      dtype=float)
    scores = {}
    for k, name in enumerate(("subject", "style", "both")):
        fractions = 100 * totals[:, k] / totals[:, 3]
        spread = fractions.std(ddof=1) * t95(seeds - 1) / np.sqrt(seeds) if seeds > 1 else float("nan")
        scores[name] = (float(fractions.mean()), float(spread))
    return scores


def report_markdown(summary: dict) -> str:
    """The report: gates, then (when the gates passed) the scores per column, then the stages' times."""
    lines = [f"Command: `{summary['command']}` ({summary['mode']} mode, seed {summary['seed']}); "
             f"{summary['wall_seconds'] / 60:.1f} min wall on {summary['machine']}.", "",
             "| gate | measured | needed |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {needed} |" for name, (value, needed) in summary["gates"].items()]
    if "scores" in summary:
        lines += ["", f"Held-out pairs: {', '.join(summary['pairs'])}; {summary['images_per_pair']} images per pair and "
                  f"column ({summary['seeds']} seeds), judged by the shape and style classifiers; the interval is 95% "
                  "over seeds.", "", "| column | subject % | style % | both % | merge s |", "|---|---|---|---|---|"]
        for column, scores in summary["scores"].items():
            cells = [f"{mean:.1f} ± {spread:.1f}" for mean, spread in (scores[k] for k in ("subject", "style", "both"))]
            lines.append(f"| {column} | {' | '.join(cells)} | {summary['merge_seconds'].get(column, 0.0):.2f} |")
        lines += [f"| {column} | refused: {line} | | | |" for column, line in summary["refused"].items()]
    else:
        lines += ["", "No method scored: " + "; ".join(summary["gate_failures"])]
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in summary["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


def gate_rows(judge_accuracy: dict, base: dict | None = None, alone: dict | None = None) -> tuple[dict, list[str]]:
    """({gate: (measured, needed)}, failures) of the world's gates measured so far."""
    rows, failures = {}, []

    def add(name: str, value: float, needed: float) -> None:
        rows[name] = (f"{100 * value:.1f}%", f">= {100 * needed:.0f}%")
        if value < needed:
            failures.append(f"{name}: {100 * value:.1f}% < {100 * needed:.0f}%")

    add("shape judge on held-out renders", judge_accuracy["shape"]["clean"], GATES["judge"])
    add("style judge on held-out renders", judge_accuracy["style"]["clean"], GATES["judge"])
    if base is not None:
        add(f"base model, shape ({base['samples']} samples)", base["base shape"], GATES["base shape"])
        add(f"base model, style ({base['samples']} samples)", base["base style"], GATES["base style"])
    for name, value in (alone or {}).items():
        add(f"LoRA alone: {name}", value, GATES["lora alone"])
    return rows, failures


class GateFailed(SystemExit):
    pass


def run(recipe: Recipe, quick: bool, cache: Path, out: Path, command: str) -> dict:
    """Every stage; each gate is checked as soon as it is measured (full mode: a failure writes the report so far and
    stops the run before any method is scored)."""
    import torch

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    lab = Lab(recipe, cache)
    summary = {"command": command, "mode": "quick" if quick else "full", "seed": recipe.seed, "recipe": asdict(recipe),
               "world": lab.world.describe(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}

    def gates(*measured) -> None:
        summary["gates"], summary["gate_failures"] = gate_rows(lab.judge_accuracy, *measured)
        say("gates: " + "; ".join(f"{name} {value}" for name, (value, _) in summary["gates"].items()))
        if summary["gate_failures"] and not quick:
            finish(summary, lab, out, started)
            raise GateFailed("quality lab: the world failed its gates, so no method is scored (report: "
                             f"{out / 'report.md'}):\n  " + "\n  ".join(summary["gate_failures"]))

    lab.judges()
    gates()
    lab.loaded_base()  # trained here if missing, outside the inference mode the gates run in
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        base = lab.timed("base gate", lambda: lab.base_gate(out))
    gates(base)
    for concept in lab.concepts():
        lab.lora(concept)
    with torch.inference_mode():
        gates(base, lab.timed("LoRA gate", lab.lora_gate))
    lab.hypernet()
    with torch.inference_mode():
        evaluation = lab.timed("scoring", lambda: lab.evaluate(out))
    summary.update({
        "pairs": [f"{s.name} ({s.token}) x {t.name} ({t.token})" for s in lab.subjects("held_out") for t in lab.styles("held_out")],
        "seeds": recipe.seeds, "images_per_pair": recipe.seeds * recipe.images_per_seed,
        "scores": {column: column_scores(per_pair) for column, per_pair in evaluation["counts"].items()}, **evaluation})
    return finish(summary, lab, out, started)


def finish(summary: dict, lab: Lab, out: Path, started: float) -> dict:
    """results.json and report.md of what the run measured (all of it, or the gates up to a failed one)."""
    summary.update({"judge_accuracy": lab.judge_accuracy, "stage_seconds": lab.seconds,
                    "wall_seconds": time.perf_counter() - started})
    write_text_atomic(out / "results.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "report.md", report_markdown(summary))
    say(f"report: {out / 'report.md'}")
    return summary


def seed_value(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{text}: a seed is an integer from 0 to 2**32 - 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every stage at toy sizes; gates reported, not asserted")
    parser.add_argument("--seed", type=seed_value, default=0, help="the world's seed and every training's")
    parser.add_argument("--family", choices=sorted(quality_models.FAMILIES), default=FULL.family,
                        help="the diffusion model's family (devkit/quality_models.py)")
    parser.add_argument("--cache", type=Path, help="built models (default .cache/quality_lab/<mode>)")
    parser.add_argument("--out", type=Path, help="report, results.json and pictures (default <cache>/report)")
    args = parser.parse_args(argv)
    recipe = replace(QUICK if args.quick else FULL, seed=args.seed, family=args.family)
    cache = args.cache or REPO / ".cache" / "quality_lab" / ("quick" if args.quick else "full")
    command = " ".join(["python bench/quality_lab.py", *(["--quick"] if args.quick else []),
                        *([f"--seed {args.seed}"] if args.seed else []),
                        *([f"--family {args.family}"] if args.family != FULL.family else [])])
    out = args.out or cache / "report"
    for folder in (cache, out):
        if folder.exists() and not folder.is_dir():
            parser.error(f"{folder}: not a folder")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with locked(cache):  # two runs on one cache would build the same files at once
            run(recipe, args.quick, cache, out, command)
    except OSError as error:
        raise SystemExit(f"quality lab: {error.filename or cache}: {error.strerror or error}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
