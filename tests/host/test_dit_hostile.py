"""Hostile inputs to the merge node on a DiT model (synthetic Flux, SD3.5): text-encoder layers without a CLIP are
reported as such, a hypernet's free-text metadata cannot blow up an error message, a model loaded with fp8
weights merges."""

import pytest
import torch
from safetensors.torch import save_file

from devkit import synthetic_dit
from devkit.dit_loras import random_dit_lora, write_lora
from devkit.synthetic_dit import FLUX

pytestmark = pytest.mark.host
TE = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture(scope="module")
def flux(comfy_host):
    return synthetic_dit.load_patcher(FLUX, synthetic_dit.ensure_dit(in_process=True))[0]


def merge(comfy_host, model, subject, style, method="direct", hypernet=None):
    node = comfy_host[0].NODE_CLASS_MAPPINGS["LoraRarMerge"]()
    return node.merge(model, hypernet, subject, style, 1.0, 1.0, 1.0, 1.0, method, "sum")


def te_factors() -> dict:
    return {f"{TE}.lora_up.weight": torch.randn(768, 4) * 0.05, f"{TE}.lora_down.weight": torch.randn(4, 768) * 0.05}


def test_text_encoder_layers_without_a_clip_say_to_connect_one(comfy_host, flux):
    write_lora(comfy_host[2] / "hostile-flux-te.safetensors", {**random_dit_lora(FLUX, "kohya", seed=1), **te_factors()})
    write_lora(comfy_host[2] / "hostile-flux-te-only.safetensors", te_factors())
    write_lora(comfy_host[2] / "hostile-flux-p.safetensors", random_dit_lora(FLUX, "peft", seed=2))
    *_, report = merge(comfy_host, flux, "hostile-flux-te.safetensors", "hostile-flux-p.safetensors")
    assert ("note: subject LoRA: 1 text-encoder layers not merged: no CLIP is connected (connect one to merge them)"
            in report)
    with pytest.raises(ValueError, match=r"hostile-flux-te-only\.safetensors: all its 1 LoRA layers are text-encoder "
                                         r"layers .* no CLIP is connected: connect the CLIP to the merge node"):
        merge(comfy_host, flux, "hostile-flux-te-only.safetensors", "hostile-flux-p.safetensors")


@pytest.mark.parametrize("classes", ["X" * 1_000_000, ",".join(f"C{i}" for i in range(20000))], ids=["long", "many"])
def test_hypernet_metadata_naming_other_families_gives_a_short_error(comfy_host, flux, tmp_path_factory, classes):
    from hypernet.model import LoraRarHypernet

    folder = tmp_path_factory.mktemp("hostile_hypernets")
    comfy_host[1].add_model_folder_path("lorarar", str(folder))
    net = LoraRarHypernet({"input_1": 2 * 256}, hidden=8)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "lying.safetensors"),
              metadata={"lorarar_model_classes": classes})
    write_lora(comfy_host[2] / "hostile-flux-k.safetensors", random_dit_lora(FLUX, "kohya", seed=3))
    (loaded,) = comfy_host[0].NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]().load("lying.safetensors", flux)
    with pytest.raises(ValueError, match=r"^lying\.safetensors: this hypernet was trained for \S.{0,200} models; this "
                                         r"model is Flux") as error:
        merge(comfy_host, flux, "hostile-flux-k.safetensors", "hostile-flux-k.safetensors", "lorarar", loaded)
    assert len(str(error.value)) < 400


def test_a_model_loaded_with_fp8_weights_merges(comfy_host):
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    from devkit.synthetic_dit import SD35

    state = comfy.utils.load_torch_file(str(SD35.path(synthetic_dit.ensure_dit(in_process=True))))
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float8_e4m3fn})
    write_lora(comfy_host[2] / "hostile-sd35-p.safetensors", random_dit_lora(SD35, "peft", seed=4))
    write_lora(comfy_host[2] / "hostile-sd35-k.safetensors", random_dit_lora(SD35, "kohya", seed=5))
    patched, _, merged, report = merge(comfy_host, model, "hostile-sd35-p.safetensors", "hostile-sd35-k.safetensors")
    assert f"applied to the model: {len(merged.layers)} layers" in report
    try:
        with torch.inference_mode():  # as ComfyUI runs a prompt (0.3.75's fp8 rounding refuses tensors needing grad)
            comfy.model_management.load_models_gpu([patched], force_full_load=True)
            weights = patched.model.state_dict().values()
            assert all(torch.isfinite(w.float()).all() for w in weights if w.is_floating_point())
    finally:
        comfy.model_management.unload_all_models()
