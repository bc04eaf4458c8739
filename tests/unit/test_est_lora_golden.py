"""EST-LoRA against a plain dense implementation of its published rule, written here: every update formed as the
d_out x d_in matrix B A (strength and alpha included), its squared Frobenius norm, gamma from the L1 ratios with the
3x outlier drop, s(p) with the "s*" wrap, the choice per layer at several p; a fused q/k/v layer whose style comes as
three joined pieces; and a pair where the energy rule and K-LoRA's top-k rule choose differently. What both
sampling-time methods share (refusing to save, zero strengths, the progress range) is in test_klora_golden.py; that no
dense update is formed, in test_no_dense_update.py (every registered method)."""

import math

import pytest
import torch

from devkit.loras import random_lora
from hypernet import methods
from hypernet.base_models import SDXL
from hypernet.errors import LoraRarError
from hypernet.lora_io import LowRankLayer, lora_from_tensors
from hypernet.merge import Strengths, merge_loras
from hypernet.methods.est_lora import frobenius_energy
from hypernet.model_keys import lora_for_model

MODULES = [m for m, _, _ in SDXL.attention_linears()
           if m.startswith(("input_blocks.4.1.transformer_blocks.0.", "middle_block.1.transformer_blocks.3."))]
PROGRESS = [0.0, 0.1, 0.149, 0.151, 0.3, 0.5, 0.75, 0.99, 1.0]


# --- the published rule, dense -------------------------------------------------------------------------------------

def dense_dw(state_dict: dict, stem: str, strength: float) -> torch.Tensor:
    """dW = strength * alpha / rank * up @ down in float64 (kohya keys; no alpha: scale 1)."""
    up = state_dict[f"{stem}.lora_up.weight"].double().flatten(1)
    down = state_dict[f"{stem}.lora_down.weight"].double().flatten(1)
    alpha = state_dict.get(f"{stem}.alpha")
    return strength * (float(alpha) / down.shape[0] if alpha is not None else 1.0) * (up @ down)


def dense_energy(dw: torch.Tensor) -> float:
    return float((dw * dw).sum())


def dense_gamma(updates: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """mean of rho = L1(dW_c) / L1(dW_s) over layers, then the mean again over the rho below 3x that mean."""
    rho = [float(c.abs().sum()) / float(s.abs().sum()) for c, s in updates]
    mean = sum(rho) / len(rho)
    kept = [r for r in rho if r < 3 * mean]
    return sum(kept) / len(kept)


def dense_s(p: float, alpha: float = 1.5, beta: float = 1.275) -> float:
    return math.fmod(alpha * p + beta, alpha)


def dense_choice(energy_c: float, energy_s: float, gamma: float, p: float, alpha=1.5, beta=1.275) -> str:
    return "subject" if energy_c / gamma > dense_s(p, alpha, beta) * energy_s else "style"


def dense_top_k_choice(dw_c, dw_s, gamma, p, k, alpha=1.5, beta=1.275) -> str:
    """K-LoRA's rule on the same updates, to show the two rules are not the same."""
    top = [float(torch.topk(dw.abs().flatten(), k).values.sum()) for dw in (dw_c, dw_s)]
    return "subject" if top[0] / gamma > dense_s(p, alpha, beta) * top[1] else "style"


# --- tests ---------------------------------------------------------------------------------------------------------

def relative(actual, expected):
    return abs(actual - expected) / abs(expected)


def _stems():
    return ["lora_unet_" + m.replace(".", "_") for m in MODULES]


@pytest.fixture(scope="module")
def pair():
    subject = random_lora(rank=8, seed=11, modules=MODULES, alpha=4.0, std=0.05)
    style = random_lora(rank=5, seed=12, modules=MODULES, std=0.04)
    stem = _stems()[3]  # 20x stronger: an outlier ratio gamma must drop
    subject[f"{stem}.lora_up.weight"] = subject[f"{stem}.lora_up.weight"] * 20
    return subject, style


@pytest.mark.parametrize("strengths, params", [((1.0, 1.0), {}), ((0.6, 1.7), {}),
                                               ((1.0, 1.0), {"alpha": 1.2, "beta": 0.4})])
def test_energies_gamma_and_choices_match_the_dense_rule(pair, strengths, params):
    subject, style = pair
    merged = merge_loras(lora_from_tensors(subject, "s.safetensors"), lora_from_tensors(style, "t.safetensors"), None,
                         method="est-lora", dtype=torch.float32, strengths=Strengths(*strengths), params=params)
    updates = {stem: (dense_dw(subject, stem, strengths[0]), dense_dw(style, stem, strengths[1])) for stem in _stems()}
    gamma = dense_gamma(list(updates.values()))
    rho = [float(c.abs().sum() / s.abs().sum()) for c, s in updates.values()]
    assert max(rho) >= 3 * sum(rho) / len(rho)  # the outlier is there, and dense_gamma drops it
    switch = merged.runtime
    assert merged.layers == {} and set(switch.layers) == set(updates) and switch.method == "est-lora"
    assert switch.pattern == "s*" and relative(switch.gamma, gamma) <= 1e-5
    alpha, beta = params.get("alpha", 1.5), params.get("beta", 1.275)
    assert (merged.report.params["alpha"], merged.report.params["beta"]) == (alpha, beta)
    seen = set()
    for stem, (dw_c, dw_s) in updates.items():
        layer = switch.layers[stem]
        assert relative(layer.subject_score, dense_energy(dw_c)) <= 1e-5
        assert relative(layer.style_score, dense_energy(dw_s)) <= 1e-5
    for p in PROGRESS:
        chosen = switch.choose(p)
        for stem, (dw_c, dw_s) in updates.items():
            expected = dense_choice(dense_energy(dw_c), dense_energy(dw_s), gamma, p, alpha, beta)
            assert chosen[stem] == expected, (stem, p)
        seen.update(chosen.values())
    assert seen == {"subject", "style"}
    assert merged.report.count("switched") == len(MODULES)
    assert "EST-LoRA: the subject or the style, chosen per sampling step by update energy" in merged.report.to_text()


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_the_energy_from_the_factors_equals_the_dense_norm(scale):
    generator = torch.Generator().manual_seed(3)
    layer = LowRankLayer(torch.randn(96, 7, generator=generator), torch.randn(7, 130, generator=generator), scale=scale)
    dense = scale * (layer.up.double() @ layer.down.double())
    assert relative(frobenius_energy(layer), float(torch.linalg.matrix_norm(dense) ** 2)) <= 1e-12


def test_the_energy_rule_and_the_top_k_rule_choose_differently():
    """One layer, dW_c a single entry a, dW_s the entry b everywhere (N entries), a = b, k = 1. gamma = a / (N b).
    Top-k: N b > s(p) b, the subject at every p. Energy: N a b > s(p) N b^2, the subject only where s(p) < 1:
    at p = 0 (s = 1.275) EST takes the style, at p = 0.5 (s = 0.525) the subject."""
    module = MODULES[0]
    stem = "lora_unet_" + module.replace(".", "_")
    d_out, d_in = next((o, i) for m, o, i in SDXL.attention_linears() if m == module)
    one_hot_up, one_hot_down = torch.zeros(d_out, 1), torch.zeros(1, d_in)
    one_hot_up[0, 0], one_hot_down[0, 0] = 0.03, 1.0
    subject = {f"{stem}.lora_up.weight": one_hot_up, f"{stem}.lora_down.weight": one_hot_down}
    style = {f"{stem}.lora_up.weight": torch.full((d_out, 1), 0.03), f"{stem}.lora_down.weight": torch.ones(1, d_in)}
    dw_c, dw_s = dense_dw(subject, stem, 1.0), dense_dw(style, stem, 1.0)
    gamma = dense_gamma([(dw_c, dw_s)])
    files = lora_from_tensors(subject, "s.safetensors"), lora_from_tensors(style, "t.safetensors")
    est = merge_loras(*files, None, method="est-lora").runtime
    k_lora = merge_loras(*files, None, method="k-lora").runtime
    differ = []
    for p in PROGRESS:
        energy_rule = dense_choice(dense_energy(dw_c), dense_energy(dw_s), gamma, p)
        assert est.choose(p)[stem] == energy_rule
        assert k_lora.choose(p)[stem] == dense_top_k_choice(dw_c, dw_s, gamma, p, 1) == "subject"
        if energy_rule != "subject":
            differ.append(p)
    assert 0.0 in differ and 0.5 not in differ


def test_a_fused_qkv_with_a_style_in_three_joined_pieces_matches_the_dense_rule():
    """A DiT-style fused q/k/v linear (96 x 32): the subject as one kohya layer, the style as diffusers q, k, v pieces
    that the key map sends to row bands of it (joined into one layer of summed rank, up block-diagonal); plus an
    output projection. Energies, gamma and choices as the dense rule on the dense (concatenated) updates."""
    generator = torch.Generator().manual_seed(9)
    qkv, proj = "diffusion_model.blk.qkv.weight", "diffusion_model.blk.proj.weight"
    shapes = {qkv: (96, 32), proj: (32, 32)}
    key_map = {"lora_unet_blk_qkv": qkv, "lora_unet_blk_proj": proj, "t.proj": proj,
               **{f"t.{n}": (qkv, (0, 32 * i, 32)) for i, n in enumerate("qkv")}}
    subject = {"lora_unet_blk_qkv.lora_up.weight": torch.randn(96, 4, generator=generator) * 0.1,
               "lora_unet_blk_qkv.lora_down.weight": torch.randn(4, 32, generator=generator) * 0.1,
               "lora_unet_blk_qkv.alpha": torch.tensor(2.0),
               "lora_unet_blk_proj.lora_up.weight": torch.randn(32, 4, generator=generator) * 0.1,
               "lora_unet_blk_proj.lora_down.weight": torch.randn(4, 32, generator=generator) * 0.1}
    style = {}
    for n in ("q", "k", "v", "proj"):
        style[f"t.{n}.lora_A.weight"] = torch.randn(3, 32, generator=generator) * 0.1
        style[f"t.{n}.lora_B.weight"] = torch.randn(32, 3, generator=generator) * 0.08
    subject_file = lora_for_model(subject, "s.safetensors", key_map, shapes)
    style_file = lora_for_model(style, "t.safetensors", key_map, shapes)
    roles = {"lora_unet_blk_qkv": "qkv", "lora_unet_blk_proj": "to_out"}
    assert set(subject_file.layers) == set(style_file.layers) == set(roles)
    merged = merge_loras(subject_file, style_file, None, "est-lora", roles=roles, family="Flux",
                         strengths=Strengths(0.9, 1.3))
    dense_style = {"lora_unet_blk_qkv": torch.cat([style[f"t.{n}.lora_B.weight"].double()
                                                   @ style[f"t.{n}.lora_A.weight"].double() for n in "qkv"]),
                   "lora_unet_blk_proj": style["t.proj.lora_B.weight"].double() @ style["t.proj.lora_A.weight"].double()}
    updates = {name: (dense_dw(subject, name, 0.9), 1.3 * dense_style[name]) for name in roles}
    gamma = dense_gamma(list(updates.values()))
    switch = merged.runtime
    assert set(switch.layers) == set(roles) and switch.layers["lora_unet_blk_qkv"].style.rank == 9
    assert relative(switch.gamma, gamma) <= 1e-5
    seen = set()
    for name, (dw_c, dw_s) in updates.items():
        assert relative(switch.layers[name].subject_score, dense_energy(dw_c)) <= 1e-5
        assert relative(switch.layers[name].style_score, dense_energy(dw_s)) <= 1e-5
        for p in PROGRESS:
            chosen = switch.choose(p)[name]
            assert chosen == dense_choice(dense_energy(dw_c), dense_energy(dw_s), gamma, p), (name, p)
            seen.add(chosen)
    assert seen == {"subject", "style"}


def test_an_all_zero_style_lora_leaves_every_layer_to_the_subject(pair):
    """A style file of zeros (every energy and L1 0: no ratio, gamma 1): nothing divides by zero, the subject is
    chosen everywhere; an all-zero subject gives the style everywhere."""
    subject, style = pair
    for zeroed, side in ((style, "subject"), (subject, "style")):
        zeros = {key: torch.zeros_like(value) for key, value in zeroed.items()}
        files = [lora_from_tensors(zeros if sd is zeroed else sd, n) for sd, n in ((subject, "s"), (style, "t"))]
        switch = merge_loras(*files, None, method="est-lora").runtime
        for p in (0.0, 0.5, 1.0):
            assert set(switch.choose(p).values()) == {side}


def test_scores_too_large_for_float32_are_one_line(pair):
    subject, style = (dict(sd) for sd in pair)
    stem = _stems()[0]
    subject[f"{stem}.lora_up.weight"] = subject[f"{stem}.lora_up.weight"] * 1e22
    subject[f"{stem}.lora_down.weight"] = subject[f"{stem}.lora_down.weight"] * 1e22
    with pytest.raises(LoraRarError, match=r"est-lora's squared Frobenius norms or L1 norms are not finite") as error:
        merge_loras(lora_from_tensors(subject, "s"), lora_from_tensors(style, "t"), None, method="est-lora")
    assert "\n" not in str(error.value)


def test_est_lora_comes_after_every_existing_method_with_the_flux_defaults():
    """Saved workflows hold the methods' parameter widgets by position: est-lora's come after all of 0.2.0's."""
    assert methods.names()[:7] == ("lorarar", "direct", "np-lora", "b-lora", "k-lora", "k-lora-linear", "zip-lora")
    assert methods.names()[7] == "est-lora"
    method = methods.get("est-lora")
    assert (method.since, method.position) == ("0.2.0", 6)  # its place, as test_methods.py pins the published ones'
    assert method.sampling_time and method.needs_roles
    assert {p.name: p.default for p in method.params} == {"alpha": 1.5, "beta": 1.275}
    assert "DINO" in method.help and "DINO" in next(p.help for p in method.params if p.name == "beta")
