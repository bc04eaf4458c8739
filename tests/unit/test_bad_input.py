"""Bad and hostile merge input, at library level: every one refused with one line naming the file (and layer),
never a traceback or a half-written file, or converted on purpose and reported; nothing non-finite is returned.
The same cases through the command line are in test_merge_cli.py, through a real server in
tests/e2e/test_bad_input.py; the file targets (names, folders, inputs never replaced) in test_files.py."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from hypernet.base_models import SDXL
from hypernet.errors import LoraRarError
from hypernet.files import read_state_dict
from hypernet.lora_io import LowRankLayer, read_lora, save_lora
from hypernet.merge import Strengths, merge_loras
from hypernet.model import LoraRarHypernet
from devkit.loras import SD15, random_lora, write_lora
from devkit.weights import hypernet_file

Q_MODULE = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"  # Q as a module name


def one_line(error: LoraRarError) -> str:
    text = str(error)
    assert "\n" not in text
    return text


@pytest.fixture
def good(tmp_path):
    return write_lora(tmp_path / "good.safetensors", random_lora(rank=4, seed=1, modules=[Q_MODULE]))


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
    state_dict = random_lora(rank=4, seed=2, modules=[Q_MODULE])
    next(iter(state_dict.values()))[0, 0] = value
    path = write_lora(tmp_path / "nan.safetensors", state_dict)
    with pytest.raises(LoraRarError, match="nan.safetensors: tensor .*to_q.* holds NaN or Inf"):
        read_lora(path)


def test_missing_factor_and_rank_mismatch(tmp_path):
    state_dict = random_lora(rank=4, seed=3, modules=[Q_MODULE])
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

# --- hostile layers, strengths and hypernets

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # 640 x 640 in SDXL
K2 = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # 640 x 2048


def factors(up, down, alpha=None, name=Q, **extra):
    state = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, **{f"{name}.{k}": v for k, v in extra.items()}}
    if alpha is not None:
        state[f"{name}.alpha"] = alpha
    return state


def write(tmp_path, file_name, state):
    path = tmp_path / file_name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def good_state(seed=0, rank=4, name=Q, d_in=640):
    generator = torch.Generator().manual_seed(seed)
    return factors(torch.randn(640, rank, generator=generator) * 0.02, torch.randn(rank, d_in, generator=generator) * 0.02, name=name)


def one_line_error(call) -> str:
    with pytest.raises(LoraRarError) as error:
        call()
    text = str(error.value)
    assert "\n" not in text and "\r" not in text
    return text


@pytest.fixture(scope="module")
def hypernet(shared_weights):
    return LoraRarHypernet.load(shared_weights / hypernet_file("sdxl"))


BROKEN = {
    "rank0": (factors(torch.zeros(640, 0), torch.zeros(0, 640)), "empty factors"),
    "rank0_alpha": (factors(torch.zeros(640, 0), torch.zeros(0, 640), torch.tensor(8.0)), "empty factors"),
    "d_in0": (factors(torch.zeros(640, 4), torch.zeros(4, 0)), "empty factors"),
    "alpha_vector": (factors(torch.ones(640, 4), torch.ones(4, 640), torch.ones(4)), "alpha must be one number"),
    "alpha_nan": (factors(torch.ones(640, 4), torch.ones(4, 640), torch.tensor(float("nan"))), "NaN or Inf"),
    "alpha_complex": (factors(torch.ones(640, 4), torch.ones(4, 640), torch.ones(1, dtype=torch.complex64)), "complex64"),
    "int8": (factors(torch.ones(640, 4, dtype=torch.int8), torch.ones(4, 640, dtype=torch.int8)), "is int8"),
    "uint8": (factors(torch.ones(640, 4, dtype=torch.uint8), torch.ones(4, 640, dtype=torch.uint8)), "is uint8"),
    "bool": (factors(torch.ones(640, 4, dtype=torch.bool), torch.ones(4, 640, dtype=torch.bool)), "is bool"),
    "complex": (factors(torch.ones(640, 4, dtype=torch.complex64), torch.ones(4, 640, dtype=torch.complex64)), "is complex64"),
    "up_1d": (factors(torch.ones(640), torch.ones(4, 640)), "expected (out, rank)"),
    "up_3d": (factors(torch.ones(640, 4, 1), torch.ones(4, 640)), "expected (out, rank)"),
    "down_5d": (factors(torch.ones(640, 4), torch.ones(4, 640, 1, 1, 1)), "expected (out, rank)"),
    "scalar": (factors(torch.tensor(1.0), torch.tensor(1.0)), "expected (out, rank)"),
    "bias_size": (factors(torch.ones(640, 4), torch.ones(4, 640), diff_b=torch.ones(3)), "bias difference has 3 values"),
    "fp8_nan": (factors(torch.full((640, 4), float("nan")).to(torch.float8_e5m2), torch.ones(4, 640)), "NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_malformed_layer_is_one_line_naming_file_and_layer(tmp_path, case):
    state, expected = BROKEN[case]
    path = write(tmp_path, f"{case}.safetensors", state)
    text = one_line_error(lambda: read_lora(path))
    assert str(path) in text and "attn1_to_q" in text and expected in text


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_factors_are_widened_exactly_and_reported(tmp_path, hypernet, dtype):
    fp8 = {k: v.to(dtype) for k, v in good_state(seed=1).items()}
    widened = {k: v.float() for k, v in fp8.items()}
    subject = read_lora(write(tmp_path, "subject.safetensors", good_state(seed=2)))
    as_fp8 = merge_loras(subject, read_lora(write(tmp_path, "fp8.safetensors", fp8)), hypernet)
    as_fp32 = merge_loras(subject, read_lora(write(tmp_path, "fp32.safetensors", widened)), hypernet)
    torch.testing.assert_close(as_fp8.layers[Q].down, as_fp32.layers[Q].down, rtol=0, atol=0)
    dtype_name = str(dtype).removeprefix("torch.")
    assert f"style LoRA: {dtype_name} factors of 1 layers widened to float32 (exact)" in as_fp8.report.to_text()
    assert as_fp8.report.as_dict()["notes"] and "notes" not in as_fp32.report.as_dict()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30, 10.5, -11.0])
def test_strengths_must_be_finite_and_in_range(value):
    for position in range(4):
        values = [1.0] * 4
        values[position] = value
        text = one_line_error(lambda: Strengths(*values))
        assert "strength" in text and "between -10 and 10" in text
    Strengths(10.0, -10.0, 0.0, 1.0)  # the ends of the range are allowed


@pytest.mark.parametrize("method", ["lorarar", "direct"])
def test_merged_layer_that_overflows_is_an_error_naming_layer_and_files(tmp_path, hypernet, method):
    subject = read_lora(write(tmp_path, "subject.safetensors", good_state(seed=3)))
    huge = factors(torch.ones(640, 4), torch.full((4, 640), 10.0), torch.tensor(3e38))  # finite; alpha / rank * up @ down is not
    style = read_lora(write(tmp_path, "huge_alpha.safetensors", huge))
    text = one_line_error(lambda: merge_loras(subject, style, hypernet, method=method))
    assert Q in text and "subject.safetensors" in text and "huge_alpha.safetensors" in text and "overflows" in text


def test_large_but_finite_updates_still_merge(tmp_path, hypernet):
    """The overflow bound is not a magnitude limit: fp16-max factors (6e4) merge and stay finite."""
    big = {k: torch.full_like(v, 60000.0).half() for k, v in good_state(seed=5).items()}
    merged = merge_loras(read_lora(write(tmp_path, "a.safetensors", big)), read_lora(write(tmp_path, "b.safetensors", big)),
                         hypernet, method="direct")
    layer = merged.layers[Q]
    assert torch.isfinite(layer.up).all() and torch.isfinite(layer.down).all()


def test_kernel_mismatch_between_the_two_loras(tmp_path, hypernet):
    generator = torch.Generator().manual_seed(6)
    conv = factors(torch.randn(640, 4, 1, 1, generator=generator), torch.randn(4, 64, 3, 3, generator=generator))
    linear = factors(torch.randn(640, 4, generator=generator), torch.randn(4, 576, generator=generator))
    conv_lora = read_lora(write(tmp_path, "conv.safetensors", conv))
    linear_lora = read_lora(write(tmp_path, "linear.safetensors", linear))
    text = one_line_error(lambda: merge_loras(conv_lora, linear_lora, hypernet, method="direct"))
    assert Q in text and "conv.safetensors" in text and "linear.safetensors" in text and "(3, 3)" in text
    one_by_one = read_lora(write(tmp_path, "one.safetensors", factors(torch.ones(640, 4, 1, 1), torch.ones(4, 576, 1, 1))))
    merge_loras(one_by_one, linear_lora, hypernet, method="direct")  # a 1x1 conv and a linear layer are the same update


def test_hypernet_with_odd_or_empty_input_names_the_file(tmp_path, shared_weights):
    state = read_state_dict(shared_weights / hypernet_file("sdxl"), "LoRA.rar hypernet")
    odd = dict(state, **{"input_1.weight": torch.zeros(128, 1281)})
    torch.save(odd, tmp_path / "odd.pth")
    text = one_line_error(lambda: LoraRarHypernet.load(tmp_path / "odd.pth"))
    assert "odd.pth" in text and "1281" in text
    ints = {k: v.to(torch.int32) for k, v in state.items()}
    torch.save(ints, tmp_path / "ints.pth")
    text = one_line_error(lambda: LoraRarHypernet.load(tmp_path / "ints.pth"))
    assert "ints.pth" in text and "int32" in text


# --- the model-fit rule the merge node applies before patching (shapes of ComfyUI's own weights)


def layer(d_out, d_in, rank=4, kernel=(), bias=False):
    return LowRankLayer(up=torch.ones(d_out, rank), down=torch.ones(rank, d_in), kernel=kernel,
                        bias=torch.zeros(d_out) if bias else None)


@pytest.mark.parametrize("update, weight, fits", [
    (layer(640, 640), (640, 640), True),
    (layer(640, 640, kernel=(1, 1)), (640, 640), True),  # 1x1 conv factors on a linear layer: ComfyUI applies them
    (layer(640, 5760, kernel=(3, 3)), (640, 640), False),  # a 3x3 conv factor on a linear projection
    (layer(640, 576, kernel=(3, 3)), (640, 64, 3, 3), True),
    (layer(640, 576), (640, 64, 3, 3), True),  # flattened conv factors: ComfyUI flattens the same way
    (layer(640, 576, kernel=(1, 1)), (640, 64, 3, 3), True),
    (layer(640, 64 * 9, kernel=(9, 1)), (640, 64, 3, 3), False),
    (layer(2048, 640), (640, 2048), False),  # transposed: same element count, ComfyUI would reshape it scrambled
    (layer(1280, 1280), (640, 640), False),  # a LoRA for a wider model
    (layer(640, 1), (640,), True),  # a norm weight
])
def test_update_fits_the_model_weight_only_when_comfyui_applies_it_as_meant(update, weight, fits):
    assert (update.misfit(weight, None) is None) == fits


def test_bias_difference_needs_a_model_bias_of_its_size():
    assert "no bias" in layer(640, 640, bias=True).misfit((640, 640), None)
    assert "(320,)" in layer(640, 640, bias=True).misfit((640, 640), (320,))
    assert layer(640, 640, bias=True).misfit((640, 640), (640,)) is None
