"""The compare node on a DiT model through a real server: synthetic SD3.5 (stock UNETLoader on both hosts),
conditioning from the test-only node, random SD3.5 LoRAs in two formats, the random TAESD3, every column.

Flux is not run here: on 0.3.75 the stock UNETLoader cannot build the tiny Flux (24 heads hard-coded, see
docs/DIT_NOTES.md), and SD3.5 already takes the comparison workflow through every method on both hosts.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from devkit import synthetic_dit
from devkit.comfy_server import ComfyServer
from devkit.dit_loras import random_dit_lora, write_lora
from devkit.synthetic_dit import SD35

pytestmark = pytest.mark.e2e

SUBJECT, STYLE = "dit_sd35_subject_kohya.safetensors", "dit_sd35_style_peft.safetensors"
UNET = SD35.file.split("/", 1)[1]
FAMILY = "SD3"  # the family name the methods without DiT support give in their reason
RUNS = ["no LoRA", "subject only", "style only", "direct", "np-lora", "k-lora", "k-lora-linear"]
REFUSES = ["lorarar", "b-lora"]  # no SD3 hypernet / no published SD3 block split: tiles naming the family
SIZE = 128  # pixels: a 16 x 16 latent (8 x 8 patches of the synthetic model)


@pytest.fixture(scope="module")
def dit_server(tmp_path_factory):
    """A server with the synthetic DiT models and TAESD3, the test-only nodes and two SD3.5 LoRAs."""
    models = synthetic_dit.ensure_dit()
    loras = tmp_path_factory.mktemp("dit_loras")
    write_lora(loras / SUBJECT, random_dit_lora(SD35, "kohya", rank=4, seed=121, alpha=4.0, std=0.2, root=models))
    write_lora(loras / STYLE, random_dit_lora(SD35, "peft", rank=4, seed=122, std=0.2, root=models))
    with ComfyServer(models, folders={"loras": loras}, test_nodes=True) as server:
        yield server


def dit_graph(sampler: dict) -> dict:
    """UNETLoader (SD3.5) -> test conditioning x2, EmptySD3LatentImage, VAELoader taesd3, and ``sampler`` as node 6
    (inputs filled in here), the Hypernet Loader ("auto") as node 7."""
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "default"}},
        "2": {"class_type": "LoraRarTestConditioning", "inputs": {"model": ["1", 0], "seed": 1, "tokens": 8, "batch": 1}},
        "3": {"class_type": "LoraRarTestConditioning", "inputs": {"model": ["1", 0], "seed": 2, "tokens": 8, "batch": 1}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd3"}},
        "6": sampler,
        "7": {"class_type": "LoraRarHypernetLoader", "inputs": {"hypernet": "auto", "model": ["1", 0]}},
    }
    sampler["inputs"].update(model=["1", 0], latent_image=["4", 0], seed=3, steps=2, cfg=1.0, sampler_name="euler",
                             scheduler="simple", denoise=1.0)
    return graph


def stock_graph() -> dict:
    graph = dit_graph({"class_type": "KSampler", "inputs": {"positive": ["2", 0], "negative": ["3", 0]}})
    graph["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["5", 0]}}  # no hypernet here
    graph["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "dit_stock"}}
    return graph


def compare_graph(methods: str = "all") -> dict:
    graph = dit_graph({"class_type": "LoraRarCompare", "inputs": {
        "vae": ["5", 0], "subject_lora": SUBJECT, "style_lora": STYLE, "positive": "", "negative": "",
        "methods": methods, "layer_policy": "sum", "positive_conditioning": ["2", 0],
        "negative_conditioning": ["3", 0], "hypernet": ["7", 0]}})  # connected as a user would: no SD3 hypernet
    graph["8"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 1], "filename_prefix": "dit_columns"}}
    graph["9"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "dit_grid"}}
    graph["10"] = {"class_type": "PreviewAny", "inputs": {"source": ["6", 3]}}
    return graph


def images_of(server, entry: dict, node: str) -> list[np.ndarray]:
    files = server.output_files({"outputs": {node: entry["outputs"][node]}})
    return [np.asarray(Image.open(path).convert("RGB")) for path in sorted(files)]


def column_name(label: str) -> str:
    """"k-lora alpha=1.5 beta=1.275" -> "k-lora": a label is its column's name, then the parameters (name=value)."""
    return " ".join(word for word in label.split() if "=" not in word)


def error_of(entry: dict) -> str:
    return " ".join(m[1].get("exception_message", "") for m in entry["status"]["messages"] if m[0] == "execution_error")


def test_the_test_node_and_taesd3_run_a_stock_dit_graph(dit_server):
    """The harness alone: the custom_nodes entry loads the test node, stock nodes sample and decode 16 channels."""
    info = dit_server.object_info("VAELoader")["VAELoader"]["input"]["required"]["vae_name"][0]
    assert "taesd3" in info
    entry = dit_server.wait(dit_server.queue_prompt(stock_graph()), timeout=120)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    (image,) = images_of(dit_server, entry, "8")
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0


@pytest.fixture(scope="module")
def compared(dit_server):
    entry = dit_server.wait(dit_server.queue_prompt(compare_graph()), timeout=180)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    (report,) = entry["outputs"]["10"]["text"]
    return entry, report


def test_every_column_runs_or_is_a_tile_naming_the_family(compared):
    _, report = compared
    header, *lines = report.splitlines()
    assert "conditioning: the connected positive/negative conditioning" in header
    columns = {column_name(line.split(":")[0]): line for line in lines if not line.startswith(" ")}
    assert sorted(columns) == sorted(RUNS + REFUSES), report
    for name in RUNS:
        assert "did not run" not in columns[name], report
    for name in REFUSES:
        assert "did not run" in columns[name] and FAMILY in columns[name], columns[name]


def test_the_columns_images_are_finite_and_differ_where_the_loras_do(dit_server, compared):
    entry, _ = compared
    assert "invalid value encountered" not in dit_server.log_text()  # numpy's warning when SaveImage casts a NaN
    images = images_of(dit_server, entry, "8")
    assert len(images) == len(RUNS) and all(image.shape == (SIZE, SIZE, 3) for image in images)
    by_column = dict(zip(RUNS, images))
    for name in RUNS[1:]:  # every LoRA column against no LoRA, and the two LoRAs against each other
        assert not np.array_equal(by_column[name], by_column["no LoRA"]), name
    assert not np.array_equal(by_column["subject only"], by_column["style only"])
    assert not np.array_equal(by_column["subject only"], by_column["direct"])
    (grid,) = images_of(dit_server, entry, "9")
    assert grid.shape[0] >= 256 and grid.shape[1] >= 3 * 256  # nine tiles of at least 256 px
