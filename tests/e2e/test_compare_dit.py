"""The compare node, and a merged pair sampling a video, on DiT models through one real server.

Per family: the synthetic model loaded by the stock UNETLoader, conditioning from the test-only node, the family's
own stock empty-latent node and its VAE (``DitFamily.vae``, stock VAELoader), random LoRAs in two formats (subject
kohya, style in another form the host reads for the family), every column of the compare node. SD3.5, Flux,
Flux.2, Z-Image, Qwen-Image and Wan 2.1 (one frame: one image per column); then Wan 2.1 and Wan 2.2 5B sample a
five-frame video with a merged pair (direct and k-lora) through the stock KSampler and VAEDecode.

Skipped, saying why: a family the host lacks (``host_lacks``) or whose VAE its VAELoader lacks (``vae_lacks``:
Flux.2 on 0.3.75), and Flux on 0.3.75, whose stock UNETLoader cannot build the tiny Flux (it hard-codes 24 heads,
docs/DIT_NOTES.md). The 3840- and 3072-wide families (Z-Image, Qwen-Image) get LoRAs on one block's attention and
one MLP linear only (tests/support/families.py), so the merges and ComfyUI's patching stay cheap.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import torch

from devkit import synthetic_dit
from devkit.comfy_server import ComfyServer
from devkit.dit_loras import FORMATS_BY_HOST, random_dit_lora, write_lora
from devkit.synthetic_dit import ALL_FAMILIES, FLUX, host_lacks, vae_lacks
from hypernet import comparison, methods
from hypernet.methods import MergeContext
from tests.conftest import host_version
from tests.support.families import lora_modules

pytestmark = pytest.mark.e2e

def columns_by_kind(family: str) -> tuple[list[str], list[str], list[str]]:
    """(runs, refuses, needs_references): the compare node's columns on the family's tiny DiT, from the registered
    methods' own declarations, so a new method is a column here without naming it. Runs: the baselines and every
    method that merges these LoRA files alone. Refuses (a tile naming the family): a method needing a hypernet (none
    is published for a DiT) or one that says the family is unsupported (b-lora: no published block split). Needs
    references: a data-driven method the compare node cannot give reference images (zip-lora)."""
    ctx = MergeContext(None, torch.device("cpu"), family=ALL_FAMILIES[family].model_class)
    runs, refuses, needs_references = list(comparison.BASELINES), [], []
    for method in methods.all_methods():
        if method.needs_references:
            needs_references.append(method.name)
        elif method.needs_hypernet or method.unsupported(ctx):
            refuses.append(method.name)
        else:
            runs.append(method.name)
    return runs, refuses, needs_references


COMPARED = ("sd35", "flux", "flux2", "zimage", "qwen_image", "wan21")
VIDEO = ("wan21", "wan22")
# Pixels per side: SD3.5 and Flux keep 128 (a 16 x 16 latent); the others run at 64, the least their latent nodes
# and VAEs take without a degenerate latent (Flux.2 and Wan 2.2 5B: 4 x 4, the rest 8 x 8).
SIZES = {"sd35": 128, "flux": 128}
DEFAULT_SIZE = 64
VIDEO_FRAMES = 5  # two latent frames: 1 + 4
# Sampling steps: 2, except Z-Image's 1. Its model is 3840 wide (the width that makes it Z-Image) with 5 layers, and
# it pads image and caption tokens to 32 each, so one forward costs about 4 s on one CPU core whatever the latent's
# size: 2 steps would add 8 forwards (about 35 s) to the compare and the stock graph, beyond the CI budget. One step
# still runs every column through the merge, ComfyUI's patching (K-LoRA's switch at p = 0), the sampler and the VAE.
STEPS = {"zimage": 1}
STYLE_FORMATS = ("peft", "lycoris", "diffsynth", "onetrainer", "comfy")  # the first the host reads for the family


def size_of(family: str) -> int:
    return SIZES.get(family, DEFAULT_SIZE)


def skip_reason(family: str) -> str | None:
    """Why this host cannot run the family's graphs, or None."""
    version, dit = host_version(), ALL_FAMILIES[family]
    reason = host_lacks(dit, version) or vae_lacks(dit, version)
    if reason is None and dit is FLUX and version == "0.3.75":
        reason = ("ComfyUI 0.3.75's stock UNETLoader cannot build the tiny Flux (24 heads hard-coded, "
                  "docs/DIT_NOTES.md); SD3.5 runs the comparison on this host")
    return reason


def style_format(family: str) -> str:
    readable = FORMATS_BY_HOST.get(host_version(), FORMATS_BY_HOST["0.33.0"])[family]
    return next(fmt for fmt in STYLE_FORMATS if fmt in readable)


def loras_of(family: str) -> tuple[str, str]:
    return f"dit_{family}_subject_kohya.safetensors", f"dit_{family}_style_{style_format(family)}.safetensors"


@pytest.fixture(scope="module")
def dit_server(tmp_path_factory):
    """One server for every family: the synthetic models and their VAEs, the test-only nodes, two LoRAs per family."""
    names = [name for name in dict.fromkeys(COMPARED + VIDEO) if skip_reason(name) is None]
    models = synthetic_dit.ensure_dit(families=names)
    loras = tmp_path_factory.mktemp("dit_loras")
    for name in names:
        family, seed = ALL_FAMILIES[name], 121 + 2 * list(ALL_FAMILIES).index(name)
        # the update's entries about as large as the weights' (std 1/sqrt(width)), whatever the width
        std, modules = 0.2 * (128 / family.hidden_size) ** 0.25, lora_modules(name)
        subject, style = loras_of(name)
        write_lora(loras / subject, random_dit_lora(family, "kohya", rank=4, seed=seed, alpha=4.0, std=std,
                                                    root=models, modules=modules))
        write_lora(loras / style, random_dit_lora(family, style_format(name), rank=4, seed=seed + 1, std=std,
                                                  root=models, modules=modules))
    with ComfyServer(models, folders={"loras": loras}, test_nodes=True) as server:
        yield server


def runnable(family: str) -> str:
    """The family, or a skip saying why this host cannot run it."""
    reason = skip_reason(family)
    if reason:
        pytest.skip(reason)
    return family


@pytest.fixture(scope="module", params=COMPARED)
def family(request) -> str:
    return runnable(request.param)


def empty_latent(family: str, frames: int = 1) -> dict:
    """The family's own stock empty-latent node: the video one for (B, C, T, H, W) latents (``frames`` frames)."""
    dit, size = ALL_FAMILIES[family], size_of(family)
    if dit.frames is not None and dit.latent_channels == 48:  # Wan 2.2 5B: its own node, 16x downscale
        return {"class_type": "Wan22ImageToVideoLatent", "inputs": {"vae": ["5", 0], "width": size, "height": size,
                                                                     "length": frames, "batch_size": 1}}
    if dit.frames is not None:  # Wan 2.1 latents (Wan 2.1, Qwen-Image): the node Wan's workflows use
        return {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": size, "height": size, "length": frames,
                                                                     "batch_size": 1}}
    if dit.latent_channels == 128:
        return {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}
    return {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}


def sampler_inputs(family: str, model: list, latent: list) -> dict:
    return {"model": model, "latent_image": latent, "seed": 3, "steps": STEPS.get(family, 2), "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}


def dit_graph(family: str, sampler: dict, frames: int = 1) -> dict:
    """UNETLoader -> test conditioning x2, the family's empty latent, VAELoader of its VAE, and ``sampler`` as
    node 6 (inputs filled in here), the Hypernet Loader ("auto") as node 7."""
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": ALL_FAMILIES[family].file.split("/", 1)[1],
                                                      "weight_dtype": "default"}},
        "2": {"class_type": "LoraRarTestConditioning", "inputs": {"model": ["1", 0], "seed": 1, "tokens": 8, "batch": 1}},
        "3": {"class_type": "LoraRarTestConditioning", "inputs": {"model": ["1", 0], "seed": 2, "tokens": 8, "batch": 1}},
        "4": empty_latent(family, frames),
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": ALL_FAMILIES[family].vae}},
        "6": sampler,
        "7": {"class_type": "LoraRarHypernetLoader", "inputs": {"hypernet": "auto", "model": ["1", 0]}},
    }
    sampler["inputs"].update(sampler_inputs(family, ["1", 0], ["4", 0]))
    return graph


def stock_graph(family: str) -> dict:
    graph = dit_graph(family, {"class_type": "KSampler", "inputs": {"positive": ["2", 0], "negative": ["3", 0]}})
    graph["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["5", 0]}}  # no hypernet here
    graph["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"dit_{family}_stock"}}
    return graph


def compare_graph(family: str, methods: str = "all") -> dict:
    subject, style = loras_of(family)
    graph = dit_graph(family, {"class_type": "LoraRarCompare", "inputs": {
        "vae": ["5", 0], "subject_lora": subject, "style_lora": style, "positive": "", "negative": "",
        "methods": methods, "layer_policy": "sum", "positive_conditioning": ["2", 0],
        "negative_conditioning": ["3", 0], "hypernet": ["7", 0],  # connected as a user would: no DiT hypernet
        "ssr_merge_calibration_px": float(SIZES.get(family, DEFAULT_SIZE))}})  # ssr-merge at the grid's size
    graph["8"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 1], "filename_prefix": f"dit_{family}_columns"}}
    graph["9"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"dit_{family}_grid"}}
    graph["10"] = {"class_type": "PreviewAny", "inputs": {"source": ["6", 3]}}
    return graph


VIDEO_BRANCHES = {"unpatched": None, "direct": "direct", "k-lora": "k-lora"}  # SaveImage node id -> merge method


def video_graph(family: str) -> dict:
    """UNETLoader -> LoraRarMerge (direct; k-lora) -> KSampler on a VIDEO_FRAMES-frame latent -> VAEDecode ->
    SaveImage, and the unpatched model through the same sampler; the SaveImage nodes are named by VIDEO_BRANCHES."""
    subject, style = loras_of(family)
    graph = dit_graph(family, {"class_type": "KSampler", "inputs": {"positive": ["2", 0], "negative": ["3", 0]}},
                      frames=VIDEO_FRAMES)
    del graph["6"]
    for branch, method in VIDEO_BRANCHES.items():
        model = ["1", 0]
        if method is not None:
            graph[f"merge {branch}"] = {"class_type": "LoraRarMerge", "inputs": {
                "model": ["1", 0], "hypernet": ["7", 0], "subject_lora": subject, "style_lora": style,
                "subject_strength": 1.0, "style_strength": 1.0, "subject_clip_strength": 1.0,
                "style_clip_strength": 1.0, "method": method, "layer_policy": "sum"}}
            model = [f"merge {branch}", 0]
        graph[f"sample {branch}"] = {"class_type": "KSampler", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], **sampler_inputs(family, model, ["4", 0])}}
        graph[f"decode {branch}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"sample {branch}", 0],
                                                                          "vae": ["5", 0]}}
        graph[branch] = {"class_type": "SaveImage", "inputs": {"images": [f"decode {branch}", 0],
                                                               "filename_prefix": f"dit_{family}_video_{branch}"}}
    return graph


def images_of(server, entry: dict, node: str) -> list[np.ndarray]:
    files = server.output_files({"outputs": {node: entry["outputs"][node]}})
    return [np.asarray(Image.open(path).convert("RGB")) for path in sorted(files)]


def column_name(label: str) -> str:
    """"k-lora alpha=1.5 beta=1.275" -> "k-lora": a label is its column's name, then the parameters (name=value)."""
    return " ".join(word for word in label.split() if "=" not in word)


def error_of(entry: dict) -> str:
    return " ".join(m[1].get("exception_message", "") for m in entry["status"]["messages"] if m[0] == "execution_error")


def test_the_test_node_and_the_familys_vae_run_a_stock_dit_graph(dit_server, family):
    """The harness alone: the test node, the family's empty latent, the stock sampler and its VAE's decode."""
    info = dit_server.object_info("VAELoader")["VAELoader"]["input"]["required"]["vae_name"][0]
    assert ALL_FAMILIES[family].vae in info
    entry = dit_server.wait(dit_server.queue_prompt(stock_graph(family)), timeout=120)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    (image,) = images_of(dit_server, entry, "8")
    assert image.shape == (size_of(family), size_of(family), 3) and image.std() > 0


@pytest.fixture(scope="module")
def compared(dit_server, family):
    """(history entry, report, family) of the compare graph with every column; run once per family."""
    entry = dit_server.wait(dit_server.queue_prompt(compare_graph(family)), timeout=300)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    (report,) = entry["outputs"]["10"]["text"]
    return entry, report, family


def test_every_column_runs_or_is_a_tile_naming_the_family(compared):
    _, report, family = compared
    header, *lines = report.splitlines()
    assert "conditioning: the connected positive/negative conditioning" in header
    columns = {column_name(line.split(":")[0]): line for line in lines if not line.startswith(" ")}
    runs, refuses, needs_references = columns_by_kind(family)
    assert sorted(columns) == sorted(runs + refuses + needs_references), report
    # the published methods keep their kinds on every DiT
    assert {"direct", "np-lora", "k-lora", "k-lora-linear"} <= set(runs) and {"lorarar", "b-lora"} <= set(refuses)
    assert "zip-lora" in needs_references
    for name in runs:  # K-LoRA included: the attention roles come from the model's own modules
        assert "did not run" not in columns[name], report
    for name in refuses:  # "SD3" / "Flux" / "ZImage" ...: the wording is the methods' own
        assert "did not run" in columns[name] and ALL_FAMILIES[family].model_class in columns[name], columns[name]
    for name in needs_references:
        assert "did not run" in columns[name] and "needs reference images and prompts" in columns[name], columns[name]


def test_the_columns_images_are_finite_and_differ_where_the_loras_do(dit_server, compared):
    entry, _, family = compared
    assert "invalid value encountered" not in dit_server.log_text()  # numpy's warning when SaveImage casts a NaN
    images = images_of(dit_server, entry, "8")
    size = size_of(family)
    runs = columns_by_kind(family)[0]
    assert len(images) == len(runs) and all(image.shape == (size, size, 3) for image in images)
    by_column = dict(zip(runs, images))
    for name in runs[1:]:  # every LoRA column against no LoRA, and the two LoRAs against each other
        assert not np.array_equal(by_column[name], by_column["no LoRA"]), name
    assert not np.array_equal(by_column["subject only"], by_column["style only"])
    assert not np.array_equal(by_column["subject only"], by_column["direct"])
    (grid,) = images_of(dit_server, entry, "9")
    assert grid.shape[0] >= 256 and grid.shape[1] >= 3 * 256  # nine tiles of at least 256 px


@pytest.fixture(scope="module", params=VIDEO)
def video_family(request) -> str:
    return runnable(request.param)


def test_a_merged_pair_samples_a_video_through_the_stock_sampler(dit_server, video_family):
    """Req. 6: the merge node's model (direct, and k-lora switching per step) in stock KSampler on a 5-frame video
    latent, decoded by the family's VAE: the frames come back, finite, and each method changes them its own way."""
    entry = dit_server.wait(dit_server.queue_prompt(video_graph(video_family)), timeout=300)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    assert "invalid value encountered" not in dit_server.log_text()
    frames = {branch: images_of(dit_server, entry, branch) for branch in VIDEO_BRANCHES}
    size = size_of(video_family)
    for branch, video in frames.items():
        assert len(video) == VIDEO_FRAMES, (branch, len(video))
        assert all(frame.shape == (size, size, 3) for frame in video) and np.stack(video).std() > 0, branch
    unpatched, direct, klora = (np.stack(frames[branch]) for branch in VIDEO_BRANCHES)
    assert not np.array_equal(direct, unpatched) and not np.array_equal(klora, unpatched)
    assert not np.array_equal(klora, direct)
