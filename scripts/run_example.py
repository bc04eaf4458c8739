"""The main job: ComfyUI with this pack, running an example workflow headless on 127.0.0.1.

With no models configured it uses a built-in default: synthetic SDXL-family models and two random
LoRAs made on the spot (labelled SYNTHETIC in the log and the image file name; the pictures are noise,
the point is the whole path working). With your ComfyUI models folder it uses your checkpoint and LoRAs:

    LORARAR_MODELS_DIR=~/ComfyUI/models bash scripts/run_example.sh \
        --checkpoint sd_xl_base_1.0.safetensors --subject my_dog.safetensors --style watercolor.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hypernet.base_models import UNetLayout  # noqa: E402
from hypernet.checkpoints import env_weight_dirs  # noqa: E402
from devkit import synthetic_models  # noqa: E402
from devkit.comfy_server import ComfyServer  # noqa: E402
from devkit.loras import random_lora, write_lora  # noqa: E402
from devkit.weights import shared_weights_dir  # noqa: E402
from devkit.workflows import ui_to_api  # noqa: E402

SYNTHETIC_SUBJECT = "SYNTHETIC_subject_lora.safetensors"
SYNTHETIC_STYLE = "SYNTHETIC_style_lora.safetensors"


def log(message: str) -> None:
    print(f"[lorarar] {message}", flush=True)


def synthetic_loras(models: Path) -> Path:
    """Two random rank-8 LoRAs for the synthetic model: a kohya-format subject and a reference-code-format style."""
    folder = models / "loras"
    layout = UNetLayout.from_unet_config("synthetic", synthetic_models.UNET_CONFIG)
    for name, seed, fmt in ((SYNTHETIC_SUBJECT, 1, "kohya"), (SYNTHETIC_STYLE, 2, "reference")):
        if not (folder / name).is_file():
            write_lora(folder / name, random_lora(layout, rank=8, seed=seed, fmt=fmt, std=0.05))
    return folder


def set_widget(prompt: dict, class_type: str, **values) -> None:
    for node in prompt.values():
        if node["class_type"] == class_type:
            node["inputs"].update(values)


def hypernet_folders() -> list[str]:
    """Where hypernet files already are: $LORARAR_WEIGHTS_DIR, or a developer checkout's shared weights folder."""
    folders = [str(p) for p in env_weight_dirs()]
    shared = shared_weights_dir()
    if not folders and shared.is_dir():
        folders.append(str(shared))
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default=os.environ.get("LORARAR_MODELS_DIR"),
                        help="your ComfyUI models folder (env LORARAR_MODELS_DIR); default: synthetic models")
    parser.add_argument("--checkpoint", help="checkpoint file name in <models>/checkpoints")
    parser.add_argument("--subject", help="subject LoRA file name in <models>/loras")
    parser.add_argument("--style", help="style LoRA file name in <models>/loras")
    parser.add_argument("--workflow", default="lorarar_sdxl_merge_and_sample", help="example workflow name")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--once", action="store_true", help="stop the server after the workflow ran")
    parser.add_argument("--serve-seconds", type=float, metavar="N",
                        help="after the workflow ran, keep serving N seconds, then stop (default: until Ctrl-C)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "output")
    args = parser.parse_args(argv)
    if args.serve_seconds is not None and args.serve_seconds < 0:
        parser.error("--serve-seconds must be >= 0")

    folders = {"lorarar": hypernet_folders()} if hypernet_folders() else {}
    if args.models_dir:
        models = Path(args.models_dir).expanduser().resolve()
        if not models.is_dir():
            print(f"run_example.py: error: --models-dir / LORARAR_MODELS_DIR: no such folder: {models}",
                  file=sys.stderr)
            return 2
        log(f"using your models in {models}")
    else:
        log("no models configured (LORARAR_MODELS_DIR): using SYNTHETIC random-weight models; images will be noise")
        models = synthetic_models.ensure_models()
        folders["loras"] = [str(synthetic_loras(models))]

    workflow = json.loads((REPO / "example_workflows" / f"{args.workflow}.json").read_text())
    with ComfyServer(models, folders=folders, output_dir=args.output_dir, port=args.port) as server:
        log(f"ComfyUI {server.url} is up with the pack loaded (log: {server.log_path})")
        prompt = ui_to_api(workflow, server.object_info())
        if args.models_dir:
            if args.checkpoint:
                set_widget(prompt, "CheckpointLoaderSimple", ckpt_name=args.checkpoint)
            if args.subject:
                set_widget(prompt, "LoraRarMerge", subject_lora=args.subject)
            if args.style:
                set_widget(prompt, "LoraRarMerge", style_lora=args.style)
        else:
            set_widget(prompt, "CheckpointLoaderSimple", ckpt_name=synthetic_models.CHECKPOINT_NAME)
            set_widget(prompt, "LoraRarMerge", subject_lora=SYNTHETIC_SUBJECT, style_lora=SYNTHETIC_STYLE)
            set_widget(prompt, "EmptyLatentImage", width=256, height=256)
            set_widget(prompt, "KSampler", steps=4, sampler_name="euler", scheduler="normal")
            set_widget(prompt, "SaveImage", filename_prefix="lorarar_SYNTHETIC_demo")
            set_widget(prompt, "LoraRarSaveMergedLora", file_name="SYNTHETIC_merged", if_exists="overwrite")
        started = time.monotonic()
        entry = server.wait(server.queue_prompt(prompt), timeout=900)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            messages = [m[1].get("exception_message", "") for m in status.get("messages", []) if m[0] == "execution_error"]
            log(f"workflow failed: {' '.join(messages) or status}")
            return 1
        log(f"workflow {args.workflow} ran in {time.monotonic() - started:.1f} s")
        for node_output in entry.get("outputs", {}).values():
            for text in node_output.get("text", []):
                print(text)
        for image in server.output_files(entry):
            log(f"image: {image}")
        if args.once:
            return 0
        if args.serve_seconds is None:
            log(f"open {server.url} in a browser; load example_workflows/{args.workflow}.json. Ctrl-C stops.")
            deadline = None
        else:
            log(f"serving {server.url} for {args.serve_seconds:g} s; load example_workflows/{args.workflow}.json")
            deadline = time.monotonic() + args.serve_seconds
        try:
            while server.running and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.2 if deadline is not None else 1)
        except KeyboardInterrupt:
            log("Ctrl-C: stopping the server")
            return 0
        if not server.running:
            log(f"the ComfyUI server stopped by itself\n{server.log_tail(30)}")
            return 1
        log("serve time is over: stopping the server")
    return 0


if __name__ == "__main__":
    sys.exit(main())
