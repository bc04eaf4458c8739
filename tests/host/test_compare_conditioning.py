"""The compare node with given conditioning (no CLIP), on the synthetic SD3.5 model with the test conditioning
node and the random TAESD3: the inputs' one-line errors, the report's source line, the conditioning really used."""

import sys

import numpy as np
import pytest
import torch

from devkit import synthetic_dit
from devkit.comfy_nodes.lorarar_test_nodes import LoraRarTestConditioning, random_conditioning
from devkit.synthetic_dit import FAMILIES, SD35

pytestmark = pytest.mark.host

LATENT = {"samples": torch.zeros(1, 16, 16, 16)}


@pytest.fixture(scope="module")
def dit(comfy_host):
    """(nodes module, SD3.5 MODEL, taesd3 VAE, loras dir) with ComfyUI's own loaders."""
    nodes, folder_paths, loras = comfy_host
    root = synthetic_dit.ensure_dit(in_process=True)
    folder_paths.add_model_folder_path("vae_approx", str(root / "vae_approx"))
    patcher, how = synthetic_dit.load_patcher(SD35, root)
    assert how == "load_diffusion_model_state_dict"
    (vae,) = nodes.VAELoader().load_vae("taesd3")
    return nodes, patcher, vae, loras


def _compare(nodes, model, vae, methods="no LoRA", **optional):
    node = nodes.NODE_CLASS_MAPPINGS["LoraRarCompare"]()
    return node.compare(model, vae, "dit_subject.safetensors", "dit_style.safetensors", "unused", "unused", LATENT,
                        3, 1, 1.0, "euler", "simple", 1.0, methods, "sum", **optional)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_test_node_gives_the_detected_familys_widths_and_is_seeded(comfy_host, family):
    """The node finds the family by the class ComfyUI detected (the widths themselves are checked by each family's
    forward in tests/host/test_synthetic_dit.py)."""
    spec = FAMILIES[family]
    patcher, _ = synthetic_dit.load_patcher(spec, synthetic_dit.ensure_dit(in_process=True))
    ((cross, extras),) = LoraRarTestConditioning().condition(patcher, seed=5, tokens=7, batch=2)[0]
    assert cross.shape == (2, 7, spec.context_dim) and extras["pooled_output"].shape == (2, spec.pooled_dim)
    assert ("guidance" in extras) == spec.guidance
    ((again, _),) = synthetic_dit.conditioning(spec, batch=2, tokens=7, seed=5)  # one recipe for both
    assert torch.equal(cross, again)
    assert not torch.equal(cross, random_conditioning(spec.context_dim, None, False, batch=2, tokens=7, seed=6)[0][0])


def test_the_taesd3_vae_decodes_a_16_channel_latent(dit):
    _, _, vae, _ = dit
    assert vae.latent_channels == 16
    image = vae.decode(torch.randn(1, 16, 4, 4))
    assert image.shape[-1] == 3 and image.shape[1:3] == (32, 32) and image.isfinite().all()


def test_one_conditioning_alone_or_no_clip_is_a_one_line_error(dit):
    nodes, model, vae, _ = dit
    (positive,) = LoraRarTestConditioning().condition(model, 1, 8, 1)
    cases = {"positive_conditioning is connected but negative_conditioning is not": {"positive_conditioning": positive},
             "negative_conditioning is connected but positive_conditioning is not": {"negative_conditioning": positive},
             "connect a CLIP to encode the prompts, or connect positive_conditioning": {}}
    for expected, optional in cases.items():
        with pytest.raises(ValueError) as error:  # LoraRarError, as the pack's module loaded in ComfyUI defines it
            _compare(nodes, model, vae, **optional)
        assert expected in str(error.value) and "\n" not in str(error.value)


def test_given_conditioning_is_used_for_the_columns_and_the_report_says_so(dit):
    nodes, model, vae, _ = dit
    condition = LoraRarTestConditioning().condition
    runs = [_compare(nodes, model, vae, positive_conditioning=condition(model, seed, 8, 1)[0],
                     negative_conditioning=condition(model, seed + 1, 8, 1)[0]) for seed in (1, 1, 3)]
    grid, images, labels, report = runs[0]
    assert labels == "no LoRA" and images.shape == (1, 128, 128, 3) and images.isfinite().all()
    assert "conditioning: the connected positive/negative conditioning" in report.splitlines()[0]
    assert "a merge's text-encoder layers cannot change it" in report.splitlines()[0]
    assert torch.equal(runs[1][1], images)  # seeded: the same conditioning, the same image
    assert not torch.equal(runs[2][1], images)  # other conditioning, another image: it is what the sampler got
