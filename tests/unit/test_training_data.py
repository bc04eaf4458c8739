"""devkit/training_data.py writes the documented dataset layout, the same bytes for the same seed."""

import json

import pytest
from PIL import Image
from safetensors.torch import load_file

from devkit.training_data import build_dataset, sd15_layout


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
