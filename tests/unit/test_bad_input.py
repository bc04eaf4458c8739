"""Bad input: a clear one-line error naming the file and the problem, never a traceback or a half-written file."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from hypernet.base_models import SDXL
from hypernet.errors import LoraRarError
from hypernet.files import read_state_dict
from hypernet.lora_io import read_lora, save_lora
from hypernet.merge import merge_loras
from hypernet.model import LoraRarHypernet
from devkit.loras import SD15, random_lora, write_lora
from devkit.weights import hypernet_file

Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"


def one_line(error: LoraRarError) -> str:
    text = str(error)
    assert "\n" not in text
    return text


@pytest.fixture
def good(tmp_path):
    return write_lora(tmp_path / "good.safetensors", random_lora(rank=4, seed=1, modules=[Q]))


def test_truncated_safetensors(tmp_path, good):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LoraRarError) as error:
        read_lora(bad)
    assert "truncated.safetensors" in one_line(error.value) and "cannot read" in str(error.value)


def test_corrupt_header(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(LoraRarError, match="garbage.safetensors: cannot read LoRA file"):
        read_lora(bad)


def test_file_that_is_not_a_lora(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(LoraRarError, match=r"checkpoint.safetensors: not a LoRA: none of its 1 tensors"):
        read_lora(path)


def test_empty_lora(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    with pytest.raises(LoraRarError, match="empty.safetensors: empty LoRA"):
        read_lora(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_tensors(tmp_path, value):
    state_dict = random_lora(rank=4, seed=2, modules=[Q])
    next(iter(state_dict.values()))[0, 0] = value
    path = write_lora(tmp_path / "nan.safetensors", state_dict)
    with pytest.raises(LoraRarError, match="nan.safetensors: tensor .*to_q.* holds NaN or Inf"):
        read_lora(path)


def test_missing_factor_and_rank_mismatch(tmp_path):
    state_dict = random_lora(rank=4, seed=3, modules=[Q])
    down_key = next(k for k in state_dict if k.endswith("lora_down.weight"))
    path = write_lora(tmp_path / "half.safetensors", {k: v for k, v in state_dict.items() if k != down_key})
    with pytest.raises(LoraRarError, match="half.safetensors: layer .*to_q has no down factor"):
        read_lora(path)
    state_dict[down_key] = torch.zeros(3, 640)
    path = write_lora(tmp_path / "ranks.safetensors", state_dict)
    with pytest.raises(LoraRarError, match="ranks.safetensors: layer .*up has rank 4 but down has rank 3"):
        read_lora(path)


def test_lora_for_another_base_model(tmp_path, shared_weights):
    hypernet = LoraRarHypernet.load(shared_weights / hypernet_file("sdxl"))
    sd15 = read_lora(write_lora(tmp_path / "sd15.safetensors", random_lora(SD15, rank=4, seed=4)))
    sdxl = read_lora(write_lora(tmp_path / "sdxl.safetensors", random_lora(SDXL, rank=4, seed=5)))
    with pytest.raises(LoraRarError) as error:
        merge_loras(sd15, sdxl, hypernet, layout=SDXL)
    assert "sd15.safetensors" in one_line(error.value) and "different base models" in str(error.value)
    other = read_lora(write_lora(tmp_path / "sd15_b.safetensors", random_lora(SD15, rank=4, seed=6)))
    with pytest.raises(LoraRarError, match=r"sd15.safetensors: cross-attention reads a 768-wide text context.*another base model"):
        merge_loras(sd15, other, hypernet, layout=SDXL)


def test_hypernet_of_the_wrong_shape(tmp_path, shared_weights):
    state = read_state_dict(shared_weights / hypernet_file("sdxl"), "LoRA.rar hypernet")
    state["output.1.weight"] = torch.zeros(2, 64)
    path = tmp_path / "wrong_shape.pth"
    torch.save(state, path)
    with pytest.raises(LoraRarError) as error:
        LoraRarHypernet.load(path)
    assert "wrong_shape.pth: hypernet tensors do not fit together" in one_line(error.value)


class NotWeights:
    def __reduce__(self):
        return (print, ("this pickle runs code when fully unpickled",))


def test_pickle_that_is_not_weights_only_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"input_1.weight": NotWeights()}, handle)
    with pytest.raises(LoraRarError) as error:
        LoraRarHypernet.load(path)
    assert "evil.pth" in one_line(error.value) and "weights_only" in str(error.value)
    lora = tmp_path / "evil_lora.pt"
    lora.write_bytes(path.read_bytes())
    with pytest.raises(LoraRarError, match="evil_lora.pt: cannot read LoRA file .*weights_only"):
        read_lora(lora)


def test_save_never_overwrites_and_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"user data")
    with pytest.raises(LoraRarError, match="out.safetensors: file exists"):
        save_lora(target, {"a": torch.zeros(2)}, {})
    assert target.read_bytes() == b"user data"
    with pytest.raises(Exception):
        save_lora(tmp_path / "bad.safetensors", {"a": "not a tensor"}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
