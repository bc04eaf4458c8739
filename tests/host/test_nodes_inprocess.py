"""The pack's nodes called as ComfyUI calls them, on a real ComfyUI model."""

import os
import re

import pytest
import torch
from safetensors import safe_open

from hypernet.files import file_sha256, read_state_dict
from devkit.loras import SD15, random_lora, write_lora
from devkit.weights import hypernet_file

pytestmark = pytest.mark.host


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _patched_weights(model_patcher):
    """Every patched weight as ComfyUI computes it when it applies the patches."""
    import comfy.lora

    state = model_patcher.model.state_dict()
    return {key: comfy.lora.calculate_weight(patches, state[key].float().clone(), key)
            for key, patches in model_patcher.patches.items()}


def _merge(comfy_host, model, clip, subject, style, **overrides):
    nodes, _, _ = comfy_host
    (hypernet,) = nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]().load(overrides.pop("hypernet", "auto"))
    args = dict(subject_strength=1.0, style_strength=1.0, subject_clip_strength=1.0, style_clip_strength=1.0,
                method="lorarar", layer_policy="sum")
    args.update(overrides)
    return nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]().merge(model, hypernet, subject, style, clip=clip, **args)


def test_saved_file_through_stock_loader_patches_like_the_merge_node(comfy_host, synthetic_model, layout):
    nodes, folder_paths, loras = comfy_host
    model, clip = synthetic_model
    write_lora(loras / "subject_kohya.safetensors", random_lora(layout, rank=8, seed=11, alpha=4.0))
    write_lora(loras / "style_reference.safetensors", random_lora(layout, rank=4, seed=12, fmt="reference"))

    model_out, clip_out, merged, report = _merge(comfy_host, model, clip, "subject_kohya.safetensors", "style_reference.safetensors")
    attention = len(layout.attention_linears())
    assert f"hypernet {attention // 2}" in report and f"applied to the model: {attention} layers" in report
    assert "koala" in report.lower()  # auto picked the KOALA-700M hypernet for this KOALA_700M-class model

    (path,) = nodes.NODE_CLASS_MAPPINGS["LoraRarSaveMergedLora"]().save(merged, "merged/test_merge", "fp32", "error")["result"]
    with safe_open(path, framework="pt") as saved:
        metadata = saved.metadata()
    assert metadata["lorarar_subject_sha256"] == file_sha256(loras / "subject_kohya.safetensors")
    assert metadata["lorarar_method"] == "lorarar" and metadata["lorarar_hypernet_sha256"]

    stock_model, _ = nodes.NODE_CLASS_MAPPINGS["LoraLoader"]().load_lora(model, clip, "merged/test_merge.safetensors", 1.0, 1.0)
    ours, stock = _patched_weights(model_out), _patched_weights(stock_model)
    assert len(ours) == attention and set(ours) == set(stock)
    for key in ours:
        torch.testing.assert_close(ours[key], stock[key], rtol=0, atol=0)


def test_peft_loras_that_stock_comfyui_drops_are_merged(comfy_host, synthetic_model, layout):
    nodes, _, loras = comfy_host
    model, clip = synthetic_model
    write_lora(loras / "subject_peft.safetensors", random_lora(layout, rank=4, seed=21, fmt="peft"))
    write_lora(loras / "style_diffusers.safetensors", random_lora(layout, rank=4, seed=22, fmt="diffusers"))
    stock_model, _ = nodes.NODE_CLASS_MAPPINGS["LoraLoader"]().load_lora(model, clip, "subject_peft.safetensors", 1.0, 1.0)
    assert len(stock_model.patches) == 0  # stock ComfyUI 0.3.75 drops these keys
    model_out, _, _, report = _merge(comfy_host, model, clip, "subject_peft.safetensors", "style_diffusers.safetensors")
    assert len(model_out.patches) == len(layout.attention_linears())


def test_identical_inputs_reuse_the_merge_and_changed_content_does_not(comfy_host, synthetic_model, layout):
    nodes, _, loras = comfy_host
    model, clip = synthetic_model
    write_lora(loras / "cache_subject.safetensors", random_lora(layout, rank=4, seed=31))
    write_lora(loras / "cache_style.safetensors", random_lora(layout, rank=4, seed=32))
    merge = nodes.NODE_CLASS_MAPPINGS["LoraRarMerge"]
    first = _merge(comfy_host, model, clip, "cache_subject.safetensors", "cache_style.safetensors")[2]
    again = _merge(comfy_host, model, clip, "cache_subject.safetensors", "cache_style.safetensors")[2]
    assert again is first
    before = merge.IS_CHANGED(subject_lora="cache_subject.safetensors", style_lora="cache_style.safetensors")
    write_lora(loras / "cache_style.safetensors", random_lora(layout, rank=4, seed=33))  # same name, new content
    after = merge.IS_CHANGED(subject_lora="cache_subject.safetensors", style_lora="cache_style.safetensors")
    changed = _merge(comfy_host, model, clip, "cache_subject.safetensors", "cache_style.safetensors")[2]
    assert before != after and changed is not first


def test_lora_for_another_base_model_is_refused_with_the_file_named(comfy_host, synthetic_model, layout):
    nodes, _, loras = comfy_host
    model, clip = synthetic_model
    write_lora(loras / "sd15_subject.safetensors", random_lora(SD15, rank=4, seed=41))
    write_lora(loras / "sdxl_style.safetensors", random_lora(layout, rank=4, seed=42))
    with pytest.raises(ValueError, match="sd15_subject.safetensors.*different base models"):
        _merge(comfy_host, model, clip, "sd15_subject.safetensors", "sdxl_style.safetensors")
    write_lora(loras / "sd15_style.safetensors", random_lora(SD15, rank=4, seed=43))
    for method in ("lorarar", "direct"):  # checked against the model, whatever the method
        with pytest.raises(ValueError, match="sd15_subject.safetensors.*another base model"):
            _merge(comfy_host, model, clip, "sd15_subject.safetensors", "sd15_style.safetensors", method=method)


def test_save_node_never_overwrites_or_escapes_the_loras_folder(comfy_host, synthetic_model, layout):
    nodes, _, loras = comfy_host
    model, clip = synthetic_model
    write_lora(loras / "save_subject.safetensors", random_lora(layout, rank=2, seed=51))
    write_lora(loras / "save_style.safetensors", random_lora(layout, rank=2, seed=52))
    merged = _merge(comfy_host, model, clip, "save_subject.safetensors", "save_style.safetensors", method="direct")[2]
    save = nodes.NODE_CLASS_MAPPINGS["LoraRarSaveMergedLora"]()
    (path,) = save.save(merged, "keep_me", "fp16", "error")["result"]
    original = (loras / "keep_me.safetensors").read_bytes()
    with pytest.raises(ValueError, match="file exists"):
        save.save(merged, "keep_me", "fp16", "error")
    assert (loras / "keep_me.safetensors").read_bytes() == original
    numbered = [save.save(merged, "keep_me", "fp16", "add number")["result"][0] for _ in range(2)]
    assert [p.split("/")[-1] for p in numbered] == ["keep_me_00001.safetensors", "keep_me_00002.safetensors"]
    assert (loras / "keep_me.safetensors").read_bytes() == original
    save.save(merged, "keep_me", "fp32", "overwrite")
    assert (loras / "keep_me.safetensors").read_bytes() != original
    assert oct((loras / "keep_me.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    for bad in ("../escape", "/tmp/escape", "sub/../../escape"):
        with pytest.raises(ValueError, match="inside the loras folder"):
            save.save(merged, bad, "fp16", "add number")
    assert not list(loras.glob("**/*.tmp"))


def test_own_hypernet_file_from_a_lorarar_folder(comfy_host, synthetic_model, layout, shared_weights, tmp_path):
    """A user's checkpoint (here the published one re-saved as safetensors) is listed and used."""
    from safetensors.torch import save_file

    nodes, folder_paths, loras = comfy_host
    model, clip = synthetic_model
    own = tmp_path / "lorarar"
    own.mkdir()
    state = read_state_dict(shared_weights / hypernet_file("koala-700m"), "LoRA.rar hypernet")
    save_file(state, str(own / "my_hypernet.safetensors"))
    folder_paths.add_model_folder_path("lorarar", str(own))
    choices = nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"].INPUT_TYPES()["required"]["hypernet"][0]
    assert "my_hypernet.safetensors" in choices and hypernet_file("sdxl") not in choices
    write_lora(loras / "own_subject.safetensors", random_lora(layout, rank=2, seed=61))
    write_lora(loras / "own_style.safetensors", random_lora(layout, rank=2, seed=62))
    auto = _merge(comfy_host, model, clip, "own_subject.safetensors", "own_style.safetensors")[2]
    mine = _merge(comfy_host, model, clip, "own_subject.safetensors", "own_style.safetensors", hypernet="my_hypernet.safetensors")
    assert "my_hypernet.safetensors" in mine[3]
    loader = nodes.NODE_CLASS_MAPPINGS["LoraRarHypernetLoader"]
    before = loader.IS_CHANGED("my_hypernet.safetensors")
    save_file({k: v * 1.5 for k, v in state.items()}, str(own / "my_hypernet.safetensors"))  # retrained in place
    assert loader.IS_CHANGED("my_hypernet.safetensors") != before and loader.IS_CHANGED("auto") == "auto"
    for name, layer in auto.layers.items():
        torch.testing.assert_close(layer.down, mine[2].layers[name].down)


def _text_encoder_layers(state, seed):
    generator = torch.Generator().manual_seed(seed)
    for stem, width in (("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768),
                        ("lora_te2_text_model_encoder_layers_1_mlp_fc1", None)):
        d_out, d_in = (width, width) if width else (5120, 1280)
        state[f"{stem}.lora_up.weight"] = torch.randn(d_out, 2, generator=generator) * 0.01
        state[f"{stem}.lora_down.weight"] = torch.randn(2, d_in, generator=generator) * 0.01
    return state


def test_text_encoder_layers_patch_the_clip_or_are_reported(comfy_host, synthetic_model, layout):
    nodes, _, loras = comfy_host
    model, clip = synthetic_model
    write_lora(loras / "te_subject.safetensors", _text_encoder_layers(random_lora(layout, rank=2, seed=71), 72))
    write_lora(loras / "te_style.safetensors", _text_encoder_layers(random_lora(layout, rank=2, seed=73), 74))
    attention = len(layout.attention_linears())
    model_out, clip_out, merged, report = _merge(comfy_host, model, clip, "te_subject.safetensors", "te_style.safetensors",
                                                 subject_clip_strength=0.5, style_clip_strength=0.0)
    clip_keys = set(clip_out.patcher.patches)
    assert clip_keys == {"clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                         "clip_g.transformer.text_model.encoder.layers.1.mlp.fc1.weight"}
    assert f"applied to the model: {attention + 2} layers" in report and "2 x summed: text encoder layer" in report
    assert len(model_out.patches) == attention and not clip.patcher.patches  # the inputs stay untouched
    _, clip_none, _, report = _merge(comfy_host, model, None, "te_subject.safetensors", "te_style.safetensors")
    assert clip_none is None and "2 text-encoder layers: connect a CLIP" in report


def test_save_node_refuses_bad_names_and_never_replaces_an_input(comfy_host, synthetic_model, layout):
    nodes, _, loras = comfy_host
    model, clip = synthetic_model
    write_lora(loras / "input_subject.safetensors", random_lora(layout, rank=2, seed=91))
    write_lora(loras / "input_style.safetensors", random_lora(layout, rank=2, seed=92))
    merged = _merge(comfy_host, model, clip, "input_subject.safetensors", "input_style.safetensors", method="direct")[2]
    save = nodes.NODE_CLASS_MAPPINGS["LoraRarSaveMergedLora"]()
    before = sorted(p.name for p in loras.rglob("*"))
    originals = {name: (loras / name).read_bytes() for name in ("input_subject.safetensors", "input_style.safetensors")}
    bad_names = {"evil\nname": "control character U+000A", "evil\r": "control character U+000D", "nul\x00": "U+0000",
                 "bidi\u202egpj": "U+202E", "folder/": "no file name", ".": "no file name", "..": "no file name",
                 " ": "no file name", "sub/ . ": "no file name", "x" * 250: "too long"}
    for name, expected in bad_names.items():
        for if_exists in ("add number", "overwrite"):
            with pytest.raises(ValueError, match=re.escape(expected)) as error:
                save.save(merged, name, "fp16", if_exists)
            assert "\n" not in str(error.value)
    for name in ("input_subject", "input_style.safetensors"):
        with pytest.raises(ValueError, match="of this merge"):
            save.save(merged, name, "fp16", "overwrite")
    (loras / "linked").mkdir()
    os.link(loras / "input_style.safetensors", loras / "linked" / "hard.safetensors")
    with pytest.raises(ValueError, match="is the style LoRA of this merge"):
        save.save(merged, "linked/hard", "fp16", "overwrite")
    assert {name: (loras / name).read_bytes() for name in originals} == originals
    assert sorted(p.name for p in loras.rglob("*")) == sorted([*before, "linked", "hard.safetensors"])


@pytest.mark.parametrize("strength", [float("nan"), float("inf")])
def test_merge_node_refuses_non_finite_strengths(comfy_host, synthetic_model, layout, strength):
    nodes, _, loras = comfy_host
    model, clip = synthetic_model
    write_lora(loras / "strength_subject.safetensors", random_lora(layout, rank=2, seed=93))
    with pytest.raises(ValueError, match="subject clip strength .*finite numbers between -10 and 10"):
        _merge(comfy_host, model, clip, "strength_subject.safetensors", "strength_subject.safetensors",
               subject_clip_strength=strength)


def test_a_reused_merge_reports_the_names_it_was_given(comfy_host, synthetic_model, layout):
    """A renamed copy of the same files reuses the merge, but the report and the saved metadata name the new files."""
    nodes, _, loras = comfy_host
    model, clip = synthetic_model
    for name, seed in (("named_subject.safetensors", 51), ("named_style.safetensors", 52)):
        write_lora(loras / name, random_lora(layout, rank=4, seed=seed))
    first = _merge(comfy_host, model, clip, "named_subject.safetensors", "named_style.safetensors")
    (loras / "renamed_subject.safetensors").write_bytes((loras / "named_subject.safetensors").read_bytes())
    again = _merge(comfy_host, model, clip, "renamed_subject.safetensors", "named_style.safetensors")
    assert again[2].layers is first[2].layers  # the merge itself was reused
    assert "subject: renamed_subject.safetensors" in again[3] and "subject: named_subject" not in again[3]
    assert again[2].metadata("test")["lorarar_subject"] == "renamed_subject.safetensors"
    assert again[2].source_paths["subject LoRA"].endswith("renamed_subject.safetensors")
