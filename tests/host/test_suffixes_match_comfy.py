"""Our LoRA suffix table (hypernet.keys.FACTOR_SUFFIXES and the other-adapter pattern) reads every tensor-key
form the way ComfyUI's own adapter loading does (comfy.lora.load_lora over comfy.weight_adapter's adapters,
with the key map comfy.lora.model_lora_keys_unet builds for a real ComfyUI model): the same keys, as the same
kind of adapter (a plain low-rank up @ down, or something else), with up and down the same way round."""

import logging
from pathlib import Path

import pytest
import torch

from hypernet.errors import LoraRarError
from hypernet.names import _OTHER_KINDS, FACTOR_SUFFIXES, split_key
from hypernet.lora_io import LowRankLayer, lora_from_tensors

pytestmark = pytest.mark.host

MODULE = "input_blocks.3.1.transformer_blocks.0.attn1.to_out.0"  # (640, 640) with a bias in the synthetic model
CANONICAL = "lora_unet_" + MODULE.replace(".", "_")
WEIGHT, BIAS = f"diffusion_model.{MODULE}.weight", f"diffusion_model.{MODULE}.bias"
PROCESSOR = "<processor stem>"  # replaced by the diffusers attention-processor stem ComfyUI's key map names
RANK, WIDTH = 4, 640


def _pair(up: str, down: str) -> dict[str, tuple[int, ...]]:
    return {up: (WIDTH, RANK), down: (RANK, WIDTH)}


KOHYA = _pair(".lora_up.weight", ".lora_down.weight")
PEFT = _pair(".lora_B.weight", ".lora_A.weight")
# case -> (stem, {suffix: shape}); every suffix and other-adapter kind our table knows appears at least once
CASES = {
    "kohya": (CANONICAL, {**KOHYA, ".alpha": ()}),
    "peft": (CANONICAL, PEFT),
    "peft_default": (CANONICAL, _pair(".lora_B.default.weight", ".lora_A.default.weight")),
    "diffusers": (CANONICAL, _pair(".lora.up.weight", ".lora.down.weight")),
    "processor": (PROCESSOR, _pair("_lora.up.weight", "_lora.down.weight")),
    "transformers": (CANONICAL, _pair(".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight")),
    "bias_difference": (CANONICAL, {**KOHYA, ".alpha": (), ".diff_b": (WIDTH,)}),
    "bias_difference_alone": (CANONICAL, {".diff_b": (WIDTH,)}),
    "peft_lora_bias": (CANONICAL, {**PEFT, ".lora_B.bias": (WIDTH,)}),
    "kohya_up_bias": (CANONICAL, {**KOHYA, ".lora_up.bias": (WIDTH,)}),
    "tucker_mid": (CANONICAL, {".lora_up.weight": (WIDTH, RANK, 1, 1), ".lora_mid.weight": (RANK, RANK, 1, 1),
                               ".lora_down.weight": (RANK, WIDTH, 1, 1)}),
    "dora": (CANONICAL, {**KOHYA, ".dora_scale": (WIDTH, 1)}),
    "peft_dora_magnitude": (CANONICAL, {**PEFT, ".lora_magnitude_vector.weight": (WIDTH,)}),
    "peft_dora_magnitude_bare": (CANONICAL, {**PEFT, ".lora_magnitude_vector": (WIDTH,)}),
    "loha": (CANONICAL, {".hada_w1_a": (WIDTH, RANK), ".hada_w1_b": (RANK, WIDTH), ".hada_w2_a": (WIDTH, RANK),
                         ".hada_w2_b": (RANK, WIDTH), ".alpha": ()}),
    "lokr": (CANONICAL, {".lokr_w1": (8, 8), ".lokr_w2": (80, 80)}),
    "oft": (CANONICAL, {".oft_blocks": (4, 160, 160)}),
    "boft_blocks": (CANONICAL, {".oft_blocks": (2, 4, 160, 160)}),  # ComfyUI's BOFT: 4-D oft_blocks
    "boft_named": (CANONICAL, {".boft_blocks": (2, 4, 160, 160)}),
    "glora": (CANONICAL, {".a1.weight": (RANK, WIDTH), ".a2.weight": (WIDTH, RANK), ".b1.weight": (RANK, WIDTH),
                          ".b2.weight": (WIDTH, RANK)}),
    "full_diff": (CANONICAL, {".diff": (WIDTH, WIDTH)}),
    "norm_diff": (CANONICAL, {".w_norm": (WIDTH,), ".b_norm": (WIDTH,)}),
    "set_weight": (CANONICAL, {".set_weight": (WIDTH, WIDTH)}),
    "reshape": (CANONICAL, {**KOHYA, ".reshape_weight": (2,)}),
}
# Where our reading and ComfyUI's part ways on purpose: case -> why. The test fails when one closes or a new one
# opens, so a host upgrade that changes ComfyUI's loading is noticed.
DIVERGENCES = {
    "peft_dora_magnitude": "ComfyUI reads DoRA only as .dora_scale and would apply PEFT's factors without their "
                           "magnitude; we report a DoRA layer that cannot be merged as plain low-rank",
    "peft_dora_magnitude_bare": "as peft_dora_magnitude",
    "peft_lora_bias": "ComfyUI leaves PEFT's lora_B.bias unloaded; we read it as a bias difference, and the merged "
                      "file carries it as .diff_b, which ComfyUI applies",
    "kohya_up_bias": "as peft_lora_bias, for lora_up.bias",
    "boft_named": "ComfyUI knows BOFT only as 4-D oft_blocks and leaves boft_* keys unloaded; we report them as an "
                  "adapter we cannot merge",
}


def _state(stem: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(len(stem) + len(shapes))
    state = {}
    for suffix, shape in shapes.items():
        if suffix == ".alpha":
            state[stem + suffix] = torch.tensor(2.0)
        elif suffix == ".reshape_weight":
            state[stem + suffix] = torch.tensor([WIDTH, WIDTH])
        else:
            state[stem + suffix] = torch.randn(shape, generator=generator) * 0.1
    return state


def _ours(state: dict[str, torch.Tensor], layout) -> tuple[str, set[str], object]:
    """(kind, keys left unread, the layer) as lora_from_tensors reads the state dict."""
    try:
        lora = lora_from_tensors(state, Path("case.safetensors"), layout=layout)
    except LoraRarError:  # none of its keys is a LoRA tensor
        return "not loaded", set(state), None
    assert set(lora.layers) == {CANONICAL}
    layer = lora.layers[CANONICAL]
    return ("low-rank" if isinstance(layer, LowRankLayer) else "other"), set(lora.ignored_keys), layer


def _comfy(state: dict[str, torch.Tensor], key_map: dict[str, str], caplog) -> tuple[str, set[str], dict]:
    """(kind, keys left unloaded, patches) as ComfyUI's loader reads the state dict."""
    import comfy.lora
    from comfy.weight_adapter import LoRAAdapter

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(state, key_map)
    unloaded = {r.getMessage().removeprefix("lora key not loaded: ") for r in caplog.records
                if r.getMessage().startswith("lora key not loaded: ")}
    patch = patches.get(WEIGHT)
    if isinstance(patch, LoRAAdapter):
        _, _, _, mid, dora_scale, reshape = patch.weights
        kind = "low-rank" if mid is None and dora_scale is None and reshape is None else "other"
    else:
        kind = "other" if patches else "not loaded"
    return kind, unloaded, patches


@pytest.fixture(scope="module")
def key_map(synthetic_model) -> dict[str, str]:
    import comfy.lora

    model, _ = synthetic_model
    return comfy.lora.model_lora_keys_unet(model.model, {})


def _stem(stem: str, key_map: dict[str, str]) -> str:
    if stem != PROCESSOR:
        return stem
    processor = [k for k, v in key_map.items() if v == WEIGHT and k.startswith("unet.") and ".processor." in k]
    assert processor, f"ComfyUI's key map names no attention-processor stem for {WEIGHT}"
    return processor[0]


def test_every_suffix_and_adapter_kind_of_the_table_has_a_case():
    keys = [stem + suffix for stem, shapes in CASES.values() for suffix in shapes]
    assert {suffix for suffix, _ in FACTOR_SUFFIXES} <= {s for _, shapes in CASES.values() for s in shapes}
    roles = {split_key(key)[1] for key in keys if split_key(key)}
    assert {f"other:{kind}" for kind in _OTHER_KINDS.values()} <= roles


@pytest.mark.parametrize("case", CASES)
def test_suffix_form_reads_like_comfyui(comfy_host, key_map, layout, caplog, case):
    stem, shapes = CASES[case]
    stem = _stem(stem, key_map)
    assert key_map.get(stem) == WEIGHT, f"ComfyUI's key map does not send {stem} to {WEIGHT}"
    state = _state(stem, shapes)
    our_kind, our_unread, layer = _ours(state, layout)
    comfy_kind, comfy_unloaded, patches = _comfy(state, key_map, caplog)
    if case in DIVERGENCES:
        assert (our_kind, our_unread) != (comfy_kind, comfy_unloaded), f"{case} now reads alike: drop it from DIVERGENCES"
    else:
        assert (our_kind, our_unread) == (comfy_kind, comfy_unloaded)
    if our_kind == comfy_kind == "low-rank":  # the same tensors as up and down, and the same alpha
        up, down, alpha = patches[WEIGHT].weights[:3]
        assert torch.equal(layer.up, up.reshape(WIDTH, RANK)) and torch.equal(layer.down, down.reshape(RANK, -1))
        assert layer.scale == pytest.approx((alpha if alpha is not None else RANK) / RANK)
        if layer.bias is not None and case not in DIVERGENCES:
            assert patches[BIAS][0] == "diff" and torch.equal(patches[BIAS][1][0], layer.bias)
