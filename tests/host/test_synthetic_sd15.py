"""The synthetic SD 1.5 checkpoint (devkit/synthetic_models.py) is what ComfyUI takes for SD15, and the LoRAs of a
synthetic training dataset (devkit/training_data.py) patch exactly its attention projections.

Per host: CheckpointLoaderSimple's loader detects SD15 with the shrunk config, the attention linears have the SD 1.5
widths 320 / 640 / 1280 with a 768-wide context, CLIP-L encodes a caption and one UNet forward is finite; every
layer of every dataset LoRA is read by ComfyUI's key map and lands on a to_q / to_k / to_v / to_out.0 weight.
"""

import json

import pytest
import torch

from devkit import synthetic_models
from devkit.training_data import build_dataset, sd15_layout

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """(MODEL, CLIP, detected model class) of the synthetic SD 1.5 checkpoint, loaded by ComfyUI's own loader."""
    synthetic_models.import_comfy()
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    root = synthetic_models.ensure_sd15_model(in_process=True)
    path = synthetic_models.sd15_checkpoint_path(root)
    state_dict, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(state_dict)
    detected = comfy.model_detection.model_config_from_unet(state_dict, prefix, metadata=metadata)
    del state_dict
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True)
    return model, clip, type(detected).__name__


def test_comfy_detects_sd15_with_the_sd15_attention_widths(sd15):
    model, _, detected = sd15
    assert detected == synthetic_models.SD15_MODEL_CLASS
    assert type(model.model.model_config).__name__ == "SD15"
    config = model.model.model_config.unet_config
    for key in ("num_res_blocks", "transformer_depth", "channel_mult", "context_dim", "model_channels"):
        assert config[key] == synthetic_models.SD15_UNET_CONFIG[key], key
    shapes = {name: tuple(module.weight.shape) for name, module in model.model.diffusion_model.named_modules()
              if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")}
    assert {out for out, _ in shapes.values()} == set(synthetic_models.SD15_WIDTHS)
    assert {d_in for name, (_, d_in) in shapes.items() if ".attn2.to_k" in name} == {768}
    assert len(shapes) == len(sd15_layout().attention_linears()) == 24


def test_clip_encodes_a_caption_and_the_unet_runs(sd15):
    model, clip, _ = sd15
    cond = clip.encode_from_tokens(clip.tokenize("a photo of sks0 square"))
    assert tuple(cond.shape) == (1, 77, 768) and torch.isfinite(cond).all()
    unet = model.model
    with torch.no_grad():
        out = unet.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), c_crossattn=cond.to(unet.get_dtype()))
    assert tuple(out.shape) == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_every_dataset_lora_layer_lands_on_an_attention_projection(sd15, tmp_path):
    import comfy.lora
    from safetensors.torch import load_file

    model, _, _ = sd15
    root = build_dataset(tmp_path / "data", subjects=2, styles=2, images=1)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    split = json.loads((root / "split.json").read_text())
    names = [("subjects", n) for part in split.values() for n in part["subjects"]]
    names += [("styles", n) for part in split.values() for n in part["styles"]]
    for kind, name in names:
        lora = load_file(str(root / kind / name / "lora.safetensors"))
        patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
        targets = sorted(k if isinstance(k, str) else k[0] for k in patches)
        assert len(targets) == 24, (name, len(targets))
        assert all(t.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for t in targets), targets
        for target in targets:
            assert target in weights
