"""A training dataset: the layout devkit/training_data.py writes (the same bytes for the same seed), and
check-dataset's verdict on it: every defect reported in one line naming the file, through ``check_dataset`` and
``python -m hypernet check-dataset`` (no ComfyUI needed), hostile images and captions included."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from devkit.loras import SD15, random_lora, write_lora
from devkit.training_data import build_dataset, sd15_layout
from hypernet.cli import main
from hypernet.training.dataset import check_dataset, load_dataset
from hypernet.errors import LoraRarError


def make_dataset(root: Path) -> Path:
    """devkit's synthetic dataset for the synthetic KOALA-class layout: subjects 0-1 x styles 0-1 train, 2 x 2 held out."""
    from devkit import synthetic_models
    from devkit.training_data import build_dataset
    from hypernet.base_models import UNetLayout

    return build_dataset(root, UNetLayout.from_unet_config("synthetic", dict(synthetic_models.UNET_CONFIG)), std=0.1)

@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("clean") / "data")


@pytest.fixture
def data(clean, tmp_path):
    return shutil.copytree(clean, tmp_path / "data")


def _split(data, change):
    split = json.loads((data / "split.json").read_text())
    change(split)
    (data / "split.json").write_text(json.dumps(split))


def test_a_clean_dataset_has_no_problem_and_gives_its_pairs(clean):
    assert check_dataset(clean) == []
    dataset = load_dataset(clean)
    assert dataset.pairs("train") == [("subject_0", "style_0"), ("subject_0", "style_1"), ("subject_1", "style_0"), ("subject_1", "style_1")]
    assert dataset.pairs("validation") == [("subject_2", "style_2")]
    assert dataset.entry("subjects", "subject_0").caption == "a photo of sks0 square" and len(dataset.entry("styles", "style_2").images) == 2


DEFECTS = {
    "missing LoRA": (lambda d: (d / "subjects/subject_0/lora.safetensors").unlink(), "subjects/subject_0/lora.safetensors", "missing"),
    "extra LoRA": (lambda d: shutil.copy(d / "styles/style_1/lora.safetensors", d / "styles/style_1/v2.safetensors"),
                   "styles/style_1/v2.safetensors", "extra LoRA"),
    "unreadable LoRA": (lambda d: (d / "styles/style_2/lora.safetensors").write_bytes(b"not a safetensors file"),
                        "styles/style_2/lora.safetensors", ""),
    "non-finite LoRA": (lambda d: save_file({k: v.fill_(float("nan")) if i == 0 else v for i, (k, v) in enumerate(
                            random_lora(SD15, rank=2, seed=3).items())}, str(d / "subjects/subject_1/lora.safetensors")),
                        "subjects/subject_1/lora.safetensors", "NaN"),
    "no attention layer": (lambda d: save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 2),
                                                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 768)},
                                               str(d / "subjects/subject_2/lora.safetensors")),
                           "subjects/subject_2/lora.safetensors", "no attention layer"),
    "undecodable image": (lambda d: (d / "subjects/subject_0/images/0.png").write_bytes(b"\x89PNG broken"),
                          "subjects/subject_0/images/0.png", "not a decodable image"),
    "no image": (lambda d: shutil.rmtree(d / "styles/style_1/images"), "styles/style_1/images", "no training image"),
    "empty caption": (lambda d: (d / "styles/style_0/caption.txt").write_text("  \n"), "styles/style_0/caption.txt", "empty"),
    "name not found": (lambda d: _split(d, lambda s: s["train"]["subjects"].append("ghost")), "subjects/ghost", "folder is missing"),
    "folder not in split": (lambda d: shutil.copytree(d / "subjects/subject_0", d / "subjects/stray"), "subjects/stray", "not in split.json"),
    "overlapping split": (lambda d: _split(d, lambda s: s["validation"]["styles"].append("style_1")), "split.json", "both train and validation"),
    "empty train set": (lambda d: (_split(d, lambda s: s["train"].update(styles=[], subjects=["subject_0", "subject_1"])),
                                   shutil.rmtree(d / "styles/style_0"), shutil.rmtree(d / "styles/style_1")),
                        "split.json", "train.styles is empty"),
    "another model's widths": (lambda d: write_lora(d / "styles/style_2/lora.safetensors", random_lora(
                                   SD15, rank=2, seed=4, modules=[m for m, w, _ in SD15.attention_linears() if w == 320])),
                               "styles/style_2/lora.safetensors", "another base model"),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_defect_is_one_line_naming_the_file(data, defect):
    make, where, what = DEFECTS[defect]
    make(data)
    problems = check_dataset(data)
    assert len(problems) == 1, problems
    assert str(data / where) in problems[0] and what in problems[0] and "\n" not in problems[0]
    with pytest.raises(LoraRarError, match="^" + str(data / where).replace(".", r"\.")):
        load_dataset(data)


def test_a_split_file_nested_too_deeply_is_a_problem_not_a_traceback(data, capsys):
    """JSON nested deeper than the decoder recurses raised RecursionError out of check-dataset and train."""
    (data / "split.json").write_text("[" * 100_000 + "]" * 100_000)
    problems = check_dataset(data)
    assert f"{data / 'split.json'}: not readable JSON (nested too deeply)" in problems
    assert main(["check-dataset", str(data)]) == 1
    assert "split.json: not readable JSON (nested too deeply)" in capsys.readouterr().out


def test_the_command_prints_the_problems_and_fails(data, capsys):
    (data / "subjects/subject_0/caption.txt").unlink()
    (data / "styles/style_1/lora.safetensors").unlink()
    assert main(["check-dataset", str(data)]) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and "caption.txt" in out and "style_1/lora.safetensors" in out
    assert "2 problem(s)" in err


def test_the_command_passes_a_clean_dataset(clean, capsys):
    assert main(["check-dataset", str(clean)]) == 0
    assert "ready for training" in capsys.readouterr().err


def test_train_refuses_an_existing_out_before_loading_anything(clean, tmp_path, capsys):
    out = tmp_path / "net.safetensors"
    out.write_bytes(b"x")
    code = main(["train", "--dataset", str(clean), "--base", str(tmp_path / "none.safetensors"), "--out", str(out),
                 "--comfy", str(tmp_path)])
    assert code == 2 and "file exists; pass --overwrite" in capsys.readouterr().err
    (tmp_path / "net.safetensors.training").mkdir()
    (tmp_path / "net.safetensors.training" / "state.pt").write_bytes(b"x")
    out.unlink()
    assert main(["train", "--dataset", str(clean), "--base", "b", "--out", str(out), "--comfy", str(tmp_path)]) == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err


# --- the dataset devkit writes

def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_split_and_captions(tmp_path):
    root = build_dataset(tmp_path / "data", subjects=3, styles=2, images=2, image_size=32)
    split = json.loads((root / "split.json").read_text())
    assert split == {"train": {"subjects": ["subject_0", "subject_1"], "styles": ["style_0"]},
                     "validation": {"subjects": ["subject_2"], "styles": ["style_1"]}}
    expected_modules = {m for m, _, _ in sd15_layout().attention_linears()}
    for kind, names in (("subjects", ["subject_0", "subject_1", "subject_2"]), ("styles", ["style_0", "style_1"])):
        for name in names:
            folder = root / kind / name
            caption = (folder / "caption.txt").read_text()
            assert caption.endswith("\n") and caption.count("\n") == 1 and len(caption) > 5
            pictures = sorted((folder / "images").glob("*.png"))
            assert len(pictures) == 2
            assert {Image.open(p).size for p in pictures} == {(32, 32)}
            lora = load_file(str(folder / "lora.safetensors"))
            stems = {k.split(".")[0] for k in lora}
            assert stems == {"lora_unet_" + m.replace(".", "_") for m in expected_modules}
    captions = {(root / k / n / "caption.txt").read_text() for k in ("subjects", "styles")
                for n in [p.name for p in (root / k).iterdir()]}
    assert len(captions) == 5  # each LoRA its own prompt


def test_same_seed_same_bytes_other_seed_other_loras(tmp_path):
    first = _tree(build_dataset(tmp_path / "a", subjects=2, styles=2, images=1, image_size=16, seed=3))
    again = _tree(build_dataset(tmp_path / "b", subjects=2, styles=2, images=1, image_size=16, seed=3))
    other = _tree(build_dataset(tmp_path / "c", subjects=2, styles=2, images=1, image_size=16, seed=4))
    assert first == again
    lora = "subjects/subject_0/lora.safetensors"
    assert first[lora] != other[lora]
    # subjects and styles differ from each other too
    assert first["subjects/subject_0/lora.safetensors"] != first["styles/style_0/lora.safetensors"]


@pytest.mark.parametrize("subjects,held_out", [(1, 1), (3, 0), (2, 2)])
def test_a_split_without_training_or_validation_entries_is_refused(tmp_path, subjects, held_out):
    with pytest.raises(ValueError, match="subjects"):
        build_dataset(tmp_path / "d", subjects=subjects, styles=2, validation_subjects=held_out)


# --- hostile images and captions

def test_a_decompression_bomb_image_is_one_problem_line(tmp_path, monkeypatch):
    root = build_dataset(tmp_path / "data", subjects=2, styles=2, images=1, image_size=16)
    image = root / "subjects" / "subject_0" / "images" / "00.png"
    Image.new("RGB", (64, 64)).save(image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice the limit: PIL's "bomb" error
    problems = check_dataset(root)
    assert len(problems) == 1 and problems[0].startswith(f"{image}: not a decodable image"), problems


def test_a_runaway_caption_is_one_problem_line(tmp_path):
    root = build_dataset(tmp_path / "data", subjects=2, styles=2, images=1, image_size=16)
    caption = root / "styles" / "style_0" / "caption.txt"
    caption.write_text("tag, " * 200_000)  # 1 MB on one line
    problems = check_dataset(root)
    assert len(problems) == 1 and problems[0].startswith(f"{caption}: caption of 999999 characters"), problems


def test_a_16_bit_greyscale_image_keeps_its_brightness(tmp_path):
    import numpy as np

    from hypernet.training.dataset import read_rgb

    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(path)  # 50 % grey in 16 bits
    with Image.open(path) as handle:
        assert handle.mode.startswith("I;16")
    assert read_rgb(path).getpixel((0, 0)) == (128, 128, 128)  # PIL's convert("RGB") gives (255, 255, 255)
