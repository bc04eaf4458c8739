"""Quantised and wide bases: a base stored in ComfyUI's scaled fp8 and one in bf16 get the same patched weights as
the stock loader on the same files.

The tiny synthetic Flux (devkit/synthetic_dit.py) is written once per session as released checkpoints store it
(devkit/stored_dit.py: scaled fp8, bf16) and each file is loaded once per module with the stock
``comfy.sd.load_diffusion_model_state_dict``, as ComfyUI's UNETLoader loads it. The merge node's MODEL (a kohya
subject and a PEFT style, method direct) is compared with two stacked stock LoRA loads on the same base:
(i) ComfyUI's own float32 patch (``comfy.lora.calculate_weight`` on the dequantised base) of both patch lists, and
(ii) the weights the loaded models hold after ComfyUI re-quantised / rounded them to the storage format.

What the hosts do with the scaled fp8 file (see ``test_the_scaled_fp8_file_loads_as_fp8_linears_with_their_scales``):
0.33.0 converts it (comfy/utils.py convert_old_quants) to per-layer float8_e4m3fn quantised linears
(comfy.ops mixed_precision_ops, which are not torch.nn.Linear) and re-quantises a patched weight with a scale
recalculated from the patched values; 0.3.75 reads the ``scaled_fp8`` marker in detection (scaled_fp8_ops: fp8
linears, biases included, beside their ``scale_weight``) and re-quantises with the layer's stored scale, so patched
values beyond the stored range saturate at 448 x scale (for the stock loads and the merge node alike). Both patch in
float32 on a CPU and seed the stochastic rounding to fp8 by the weight's key.
"""

import contextlib

import pytest
import torch

from devkit import stored_dit, synthetic_dit
from devkit.dit_loras import dense_updates, native_linears, random_dit_lora, write_lora
from devkit.synthetic_dit import FLUX, FLUX_HEAD_DIM

pytestmark = pytest.mark.host

# The LoRAs train one double and one single block: every kind of Flux linear (fused qkv, proj, mlp, fused linear1,
# linear2) at half the cost of re-quantising all 20 trained linears on every load
BLOCKS = ("double_blocks.0.", "single_blocks.1.")
TRAINED = 8 + 2
SUBJECT, STYLE = "quant-flux-kohya-s.safetensors", "quant-flux-peft-t.safetensors"
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@contextlib.contextmanager
def flux_heads_from_width():
    """ComfyUI 0.3.75's detection fixes Flux at 24 heads, so only the 3072-wide Flux builds: while loading, the heads
    are width / 128 as 0.33.0's detection computes them (synthetic_dit.host_config does the same). Every other
    loading step, the scaled fp8 reading included, stays the host's own; on 0.33.0 this changes nothing."""
    import comfy.model_detection

    detect = comfy.model_detection.detect_unet_config

    def detect_with_heads(*args, **kwargs):
        config = detect(*args, **kwargs)
        if config is not None and config.get("image_model") == "flux":
            config["num_heads"] = config["hidden_size"] // FLUX_HEAD_DIM
        return config

    comfy.model_detection.detect_unet_config = detect_with_heads
    try:
        yield
    finally:
        comfy.model_detection.detect_unet_config = detect


def load_stock(path, **model_options):
    """The ModelPatcher ``comfy.sd.load_diffusion_model_state_dict`` makes of the file, as UNETLoader calls it."""
    import comfy.sd
    import comfy.utils

    state, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    with flux_heads_from_width():
        return comfy.sd.load_diffusion_model_state_dict(state, model_options=model_options, metadata=metadata)


@pytest.fixture(scope="session")
def stored_files(comfy_host, tmp_path_factory):
    """{"scaled_fp8": path, "bf16": path} of the synthetic Flux, written once per session."""
    root = synthetic_dit.ensure_dit(in_process=True)
    folder = tmp_path_factory.mktemp("stored_bases")
    return {fmt: stored_dit.write(FLUX.path(root), fmt, folder) for fmt in stored_dit.FORMATS}


@pytest.fixture(scope="module")
def bases(stored_files):
    """{"scaled_fp8": patcher, "bf16": patcher}, each loaded once, in inference mode as ComfyUI runs a prompt.

    scaled fp8: no dtype, UNETLoader's "default" (its linears stay fp8 whatever the dtype: see the first test).
    bf16: dtype bfloat16, what the default picks on a bf16-capable GPU; a CPU's default would widen it to float32,
    the case tests/host/test_dit_merge.py covers.
    """
    with torch.inference_mode():
        return {"scaled_fp8": load_stock(stored_files["scaled_fp8"]),
                "bf16": load_stock(stored_files["bf16"], dtype=torch.bfloat16)}


@pytest.fixture(autouse=True)
def as_comfyui_runs_a_prompt():
    """Node calls, loads and patches in inference mode, as ComfyUI's executor runs a prompt: outside it, 0.3.75's
    fp8 re-quantisation (comfy.float, clamp with out=) refuses the weights it loaded from a scaled fp8 file (they
    require grad), and 0.33.0 cannot restore a weight that was loaded in it."""
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def loras(comfy_host):
    """(subject, style) state dicts, a fused kohya subject and a split PEFT style, written into the loras folder."""
    modules = [name for name in native_linears(FLUX) if name.startswith(BLOCKS)]
    subject = random_dit_lora(FLUX, "kohya", rank=4, seed=31, alpha=2.0, modules=modules)
    style = random_dit_lora(FLUX, "peft", rank=3, seed=32, modules=modules)
    write_lora(comfy_host[2] / SUBJECT, subject)
    write_lora(comfy_host[2] / STYLE, style)
    return subject, style


def merge(comfy_host, model, method: str):
    return comfy_host[0].NODE_CLASS_MAPPINGS["LoraRarMerge"]().merge(model, None, SUBJECT, STYLE, 1.0, 1.0, 1.0, 1.0,
                                                                      method, "sum")


def stacked_stock(base, loras):
    """Two stock LoRA loads, subject then style, at strength 1 (two LoraLoaderModelOnly nodes)."""
    import comfy.sd

    model = base
    for state in loras:
        model, _ = comfy.sd.load_lora_for_models(model, None, state, 1.0, 1.0)
    return model


def dequantised(patcher, key: str) -> torch.Tensor:
    """A model weight in float32 as ComfyUI's patcher reads it before patching (model_patcher.patch_weight_to_device:
    cast, then the layer's own convert_weight, which applies the fp8 scale)."""
    from comfy.model_patcher import get_key_weight

    weight, _, convert = get_key_weight(patcher.model, key)
    weight = weight.to(torch.float32, copy=True)
    return (convert(weight, inplace=True) if convert is not None else weight).float()


def patched_by_comfy(patcher, key: str, base: torch.Tensor) -> torch.Tensor:
    """ComfyUI's own float32 patch of ``key``: comfy.lora.calculate_weight of the patcher's list on ``base``."""
    import comfy.lora

    return comfy.lora.calculate_weight(patcher.patches[key], base.clone(), key)


def in_model(patcher, keys) -> dict[str, torch.Tensor]:
    """The weights ``keys`` as the loaded model holds them (patched, re-quantised or rounded, stored), dequantised."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    try:
        return {key: dequantised(patcher, key) for key in keys}
    finally:
        comfy.model_management.unload_all_models()


def relative_error(actual, expected) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def trained_keys(subject) -> set[str]:
    return {f"diffusion_model.{key}" for key in dense_updates(FLUX, "kohya", subject)}


def canonical(weight_key: str) -> str:
    """``diffusion_model.double_blocks.0.img_attn.qkv.weight`` -> its kohya layer name, as the merge names it."""
    return "lora_unet_" + weight_key.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")


# (ii) The stored weights of the two models, element by element. ComfyUI rounds a patched weight to its storage
# format with a generator seeded by the weight's key (comfy.float.stochastic_rounding; round-to-nearest for bf16),
# so the two models draw the same random numbers for a weight, and two float32 results that agree to ~1e-7 (i)
# are stored as the same value, or, where they straddle a rounding boundary, as neighbouring ones: one storage step
# apart. A step at |x|: bf16 keeps 8 significant bits, so at most 2^-7 |x|; float8_e4m3fn keeps 4, at most 2^-3 |x|,
# and below its smallest normal (2^-6 x scale) a fixed 2^-9 x scale, the scale being the largest stored magnitude
# / 448 (0.33.0 recalculates it from the patched values, 0.3.75 keeps the base's: the larger of the two is used).
# Only the boundary cases may differ at all: at most 1 element in 1000 by more than float32 rounding (1e-5).
STEP = {"bf16": 2.0 ** -7, "scaled_fp8": 2.0 ** -3}
SUBNORMAL_STEP = {"bf16": 0.0, "scaled_fp8": 2.0 ** -9}
MOVED_AT_MOST = 1e-3


def assert_same_stored_weight(fmt: str, key: str, by_node: torch.Tensor, by_stock: torch.Tensor, base: torch.Tensor):
    difference = (by_node - by_stock).abs()
    magnitude = torch.maximum(by_node.abs(), by_stock.abs())
    scale = max(float(by_node.abs().max()), float(by_stock.abs().max()), float(base.abs().max())) / FP8_MAX
    step = STEP[fmt] * magnitude + SUBNORMAL_STEP[fmt] * scale
    assert bool((difference <= step).all()), f"{key}: {float((difference - step).max()):.3g} over one {fmt} step"
    moved = int((difference > 1e-5 * magnitude).sum())
    assert moved <= MOVED_AT_MOST * difference.numel(), f"{key}: {moved} of {difference.numel()} elements differ"


def test_the_scaled_fp8_file_loads_as_fp8_linears_with_their_scales(bases, stored_files):
    """What each host makes of the file with no dtype (UNETLoader's default) and with bfloat16: every linear weight
    stays float8_e4m3fn and its dequantised value is the file's fp8 value times its scale_weight, exactly."""
    from safetensors.torch import load_file

    stored = load_file(str(stored_files["scaled_fp8"]))
    linears = {key for key, tensor in stored.items() if key.endswith(".weight") and tensor.dtype == torch.float8_e4m3fn}
    assert linears
    for patcher in (bases["scaled_fp8"], load_stock(stored_files["scaled_fp8"], dtype=torch.bfloat16)):
        state = patcher.model.state_dict()
        assert {key.removeprefix("diffusion_model.") for key, tensor in state.items()
                if key.endswith(".weight") and tensor.dtype == torch.float8_e4m3fn} == linears
        for key in linears:
            expected = stored[key].float() * stored[key[:-len("weight")] + "scale_weight"]
            assert torch.equal(dequantised(patcher, f"diffusion_model.{key}"), expected), key


@pytest.mark.parametrize("fmt", stored_dit.FORMATS)
def test_the_merge_node_patches_what_two_stock_loads_patch(comfy_host, bases, loras, fmt):
    """The same weights patched (the trained linears: never an fp8 scale, which ComfyUI's key map also names), and
    the same patched values: (i) in float32, (ii) as stored."""
    base = bases[fmt]
    by_node, _, _, report = merge(comfy_host, base, "direct")
    by_stock = stacked_stock(base, loras)
    assert f"applied to the model: {TRAINED} layers" in report
    assert set(by_node.patches) == set(by_stock.patches) == trained_keys(loras[0])
    keys = sorted(by_node.patches)
    originals = {key: dequantised(base, key) for key in keys}
    for key in keys:  # (i) ComfyUI's float32 patch of each patch list: the changes agree to float32 rounding
        node_change = patched_by_comfy(by_node, key, originals[key]) - originals[key]
        stock_change = patched_by_comfy(by_stock, key, originals[key]) - originals[key]
        assert relative_error(node_change, stock_change) <= 1e-5, key
    stored_by_node, stored_by_stock = in_model(by_node, keys), in_model(by_stock, keys)
    for key in keys:  # (ii) the weights in the loaded models: within one storage step (the bound above)
        assert_same_stored_weight(fmt, key, stored_by_node[key], stored_by_stock[key], originals[key])
        assert not torch.equal(stored_by_node[key], originals[key]), f"{key} was not patched"
    if fmt == "scaled_fp8":  # 0.33+ re-scales a patched fp8 weight; 0.3.x keeps its scale, saturating at 448 x scale
        import comfy.utils

        grew = [key for key in keys if stored_by_stock[key].abs().max() > originals[key].abs().max()]
        assert grew if hasattr(comfy.utils, "convert_old_quants") else not grew


def test_np_lora_on_the_fp8_base_patches_the_merged_layers_update(comfy_host, bases, loras):
    """NP-LoRA's patch on the scaled fp8 base, through ComfyUI's calculate_weight, is the dequantised base plus the
    merged layer's dense update (from its own factors)."""
    base = bases["scaled_fp8"]
    model, _, merged, report = merge(comfy_host, base, "np-lora")
    assert f"applied to the model: {TRAINED} layers" in report
    assert set(model.patches) == trained_keys(loras[0])
    assert {canonical(key) for key in model.patches} == set(merged.layers)
    for key in model.patches:
        layer = merged.layers[canonical(key)]
        original = dequantised(base, key)
        change = patched_by_comfy(model, key, original) - original
        dense = (layer.up.double() @ layer.down.double()) * layer.scale
        assert relative_error(change, dense) <= 1e-5, key


def test_k_lora_switches_quantised_linears_as_it_switches_bf16_ones(comfy_host, bases, loras):
    """K-LoRA adds the chosen side's update in the forward of its switched attention linears. ComfyUI 0.33's
    quantised linear (comfy.ops mixed_precision_ops) is not a torch.nn.Linear: it is switched all the same, and
    adds the same update as the bf16 base's linear."""
    models, lines = {}, {}
    for fmt, base in bases.items():
        models[fmt], _, _, report = merge(comfy_host, base, "k-lora")
        lines[fmt] = next(line for line in report.splitlines() if line.startswith("applied to the model"))
    assert lines["scaled_fp8"] == lines["bf16"], lines
    assert "not switched" not in lines["bf16"]
    switched = sorted(key for key in models["bf16"].object_patches if key.endswith(".forward"))
    assert switched and sorted(key for key in models["scaled_fp8"].object_patches if key.endswith(".forward")) == switched
    for key in switched:
        path = key[:-len(".forward")]
        added = []
        for model in (models["scaled_fp8"], models["bf16"]):
            module = model.get_model_object(path)
            x = torch.randn(2, 3, module.in_features, generator=torch.Generator().manual_seed(0))
            added.append(model.object_patches[key](x) - module(x))
        assert relative_error(added[0], added[1]) <= 1e-5, key
