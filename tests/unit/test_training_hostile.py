"""Hostile input to the training command's torch-only parts: non-finite settings, a non-.safetensors --out, a
decompression-bomb image in a dataset, a checkpoint pickled to run code, and a run whose weights turn NaN."""

import os
import types

import pytest
import torch
from PIL import Image

from devkit.training_data import build_dataset
from hypernet.errors import LoraRarError
from hypernet.model import new_hypernet
from hypernet.training.dataset import check_dataset
from hypernet.training.output import refuse_existing
from hypernet.training.recipe import Recipe
from hypernet.training.state import STATE_FILE, load_checkpoint
from hypernet.training.trainer import Trainer


@pytest.mark.parametrize("setting", ["learning_rate", "weight_decay", "similarity_lambda", "grad_clip"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_settings_are_refused(setting, value):
    with pytest.raises(LoraRarError, match="must be a finite number"):
        Recipe(**{setting: value})


def test_out_of_another_suffix_is_refused_before_any_work(tmp_path):
    with pytest.raises(LoraRarError, match=r"net\.pt: the hypernet is written as \.safetensors"):
        refuse_existing(tmp_path / "net.pt", resume=False, overwrite=False)
    refuse_existing(tmp_path / "net.safetensors", resume=False, overwrite=False)  # the right suffix passes


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


def test_a_checkpoint_pickled_to_run_code_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": 1, "step": Payload()}, tmp_path / STATE_FILE)
    with pytest.raises(LoraRarError) as raised:
        load_checkpoint(tmp_path)
    text = str(raised.value)
    assert text.startswith(f"{tmp_path / STATE_FILE}: not a readable training checkpoint") and "\n" not in text
    assert "refused (only weights_only=True loads)" in text and "weights_only` set to `False`" not in text
    assert not marker.exists()


def test_a_truncated_checkpoint_is_one_line(tmp_path):
    torch.save({"format": 1, "hypernet": {"w": torch.zeros(1000)}}, tmp_path / STATE_FILE)
    data = (tmp_path / STATE_FILE).read_bytes()
    (tmp_path / STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraRarError, match="not a readable training checkpoint") as raised:
        load_checkpoint(tmp_path)
    assert len(str(raised.value)) < 400


def test_weights_turning_nan_stop_the_run_before_anything_is_written(tmp_path):
    net = new_hypernet([8, 16], hidden=4)
    task = types.SimpleNamespace(device=torch.device("cpu"))  # train_step below replaces the model side
    trainer = Trainer(net, task, [("a", "b")], [], Recipe(epochs=3, steps_per_pair=1), tmp_path / "run",
                      checkpoint_every=1, validate_every=0)

    def diverging_step():
        trainer.step += 1
        if trainer.step == 2:
            with torch.no_grad():
                net.output[1].weight.fill_(float("nan"))
        return {"total": 1.0, "subject": 0.5, "style": 0.5, "similarity": 0.0, "grad_norm": 1.0, "pairs": ["a+b"]}

    trainer.train_step = diverging_step
    with pytest.raises(LoraRarError, match=r"step 2: hypernet weights output\.1\.weight became NaN or Inf"):
        trainer.run()
    kept = load_checkpoint(tmp_path / "run")  # step 1's checkpoint, finite, is the one left
    assert kept.step == 1 and all(bool(torch.isfinite(v).all()) for v in kept.hypernet.values())
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 1


def test_a_16_bit_greyscale_image_keeps_its_brightness(tmp_path):
    import numpy as np

    from hypernet.training.dataset import read_rgb

    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(path)  # 50 % grey in 16 bits
    with Image.open(path) as handle:
        assert handle.mode.startswith("I;16")
    assert read_rgb(path).getpixel((0, 0)) == (128, 128, 128)  # PIL's convert("RGB") gives (255, 255, 255)
