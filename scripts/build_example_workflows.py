"""Writes example_workflows/*.json (UI format) from the node definitions a real ComfyUI server reports.

Run after changing a node's inputs:  .host/0.33.0/venv/bin/python scripts/build_example_workflows.py
Widget values are the defaults a user should start from (SDXL / KOALA-700M sampling settings).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devkit.comfy_server import ComfyServer  # noqa: E402
from devkit.workflows import build_ui_workflow  # noqa: E402

OUT = REPO / "example_workflows"
SUBJECT, STYLE = "my_subject_lora.safetensors", "my_style_lora.safetensors"


def merge_and_sample(checkpoint: str, steps: int, cfg: float, prompt: str, picture: bool = False) -> list[dict]:
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": [40, 120], "widgets": {"ckpt_name": checkpoint}},
        {"id": 2, "type": "LoraRarHypernetLoader", "pos": [40, 320], "widgets": {"hypernet": "auto"},
         "links": {"model": (1, 0)}},
        {"id": 3, "type": "LoraRarMerge", "pos": [420, 120], "size": [360, 330],
         "widgets": {"subject_lora": SUBJECT, "style_lora": STYLE},
         "links": {"model": (1, 0), "clip": (1, 1), "hypernet": (2, 0)}},
        {"id": 4, "type": "CLIPTextEncode", "pos": [840, 60], "size": [400, 160], "title": "Positive prompt",
         "widgets": {"text": prompt}, "links": {"clip": (3, 1)}},
        {"id": 5, "type": "CLIPTextEncode", "pos": [840, 260], "size": [400, 120], "title": "Negative prompt",
         "widgets": {"text": "low quality, blurry, deformed"}, "links": {"clip": (3, 1)}},
        {"id": 6, "type": "EmptyLatentImage", "pos": [840, 420], "widgets": {"width": 1024, "height": 1024}},
        {"id": 7, "type": "KSampler", "pos": [1290, 120], "size": [320, 270],
         "widgets": {"seed": 42, "steps": steps, "cfg": cfg, "sampler_name": "dpmpp_2m", "scheduler": "karras"},
         "links": {"model": (3, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)}},
        {"id": 8, "type": "VAEDecode", "pos": [1660, 120], "links": {"samples": (7, 0), "vae": (1, 2)}},
        {"id": 9, "type": "SaveImage", "pos": [1900, 120], "size": [400, 440],
         "widgets": {"filename_prefix": "lorarar/merged"}, "links": {"images": (8, 0)}},
        {"id": 10, "type": "PreviewAny", "pos": [420, 500], "size": [400, 260], "title": "Merge report",
         "links": {"source": (3, 3)}},
    ]
    if picture:  # where the hypernet kept the subject and where the style, per UNet block
        nodes += [
            {"id": 11, "type": "LoraRarCoefficientPicture", "pos": [840, 600], "size": [320, 80],
             "links": {"merged_lora": (3, 2)}},
            {"id": 12, "type": "PreviewImage", "pos": [1290, 600], "size": [1000, 460], "title": "Coefficient picture",
             "links": {"images": (11, 0)}},
        ]
    return nodes


def merge_and_save() -> list[dict]:
    return [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": [40, 120], "widgets": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        {"id": 2, "type": "LoraRarHypernetLoader", "pos": [40, 320], "widgets": {"hypernet": "auto"},
         "links": {"model": (1, 0)}},
        {"id": 3, "type": "LoraRarMerge", "pos": [420, 120], "size": [360, 330],
         "widgets": {"subject_lora": SUBJECT, "style_lora": STYLE},
         "links": {"model": (1, 0), "clip": (1, 1), "hypernet": (2, 0)}},
        {"id": 4, "type": "LoraRarSaveMergedLora", "pos": [840, 120], "size": [360, 160],
         "widgets": {"file_name": "lorarar/merged_subject_style"}, "links": {"merged_lora": (3, 2)}},
        {"id": 5, "type": "PreviewAny", "pos": [840, 330], "size": [400, 260], "title": "Merge report",
         "links": {"source": (3, 3)}},
    ]


def compare_methods() -> list[dict]:
    """Every merge method and baseline on one seed into a labelled grid, ranked by the evaluation node."""
    return [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": [40, 120], "widgets": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        {"id": 2, "type": "LoraRarHypernetLoader", "pos": [40, 320], "widgets": {"hypernet": "auto"},
         "links": {"model": (1, 0)}},
        {"id": 3, "type": "EmptyLatentImage", "pos": [40, 480], "widgets": {"width": 1024, "height": 1024}},
        {"id": 4, "type": "LoraRarCompare", "pos": [420, 120], "size": [380, 560],
         "widgets": {"subject_lora": SUBJECT, "style_lora": STYLE, "seed": 42, "steps": 30, "cfg": 7.0,
                     "sampler_name": "dpmpp_2m", "scheduler": "karras"},
         "links": {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "latent_image": (3, 0), "hypernet": (2, 0),
                   "subject_conditioning": (12, 0), "style_conditioning": (13, 0)}},
        {"id": 12, "type": "CLIPTextEncode", "pos": [40, 640], "size": [340, 110], "title": "Subject LoRA's own prompt (ssr-merge)",
         "widgets": {"text": "a photo of sks dog"}, "links": {"clip": (1, 1)}},
        {"id": 13, "type": "CLIPTextEncode", "pos": [40, 790], "size": [340, 110], "title": "Style LoRA's own prompt (ssr-merge)",
         "widgets": {"text": "a watercolor painting"}, "links": {"clip": (1, 1)}},
        {"id": 5, "type": "PreviewImage", "pos": [860, 60], "size": [520, 560], "title": "Methods side by side",
         "links": {"images": (4, 0)}},
        {"id": 6, "type": "PreviewAny", "pos": [420, 740], "size": [380, 240], "title": "Compare report",
         "links": {"source": (4, 3)}},
        {"id": 7, "type": "LoadImage", "pos": [860, 680], "size": [300, 320], "title": "Subject reference photo",
         "widgets": {"image": "lorarar_subject_1.png"}},
        {"id": 8, "type": "LoadImage", "pos": [1180, 680], "size": [300, 320], "title": "Style reference image",
         "widgets": {"image": "lorarar_style_1.png"}},
        {"id": 9, "type": "LoraRarEvaluate", "pos": [1440, 60], "size": [380, 330],
         "links": {"images": (4, 1), "labels": (4, 2), "subject_references": (7, 0), "style_references": (8, 0)}},
        {"id": 10, "type": "PreviewAny", "pos": [1880, 60], "size": [460, 260], "title": "Ranking (both %, subject %, style %)",
         "links": {"source": (9, 5)}},
        {"id": 11, "type": "PreviewImage", "pos": [1880, 360], "size": [460, 520], "title": "Judged images",
         "links": {"images": (9, 4)}},
    ]


def ziplora_optimise() -> list[dict]:
    """ZipLoRA: the pair's merge optimised on reference images, then sampled and saved."""
    return [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": [40, 120], "widgets": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        {"id": 2, "type": "LoadImage", "pos": [40, 320], "size": [300, 320], "title": "Subject reference photo",
         "widgets": {"image": "lorarar_subject_1.png"}},
        {"id": 3, "type": "LoadImage", "pos": [40, 680], "size": [300, 320], "title": "Style reference image",
         "widgets": {"image": "lorarar_style_1.png"}},
        {"id": 4, "type": "LoraRarZipLora", "pos": [420, 120], "size": [380, 560],
         "widgets": {"subject_lora": SUBJECT, "style_lora": STYLE, "subject_prompt": "A photo of sks dog",
                     "style_prompt": "A painting in watercolor painting style"},
         "links": {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "subject_images": (2, 0), "style_images": (3, 0)}},
        {"id": 5, "type": "CLIPTextEncode", "pos": [860, 60], "size": [400, 160], "title": "Positive prompt",
         "widgets": {"text": "A photo of sks dog in watercolor painting style"}, "links": {"clip": (4, 1)}},
        {"id": 6, "type": "CLIPTextEncode", "pos": [860, 260], "size": [400, 120], "title": "Negative prompt",
         "widgets": {"text": "low quality, blurry, deformed"}, "links": {"clip": (4, 1)}},
        {"id": 7, "type": "EmptyLatentImage", "pos": [860, 420], "widgets": {"width": 1024, "height": 1024}},
        {"id": 8, "type": "KSampler", "pos": [1310, 120], "size": [320, 270],
         "widgets": {"seed": 42, "steps": 30, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"},
         "links": {"model": (4, 0), "positive": (5, 0), "negative": (6, 0), "latent_image": (7, 0)}},
        {"id": 9, "type": "VAEDecode", "pos": [1680, 120], "links": {"samples": (8, 0), "vae": (1, 2)}},
        {"id": 10, "type": "SaveImage", "pos": [1920, 120], "size": [400, 440],
         "widgets": {"filename_prefix": "lorarar/ziplora"}, "links": {"images": (9, 0)}},
        {"id": 11, "type": "LoraRarSaveMergedLora", "pos": [860, 600], "size": [360, 160],
         "widgets": {"file_name": "lorarar/ziplora_subject_style"}, "links": {"merged_lora": (4, 2)}},
        {"id": 12, "type": "PreviewAny", "pos": [420, 740], "size": [400, 260], "title": "ZipLoRA report",
         "links": {"source": (4, 3)}},
        {"id": 13, "type": "PreviewImage", "pos": [1310, 600], "size": [560, 300], "title": "Loss curve",
         "links": {"images": (4, 4)}},
    ]


WORKFLOWS = {
    "lorarar_sdxl_merge_and_sample": ("LoRA.rar: merge subject + style LoRAs, sample with SDXL",
                                      merge_and_sample("sd_xl_base_1.0.safetensors", 30, 7.0,
                                                       "A photo of sks dog in watercolor painting style",
                                                       picture=True)),
    "lorarar_merge_and_save_lora": ("LoRA.rar: merge subject + style LoRAs and save the merged LoRA", merge_and_save()),
    "lorarar_koala700m_merge_and_sample": ("LoRA.rar: merge subject + style LoRAs, sample with KOALA-700M",
                                           merge_and_sample("koala-700m.safetensors", 25, 5.0,
                                                            "A photo of sks dog in watercolor painting style")),
    "lorarar_compare_methods": ("LoRA.rar: every merge method side by side, ranked by an MLLM judge", compare_methods()),
    "lorarar_ziplora_optimise": ("LoRA.rar ZipLoRA: optimise one pair's merge on reference images, sample and save",
                                 ziplora_optimise()),
}


def main() -> int:
    with ComfyServer() as server:
        info = server.object_info()
    OUT.mkdir(exist_ok=True)
    for name, (title, nodes) in WORKFLOWS.items():
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(build_ui_workflow(nodes, info, title), indent=2) + "\n")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
