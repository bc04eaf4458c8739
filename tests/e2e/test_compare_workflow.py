"""The method-comparison example workflow on a real server: every column sampled, labelled and ranked by a judge."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import STYLE, SUBJECT
from tests.support.fake_judge import FakeJudge
from devkit.synthetic_models import CHECKPOINT_NAME
from devkit.workflows import ui_to_api

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "example_workflows" / "lorarar_compare_methods.json"
REFERENCES = {"lorarar_subject_1.png": (200, 60, 60), "lorarar_style_1.png": (60, 60, 200)}
# b-lora has no published block split for the synthetic (KOALA-700M) layout: it must come back as a tile
# k-lora, est-lora: sampling time (their MODEL switches layers per step), so the grid also checks that path end to end
# ssr-merge: calibrated through the server's model on the example's two CLIP Text Encode nodes (each LoRA's own prompt)
METHODS = "subject only, style only, direct, k-lora, est-lora, np-lora, b-lora, lorarar, ssr-merge"
# est-lora at beta 1.45: at its default 1.275 this pair's subject (rank 8, twice the style's energy) wins every layer
# at both steps (p = 0 and 0.5), so its image would be "subject only"'s; at 1.45, 52 of 56 layers take the style at p = 0
EST_BETA = 1.45
PIXELS = 32  # the grid's latent size: ssr-merge's calibration step at the same size
COLUMNS = ["subject only", "style only", "direct", "k-lora alpha=1.5 beta=1.275", f"est-lora alpha=1.5 beta={EST_BETA}",
           "np-lora mu=0.5", "b-lora", "lorarar", f"ssr-merge ridge=0.0001 calibration_px={PIXELS}"]  # labels, in order
RAN = [label for label in COLUMNS if label != "b-lora"]
# per image in RAN's order: (subject answer, style answer); one reference of each, so one answer decides each test
ANSWERS = [("yes", "no"), ("no", "yes"), ("no", "no"), ("no", "no"), ("no", "no"), ("no", "no"), ("yes", "yes"),
           ("yes", "no")]
RANKING = [(1, "lorarar", 100, 100, 100), (2, "subject only", 100, 0, 0),
           (2, f"ssr-merge ridge=0.0001 calibration_px={PIXELS}", 100, 0, 0), (4, "style only", 0, 100, 0),
           (5, "direct", 0, 0, 0), (5, "k-lora alpha=1.5 beta=1.275", 0, 0, 0),
           (5, f"est-lora alpha=1.5 beta={EST_BETA}", 0, 0, 0), (5, "np-lora mu=0.5", 0, 0, 0)]  # equal scores share a rank, in column order
SAVED, TABLE = "90", "91"  # nodes the test adds: a SaveImage of the compare node's images, a PreviewAny of the table


def node_of(prompt: dict, kind: str) -> str:
    (key,) = [key for key, node in prompt.items() if node["class_type"] == kind]
    return key


def for_this_machine(prompt: dict, methods: str, judge_url: str = "") -> dict:
    """The synthetic model and test LoRAs, 32 x 32 px, 2 steps, cfg 1 (one model call per step): the synthetic UNet's
    weights are full width, so its cost grows with the pixels; the images and the judge's table made readable."""
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT_NAME
        elif kind == "EmptyLatentImage":
            inputs.update(width=32, height=32)
        elif kind == "LoraRarCompare":
            inputs.update(subject_lora=SUBJECT, style_lora=STYLE, steps=2, cfg=1.0, sampler_name="euler",
                          scheduler="normal", methods=methods, est_lora_beta=EST_BETA,
                          ssr_merge_calibration_px=float(PIXELS))
        elif kind == "LoraRarEvaluate":
            inputs["judge_url"] = judge_url
    prompt[SAVED] = {"class_type": "SaveImage",
                     "inputs": {"images": [node_of(prompt, "LoraRarCompare"), 1], "filename_prefix": "compare"}}
    if judge_url:
        prompt[TABLE] = {"class_type": "PreviewAny", "inputs": {"source": [node_of(prompt, "LoraRarEvaluate"), 3]}}
    return prompt


def without_judge(prompt: dict) -> dict:
    """The comparison alone: the evaluation node, the reference images and what shows the judge's outputs left out."""
    judged = {key for key, node in prompt.items() if node["class_type"] in ("LoraRarEvaluate", "LoadImage")}
    judged |= {key for key, node in prompt.items()
               if any(isinstance(v, list) and v and v[0] in judged for v in node["inputs"].values())}
    return {key: node for key, node in prompt.items() if key not in judged}


def texts(entry: dict, node: str | None = None) -> list[str]:
    outputs = [entry["outputs"].get(node, {})] if node else entry["outputs"].values()
    return [text for output in outputs for text in output.get("text", [])]


def images_of(server, entry: dict, node: str) -> list[np.ndarray]:
    files = server.output_files({"outputs": {node: entry["outputs"][node]}})
    return [np.asarray(Image.open(path).convert("RGB")) for path in sorted(files)]


def execution_error(entry: dict) -> str:
    return " ".join(m[1].get("exception_message", "") for m in entry["status"]["messages"] if m[0] == "execution_error")


@pytest.fixture(scope="module")
def compare_prompt(pack_server):
    server, _ = pack_server
    for name, colour in REFERENCES.items():
        Image.new("RGB", (96, 96), colour).save(server.input_dir / name)
    return ui_to_api(json.loads(WORKFLOW.read_text()), server.object_info())


@pytest.fixture(scope="module")
def judged(pack_server, compare_prompt):
    """(history entry, prompt, questions asked) of the example workflow with METHODS and the scripted judge."""
    server, _ = pack_server
    script = [answer for pair in ANSWERS for answer in pair]
    with FakeJudge(script, default="no") as judge:
        prompt = for_this_machine(json.loads(json.dumps(compare_prompt)), METHODS, judge.base_url)
        entry = server.wait(server.queue_prompt(prompt), timeout=300)
        asked = len(judge.requests)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    return entry, prompt, asked


def test_every_method_and_baseline_is_a_column_and_a_failing_one_a_labelled_tile(pack_server, judged):
    server, _ = pack_server
    entry, prompt, _ = judged
    (report,) = [t for t in texts(entry) if t.startswith("LoRA.rar compare")]
    columns = [line for line in report.splitlines()[1:] if not line.startswith(" ")]
    assert [line.split(":")[0] for line in columns] == COLUMNS
    (failed,) = [line for line in columns if "did not run" in line]
    assert failed.startswith("b-lora: did not run: b-lora: no published content/style block split for KOALA_700M")

    images = images_of(server, entry, SAVED)
    assert len(images) == len(RAN) and all(image.shape == (32, 32, 3) for image in images)
    assert all(not np.array_equal(images[0], other) for other in images[1:])  # each column its own LoRA(s)

    grid_node = next(key for key, node in prompt.items() if node["class_type"] == "PreviewImage"
                     and node["inputs"]["images"][0] == node_of(prompt, "LoraRarCompare"))
    (grid,) = images_of(server, entry, grid_node)
    # eight columns of one image each and the failed one: a 3 x 3 grid of 256 px tiles, the failed column's tile grey
    assert grid.shape[1] >= 3 * 256 and grid.shape[0] >= 2 * 256
    assert (np.abs(grid.astype(int) - 230).max(axis=-1) <= 2).sum() > 0.5 * 256 * 256


def test_the_labels_follow_the_images_and_the_judge_ranks_what_it_approved(pack_server, compare_prompt, judged):
    server, _ = pack_server
    entry, prompt, asked = judged
    assert asked == 2 * len(RAN)  # one subject and one style question per image that ran
    (table,) = [json.loads(t) for t in texts(entry, TABLE)]
    assert [row["label"] for row in table["images"]] == RAN
    assert [(row["rank"], row["label"], row["subject_pct"], row["style_pct"], row["both_pct"])
            for row in table["ranking"]] == RANKING
    shown = next(key for key, node in prompt.items() if node["class_type"] == "PreviewAny"
                 and node["inputs"]["source"] == [node_of(prompt, "LoraRarEvaluate"), 5])
    (ranking,) = texts(entry, shown)
    assert [line.split()[:2] for line in ranking.splitlines()[1:]] == [[str(r[0]), r[1].split()[0]] for r in RANKING]


def test_interrupting_a_comparison_stops_it_and_the_next_prompt_runs(pack_server, compare_prompt, judged):
    """Every column ("all") queued, interrupted while it runs; then direct alone runs, and its image is the one the
    judged run labelled "direct" (same seed, same noise): the labels follow the images."""
    server, _ = pack_server
    prompt = without_judge(for_this_machine(json.loads(json.dumps(compare_prompt)), "all"))
    prompt[node_of(prompt, "LoraRarCompare")]["inputs"]["seed"] = 7  # not cached: the node must run again
    prompt_id = server.queue_prompt(prompt)
    stop = threading.Event()

    def interrupt_while_running():
        while not stop.is_set():
            queue = server.get("/queue")
            if any(item[1] == prompt_id for item in queue.get("queue_running", [])):
                server._request("POST", "/interrupt", {})
            time.sleep(0.3)

    worker = threading.Thread(target=interrupt_while_running, daemon=True)
    worker.start()
    try:
        entry = server.wait(prompt_id, timeout=300)
    finally:
        stop.set()
        worker.join()
    assert entry["status"]["status_str"] == "error"
    (interrupted,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"]
    assert interrupted["node_type"] == "LoraRarCompare", interrupted  # stopped inside the comparison

    after = without_judge(for_this_machine(json.loads(json.dumps(compare_prompt)), "direct"))
    entry = server.wait(server.queue_prompt(after), timeout=300)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    (direct,) = images_of(server, entry, SAVED)
    assert np.array_equal(direct, images_of(server, judged[0], SAVED)[RAN.index("direct")])
