"""Every LoRA file format lands on the same canonical layers, with the same values."""

import pytest
import torch

from hypernet.base_models import KOALA_700M, SDXL
from hypernet.keys import canonical_name
from hypernet.lora_io import LowRankLayer, read_lora
from devkit.loras import FORMATS, random_lora, write_lora
from devkit.weights import hypernet_file


@pytest.mark.parametrize("layout", [SDXL, KOALA_700M], ids=lambda l: l.name)
@pytest.mark.parametrize("fmt", FORMATS)
def test_format_reads_to_canonical_kohya_layers(fmt, layout, tmp_path):
    reference = read_lora(write_lora(tmp_path / "kohya.safetensors", random_lora(layout, rank=2, seed=9, alpha=1.0)), layout)
    lora = read_lora(write_lora(tmp_path / f"{fmt}.safetensors", random_lora(layout, rank=2, seed=9, fmt=fmt)), layout)
    assert set(lora.layers) == set(reference.layers)
    assert len(lora.layers) == len(layout.attention_linears())
    for name, layer in lora.layers.items():
        assert torch.equal(layer.up, reference.layers[name].up)


def test_alpha_dora_loha_and_text_encoder_keys(tmp_path):
    state = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(768, 2),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.ones(640, 2),
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.ones(2, 640),
        "lora_unet_input_blocks_4_1_proj_in.dora_scale": torch.ones(640, 1),
        "lora_unet_input_blocks_5_1_proj_out.hada_w1_a": torch.ones(640, 2),
        "lora_unet_input_blocks_5_1_proj_out.hada_w1_b": torch.ones(2, 640),
        "text_encoder_2.text_model.encoder.layers.3.mlp.fc1.lora_A.weight": torch.ones(2, 1280),
        "text_encoder_2.text_model.encoder.layers.3.mlp.fc1.lora_B.weight": torch.ones(5120, 2),
    }
    lora = read_lora(write_lora(tmp_path / "mixed.safetensors", state))
    te = lora.layers["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
    assert isinstance(te, LowRankLayer) and te.scale == 0.5
    assert lora.layers["lora_unet_input_blocks_4_1_proj_in"].kind == "DoRA"
    assert lora.layers["lora_unet_input_blocks_5_1_proj_out"].kind == "LoHa"
    assert isinstance(lora.layers["lora_te2_text_model_encoder_layers_3_mlp_fc1"], LowRankLayer)


def test_non_attention_diffusers_modules_map_to_sgm():
    assert canonical_name("lora_unet_down_blocks_2_resnets_1_conv1") == "lora_unet_input_blocks_8_0_in_layers_2"
    assert canonical_name("unet.up_blocks.0.upsamplers.0.conv") == "lora_unet_output_blocks_2_2_conv"
    assert canonical_name("unet.time_embedding.linear_1") == "lora_unet_time_embed_0"
    assert canonical_name("lora_unet_mid_block_attentions_0_proj_in") == "lora_unet_middle_block_1_proj_in"
    assert canonical_name("some_other_model.layer") is None


def test_comfyui_extracted_lora_keeps_layers_with_bias_differences(tmp_path, shared_weights):
    """ComfyUI's 'Extract and Save Lora' writes .diff_b beside the factors and text_encoders.clip_l names."""
    from hypernet.merge import merge_loras
    from hypernet.model import LoraRarHypernet

    out = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_out.0"
    te = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    state = {f"{out}.lora_up.weight": torch.ones(640, 2) * 0.01, f"{out}.lora_down.weight": torch.ones(2, 640) * 0.01,
             f"{out}.diff_b": torch.full((640,), 0.5),
             f"{te}.lora_up.weight": torch.ones(768, 2), f"{te}.lora_down.weight": torch.ones(2, 768),
             "some.unknown.tensor": torch.zeros(3)}
    lora = read_lora(write_lora(tmp_path / "extracted.safetensors", state))
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"
    assert isinstance(lora.layers[name], LowRankLayer) and lora.layers[name].bias is not None
    assert isinstance(lora.layers["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"], LowRankLayer)
    assert lora.ignored_keys == ["some.unknown.tensor"]
    hypernet = LoraRarHypernet.load(shared_weights / hypernet_file("sdxl"))
    merged = merge_loras(lora, lora, hypernet)
    assert merged.report.actions[name] == "hypernet"
    torch.testing.assert_close(merged.layers[name].bias, torch.full((640,), 1.0))  # strengths 1 + 1
    assert merged.kohya_state_dict()[f"{name}.diff_b"].shape == (640,)
    assert "ignored 1 tensors of the subject LoRA" in merged.report.to_text()


def test_peft_dora_magnitude_is_recognised(tmp_path):
    stem = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    state = {f"{stem}.lora_A.weight": torch.ones(2, 640), f"{stem}.lora_B.weight": torch.ones(640, 2),
             f"{stem}.lora_magnitude_vector": torch.ones(640)}
    lora = read_lora(write_lora(tmp_path / "peft_dora.safetensors", state))
    assert lora.layers["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"].kind == "DoRA"


def test_mixed_adapter_keeps_the_plain_side(tmp_path):
    from hypernet.merge import merge_loras

    stem = "lora_unet_input_blocks_4_1_proj_in"
    plain = {f"{stem}.lora_up.weight": torch.ones(640, 2), f"{stem}.lora_down.weight": torch.ones(2, 640)}
    loha = {f"{stem}.hada_w1_a": torch.ones(640, 2), f"{stem}.hada_w1_b": torch.ones(2, 640)}
    merged = merge_loras(read_lora(write_lora(tmp_path / "plain.safetensors", plain)),
                         read_lora(write_lora(tmp_path / "loha.safetensors", loha)), None, method="direct")
    assert merged.report.actions[stem] == "kept (subject)" and "LoHa adapter in the style LoRA" in merged.report.reasons[stem]


def test_no_factor_suffix_is_the_tail_of_another():
    """split_key takes the first suffix that matches: with no suffix ending another, the table's order is free."""
    from hypernet.keys import FACTOR_SUFFIXES

    suffixes = [suffix for suffix, _ in FACTOR_SUFFIXES]
    assert len(set(suffixes)) == len(suffixes)
    assert [(a, b) for a in suffixes for b in suffixes if a != b and b.endswith(a)] == []


def test_text_encoder_layers_are_told_apart_by_one_function():
    from hypernet.keys import is_text_encoder

    for stem in ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2.text_model.encoder.layers.0.mlp.fc1",
                 "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1", "lora_te_text_model_x"):
        assert is_text_encoder(canonical_name(stem)), stem
    assert not is_text_encoder(canonical_name("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"))
