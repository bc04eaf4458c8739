"""ZipLoRA's differentiable merge on the MODEL ComfyUI loaded (hypernet/ziplora.py + nodes/adapter/):
its coefficient gradient is the dense objective's, a few optimiser steps lower the loss, CPU runs repeat
exactly, and the converted merged LoRA patched by ComfyUI's stock LoRA patching computes what the branch did."""

import importlib
import sys

import pytest

from devkit.loaded_pack import pack_module
import torch

from devkit.dense_rule import dense_update, dense_ziplora_linear, dense_ziplora_objective, dense_ziplora_update
from devkit.loras import random_lora, write_lora

pytestmark = pytest.mark.host

BLOCK = "input_blocks.3.1.transformer_blocks.0"  # width 640 in the synthetic model
BOTH = (f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn2.to_k", "input_blocks.5.1.transformer_blocks.1.attn1.to_out.0")
SUBJECT_ONLY = f"{BLOCK}.attn1.to_v"  # kept as it is, no coefficients
LATENT = (1, 4, 16, 16)  # the smallest the UNet takes: a forward costs about a second on 2 CPU cores


def _kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


@pytest.fixture(scope="module")
def pack(comfy_host):
    """(the adapter, the adapter, ziplora math module) as the server loaded the pack."""
    nodes, _, _ = comfy_host
    adapter = pack_module(nodes, "nodes.adapter")
    return adapter, adapter, pack_module(nodes, "hypernet.ziplora")


@pytest.fixture(scope="module")
def pair(comfy_host, synthetic_model, layout, pack):
    """(subject state dict, style state dict, subject LoraFile, style LoraFile) read through ComfyUI's key map."""
    _, _, loras = comfy_host
    model, _ = synthetic_model
    merge_module = pack[0]
    subject = random_lora(layout, rank=4, seed=131, alpha=2.0, std=0.1, modules=[*BOTH, SUBJECT_ONLY])
    style = random_lora(layout, rank=6, seed=132, std=0.08, modules=list(BOTH))
    paths = [write_lora(loras / f"zip_{side}.safetensors", state) for side, state in (("subject", subject), ("style", style))]
    view = merge_module.ModelView(model)  # no CLIP connected
    files = [view.read(str(path)) for path in paths]
    return subject, style, *files


def _batches(model, patch, seed: int):
    """(subject batch, style batch): random latents, noise, timesteps and CONDITIONING (as CLIPTextEncode gives
    it: tokens and pooled output), seeded."""
    generator = torch.Generator().manual_seed(seed)

    def one():
        latent = torch.randn(*LATENT, generator=generator)
        conditioning = [[torch.randn(1, 77, 2048, generator=generator),
                         {"pooled_output": torch.randn(1, 1280, generator=generator)}]]
        timestep = torch.randint(0, 1000, (1,), generator=generator)
        return patch.noised_batch(model, latent, torch.randn(*LATENT, generator=generator), timestep,
                                  patch.model_conditioning(model, conditioning, latent))
    return one(), one()


def _merge(pack, pair, seed: int | None = None):
    """A ZipLoraMerge of the pair's diffusion layers; with a seed, coefficients moved off 1 (else cos' gradient is 0)."""
    _, patch, ziplora = pack
    _, _, subject, style = pair
    merge = ziplora.ZipLoraMerge(subject.layers, style.layers, subject_strength=0.8, style_strength=1.1)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in merge.coefficient_parameters():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return merge


def _factored_gradient(model, pack, merge, batches):
    _, patch, ziplora = pack
    patched = patch.inject(model, merge, patch.ModelView(model).module_paths())[0]
    with patch.loaded(patched):
        loss = ziplora.ziplora_loss(merge, lambda batch: patch.prediction(patched, batch), *batches)
        grads = torch.autograd.grad(loss.total, merge.coefficient_parameters())
    return loss.total.detach(), grads


def _dense_gradient(model, pack, pair, merge, batches):
    """The same objective with every layer patched densely: W + a dW_s diag(m_s) + b dW_t diag(m_t)."""
    _, patch, _ = pack
    subject_sd, style_sd, _, _ = pair
    paths = patch.ModelView(model).module_paths()
    state = {"branch": "merged"}
    leaves, patched = [], model.clone()
    for module in BOTH + (SUBJECT_ONLY,):
        name = _kohya(module)
        dw_s = dense_update(subject_sd, name, torch.float32)
        dw_t = dense_update(style_sd, name, torch.float32) if module in BOTH else torch.zeros_like(dw_s)
        if module in BOTH:
            layer = merge.layers[name]
            m_s, m_t = (layer.m_subject.detach().clone().requires_grad_(), layer.m_style.detach().clone().requires_grad_())
            leaves.append((m_s, m_t))
        else:
            m_s = m_t = torch.ones(dw_s.shape[1])
        linear = patched.get_model_object(f"{paths[name]}")

        def forward(x, linear=linear, dw_s=dw_s, dw_t=dw_t, m_s=m_s, m_t=m_t):
            update = dense_ziplora_update(dw_s, dw_t, m_s, m_t, state["branch"], 0.8, 1.1)
            return dense_ziplora_linear(x, linear.weight, linear.bias, update)
        patched.add_object_patch(f"{paths[name]}.forward", forward)

    def predict(branch, side):
        state["branch"] = branch
        return patch.prediction(patched, batches[0 if side == "subject" else 1])

    with patch.loaded(patched):
        loss = dense_ziplora_objective(predict, leaves, 0.01)
        grads = torch.autograd.grad(loss, [m for pair_ in leaves for m in pair_])
    return loss.detach(), grads


def test_coefficient_gradient_equals_the_dense_objectives(synthetic_model, pack, pair):
    model, _ = synthetic_model
    merge = _merge(pack, pair, seed=5)
    assert len(merge.coefficient_parameters()) == 2 * len(BOTH)  # the subject-only layer has none
    batches = _batches(model, pack[1], seed=7)
    loss, grads = _factored_gradient(model, pack, merge, batches)
    dense_loss, dense_grads = _dense_gradient(model, pack, pair, merge, batches)
    assert float(abs(loss - dense_loss) / dense_loss) <= 1e-5
    for grad, dense in zip(grads, dense_grads):
        assert float(dense.norm()) > 0
        error = float((grad - dense).norm() / dense.norm())
        assert error <= 1e-4, error


def _optimise(model, pack, pair, steps: int, seed: int = 3, final: bool = True):
    """Adam lr 0.02 on one fixed batch; returns (losses before each step [and after the last], merge)."""
    _, patch, ziplora = pack
    torch.manual_seed(seed)
    merge = _merge(pack, pair)
    batches = _batches(model, patch, seed=seed)
    optimizer = torch.optim.Adam(merge.coefficient_parameters(), lr=0.02)
    patched = patch.inject(model, merge, patch.ModelView(model).module_paths())[0]
    losses = []
    with patch.loaded(patched):
        def loss_fn():
            return ziplora.ziplora_loss(merge, lambda batch: patch.prediction(patched, batch), *batches)
        for _ in range(steps):
            losses.append(ziplora.optimisation_step(merge, optimizer, loss_fn).as_floats())
        if final:
            losses.append(loss_fn().as_floats())
    return losses, merge


def test_a_few_steps_lower_the_loss_and_train_only_the_coefficients(synthetic_model, pack, pair):
    model, _ = synthetic_model
    losses, merge = _optimise(model, pack, pair, steps=2)
    assert losses[-1]["total"] < losses[0]["total"], losses
    assert losses[-1]["similarity"] < losses[0]["similarity"] == pytest.approx(len(BOTH))  # starts at cos = 1
    assert all(p.grad is None for p in model.model.parameters())  # the base weights got no gradient
    assert {n for n, p in merge.named_parameters()} == {f"layers.{_kohya(m)}.{c}" for m in BOTH for c in ("m_subject", "m_style")}


def test_cpu_runs_repeat_exactly(synthetic_model, pack, pair):
    model, _ = synthetic_model
    first = _optimise(model, pack, pair, steps=1, final=False)[1].coefficients()
    second = _optimise(model, pack, pair, steps=1, final=False)[1].coefficients()
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)
    assert any(not torch.equal(c, torch.ones_like(c)) for c in first.values())  # the steps moved them


def test_converted_merged_lora_patched_by_comfyui_computes_what_the_branch_did(synthetic_model, pack, pair):
    merge_module, patch, ziplora = pack
    model, _ = synthetic_model
    _, _, subject, style = pair
    merge = _merge(pack, pair, seed=11)
    merged = ziplora.to_merged_lora(merge, subject, style)
    assert set(merged.coefficients) == {_kohya(m) for m in BOTH}
    assert all(merged.coefficients[_kohya(m)].shape == (merged.layers[_kohya(m)].d_in, 2) for m in BOTH)
    assert {merged.layers[_kohya(m)].rank for m in BOTH} == {4 + 6} and merged.layers[_kohya(SUBJECT_ONLY)].rank == 4
    paths = patch.ModelView(model).module_paths()
    generator = torch.Generator().manual_seed(12)
    inputs = {name: torch.randn(2, 16, merge.layers[name].sides["subject"][0].d_in, generator=generator) for name in merge.layers}

    def outputs(patched):
        with patch.loaded(patched), torch.no_grad():
            return {name: patched.get_model_object(paths[name])(x) for name, x in inputs.items()}

    injected = outputs(patch.inject(model, merge, patch.ModelView(model).module_paths())[0])
    stock, _, applied, text = merge_module.apply_merged(model, None, merged)
    assert f"applied to the model: {len(merge.layers)} layers" in text
    patched = outputs(stock)
    for name in inputs:
        error = float((patched[name] - injected[name]).norm() / injected[name].norm())
        assert error <= 1e-5, (name, error)


def test_draws_index_each_models_own_schedule(synthetic_model, pack, dit_float32):
    """A drawn timestep is an index into the model's own sigmas: on an eps model the sigma its sampling gives for that
    t; on Flux (whose sigma(t) takes t in [0, 1]) the draws span the schedule instead of all landing at sigma 1."""
    adapter, _, _ = pack
    model, _ = synthetic_model
    latent = torch.zeros(1, 4, 8, 8)
    sampling = model.get_model_object("model_sampling")
    for t in (0, 499, 999):
        batch = adapter.noised_batch(model, latent, torch.zeros_like(latent), torch.tensor([t]), {})
        torch.testing.assert_close(batch.sigma.float(), sampling.sigma(torch.tensor([float(t)])).float(), rtol=1e-5, atol=0)
    flux = dit_float32["flux"]
    count = adapter.timestep_count(flux)
    flux_latent = torch.zeros(1, 16, 8, 8)
    sigmas = [float(adapter.noised_batch(flux, flux_latent, torch.zeros_like(flux_latent), torch.tensor([t]), {}).sigma)
              for t in (0, count // 2, count - 1)]
    assert sigmas[0] < 0.01 and 0.2 < sigmas[1] < 0.95 and sigmas[2] > 0.99, sigmas
