"""check-dataset: every defect of a training dataset reported in one line naming the file, through
``check_dataset`` and ``python -m hypernet check-dataset`` (no ComfyUI needed)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devkit.loras import SD15, random_lora, write_lora
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
