"""K-LoRA against a dense implementation of its published rule (devkit/dense_rule.py): top-k sums, gamma with
the 3x outlier drop, both time-scaling patterns, the choices; and what a sampling-time merge refuses, for K-LoRA
and EST-LoRA alike (EST-LoRA's own golden: test_est_lora_golden.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devkit.dense_rule import dense_k_lora_choice, dense_k_lora_gamma, dense_k_lora_scores, dense_update
from devkit.loras import random_lora, write_lora
from hypernet import methods
from hypernet.base_models import SDXL
from hypernet.errors import LoraRarError
from hypernet.lora_io import LowRankLayer, lora_from_tensors
from hypernet.merge import Strengths, merge_loras
from hypernet.methods.k_lora import gamma_of, top_k_and_l1
from hypernet.runtime import schedule_progress

REPO = Path(__file__).resolve().parents[2]
MODULES = [m for m, _, _ in SDXL.attention_linears()
           if m.startswith(("input_blocks.4.1.transformer_blocks.0.", "middle_block.1.transformer_blocks.3."))]
PROGRESS = [0.0, 0.1, 0.149, 0.151, 0.3, 0.5, 0.75, 0.99, 1.0]
PATTERNS = {"k-lora": "s*", "k-lora-linear": "linear"}
SWITCHING = ["k-lora", "k-lora-linear", "est-lora"]  # the sampling-time methods on K-LoRA's switch


def relative(actual, expected):
    return abs(actual - expected) / abs(expected)


def _stems():
    return ["lora_unet_" + m.replace(".", "_") for m in MODULES]


@pytest.fixture(scope="module")
def pair():
    subject = random_lora(rank=8, seed=11, modules=MODULES, alpha=4.0, std=0.05)
    style = random_lora(rank=5, seed=12, modules=MODULES, std=0.04)
    # one layer where the subject is 20x stronger: its ratio is an outlier that gamma must drop
    stem = _stems()[3]
    subject[f"{stem}.lora_up.weight"] = subject[f"{stem}.lora_up.weight"] * 20
    return subject, style


def _dense_reference(subject, style, a, b):
    updates = {stem: (a * dense_update(subject, stem), b * dense_update(style, stem)) for stem in _stems()}
    scores = {stem: dense_k_lora_scores(c, s, 8 * 5) for stem, (c, s) in updates.items()}
    return updates, scores, dense_k_lora_gamma(list(updates.values()))


@pytest.mark.parametrize("method", ["k-lora", "k-lora-linear"])
@pytest.mark.parametrize("strengths", [(1.0, 1.0), (0.6, 1.7)])
def test_k_lora_scores_gamma_and_choices_match_the_dense_rule(pair, method, strengths):
    subject, style = pair
    merged = merge_loras(lora_from_tensors(subject, "s.safetensors"), lora_from_tensors(style, "t.safetensors"), None,
                         method=method, dtype=torch.float32, strengths=Strengths(*strengths))
    updates, scores, gamma = _dense_reference(subject, style, *strengths)
    switch = merged.runtime
    assert merged.layers == {} and set(switch.layers) == set(updates)
    assert merged.report.count("switched") == len(MODULES) and switch.pattern == PATTERNS[method]
    assert relative(switch.gamma, gamma) <= 1e-5
    for stem, layer in switch.layers.items():
        assert relative(layer.subject_score, scores[stem][0]) <= 1e-5
        assert relative(layer.style_score, scores[stem][1]) <= 1e-5
    alpha, beta = merged.report.params["alpha"], merged.report.params["beta"]
    seen = set()
    for p in PROGRESS:
        chosen = switch.choose(p)
        for stem in updates:
            assert chosen[stem] == dense_k_lora_choice(*scores[stem], gamma, p, PATTERNS[method], alpha, beta), (stem, p)
        seen.update(chosen.values())
    assert seen == {"subject", "style"}  # the test pair exercises both sides
    assert merged.report.sampling["switched_layers"] == len(MODULES)
    assert "layers switched per step" in merged.report.to_text()


def test_the_outlier_ratio_is_dropped_from_gamma(pair):
    subject, style = pair
    updates, _, gamma = _dense_reference(subject, style, 1.0, 1.0)
    ratios = [float(c.abs().sum() / s.abs().sum()) for c, s in updates.values()]
    mean = sum(ratios) / len(ratios)
    assert max(ratios) >= 3 * mean  # the 20x layer is an outlier ...
    assert gamma < mean and relative(gamma_of(ratios), gamma) <= 1e-12  # ... and gamma leaves it out


@pytest.mark.parametrize("columns", [1, 7, 256])
def test_top_k_in_slabs_equals_the_dense_top_k(columns):
    generator = torch.Generator().manual_seed(5)
    layer = LowRankLayer(torch.randn(96, 6, generator=generator), torch.randn(6, 130, generator=generator), scale=0.7)
    dense = (layer.up.double() @ layer.down.double()) * layer.scale
    for k in (1, 36, 96 * 130, 10**6):
        top, l1 = top_k_and_l1(layer, k, columns=columns)
        expected = float(torch.topk(dense.abs().flatten(), min(k, dense.numel())).values.sum())
        assert relative(top, expected) <= 1e-5 and relative(l1, float(dense.abs().sum())) <= 1e-5


def test_k_lora_never_forms_a_dense_update(pair):
    """Top-k and L1 come from slabs of 256 columns: no op returns a d_out x d_in tensor (the guard of
    tests/unit/test_no_dense_update.py)."""
    from tests.unit.test_no_dense_update import LargestOutputs

    subject, style = pair
    subject, style = lora_from_tensors(subject, "s.safetensors"), lora_from_tensors(style, "t.safetensors")
    smallest_dense = min(layer.d_out * layer.d_in for layer in subject.layers.values())
    with LargestOutputs() as watch:
        merged = merge_loras(subject, style, None, method="k-lora")
    assert len(merged.runtime.layers) == len(MODULES)
    numel, op = watch.largest
    assert 0 < numel < smallest_dense, f"{op} returned {numel} elements: a dense update ({smallest_dense}+) was formed"


def test_progress_is_the_place_in_the_schedule():
    schedule = [14.6, 6.0, 2.5, 0.9, 0.0]
    assert schedule_progress(14.6, schedule) == 0.0 and schedule_progress(20.0, schedule) == 0.0
    assert schedule_progress(2.5, schedule) == 0.5
    assert abs(schedule_progress(1.7, schedule) - (2 + 0.5) / 4) < 1e-12  # between two points: interpolated
    assert schedule_progress(0.0, schedule) == 1.0


@pytest.mark.parametrize("params, message", [({"alpha": 0.0}, "k-lora alpha 0.0: must be between 0.01 and 10"),
                                             ({"beta": -1.0}, "k-lora beta -1.0: must be between 0 and 10"),
                                             ({"alpha": float("nan")}, "k-lora alpha nan"),
                                             ({"mu": 0.5}, "method k-lora has no parameter mu")])
def test_parameters_out_of_range_are_one_line(pair, params, message):
    subject, style = pair
    with pytest.raises(LoraRarError, match=message) as error:
        merge_loras(lora_from_tensors(subject, "s.safetensors"), lora_from_tensors(style, "t.safetensors"), None,
                    method="k-lora", params=params)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("method", ["k-lora", "est-lora"])
def test_progress_outside_zero_to_one_is_refused(pair, method):
    subject, style = pair
    merged = merge_loras(lora_from_tensors(subject, "s.safetensors"), lora_from_tensors(style, "t.safetensors"), None,
                         method=method)
    with pytest.raises(LoraRarError, match=f"^{method} progress 1.5: must be between 0 and 1"):
        merged.runtime.choose(1.5)


def test_k_lora_is_listed_after_np_lora_current_pattern_first():
    """After np-lora: saved workflows hold the methods' parameter widgets by position (np_lora_mu came first)."""
    assert methods.names()[:6] == ("lorarar", "direct", "np-lora", "b-lora", "k-lora", "k-lora-linear")


@pytest.mark.parametrize("method", ["k-lora", "est-lora"])
def test_a_sampling_time_merge_cannot_become_a_file(pair, method):
    subject, style = pair
    merged = merge_loras(lora_from_tensors(subject, "s.safetensors"), lora_from_tensors(style, "t.safetensors"), None,
                         method=method)
    with pytest.raises(LoraRarError, match=f"{method} chooses per step at sampling time; it cannot be saved as one LoRA file"):
        merged.kohya_state_dict()


@pytest.mark.parametrize("method", SWITCHING)
def test_the_cli_refuses_k_lora_in_one_line(pair, tmp_path, method):
    subject = write_lora(tmp_path / "dog.safetensors", pair[0])
    style = write_lora(tmp_path / "ink.safetensors", pair[1])
    out = tmp_path / "merged.safetensors"
    result = subprocess.run([sys.executable, "-m", "hypernet", "merge", "--method", method, "--subject", str(subject),
                             "--style", str(style), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and not out.exists()
    assert f"{method} chooses per step at sampling time; it cannot be saved as one LoRA file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("method", SWITCHING)
def test_a_zero_subject_leaves_every_layer_to_the_style(pair, method):
    """Subject strength 0 (inside the node's range): every L1 ratio and gamma are 0; the rule must not divide by
    them, and the side with an update, the style, is chosen everywhere (style strength 0: the subject)."""
    subject, style = (lora_from_tensors(t, n) for t, n in ((pair[0], "s.safetensors"), (pair[1], "t.safetensors")))
    for strengths, side in ((Strengths(0.0, 1.0), "style"), (Strengths(1.0, 0.0), "subject")):
        switch = merge_loras(subject, style, None, method=method, strengths=strengths).runtime
        for p in (0.0, 0.5, 1.0):
            assert set(switch.choose(p).values()) == {side}


def _as_dit(tensors: dict) -> dict:
    """The same factors under names no UNet parser knows (a DiT's): only the roles a model gives can place them."""
    return {key.replace("lora_unet_", "lora_unet_blocks_0_"): value for key, value in tensors.items()}


@pytest.mark.parametrize("method", ["k-lora", "est-lora"])
def test_roles_from_the_model_decide_what_is_switched(pair, method):
    """With the model's roles, K-LoRA switches exactly the layers they call attention, whatever their names;
    a linear fusing attention with the MLP is summed with its reason, and the report counts the rule's layers."""
    subject_sd, style_sd = (_as_dit(sd) for sd in pair)
    subject, style = lora_from_tensors(subject_sd, "s"), lora_from_tensors(style_sd, "t")
    names = sorted(subject.layers)
    roles = {names[0]: "to_q", names[1]: "qkv", names[2]: "qkv+mlp"}
    merged = merge_loras(subject, style, None, method, roles=roles, family="WAN21_T2V")
    assert sorted(merged.runtime.layers) == names[:2]
    assert merged.report.actions[names[2]] == "summed"
    assert "attention fused with the MLP" in merged.report.reasons[names[2]]
    assert merged.report.own_rule_layers == 2
    assert f"{method}'s own rule: 2 of" in merged.report.to_text()


@pytest.mark.parametrize("method", ["k-lora", "est-lora"])
def test_no_known_attention_refuses_naming_the_family(pair, method):
    """A model whose attention modules the pack does not know (roles {}) or only fused-with-MLP linears: K-LoRA
    refuses in one line naming the family, never becomes a plain sum under its name."""
    subject, style = (lora_from_tensors(_as_dit(sd), n) for sd, n in zip(pair, "st"))
    for roles in ({}, {name: "qkv+mlp" for name in subject.layers}):
        with pytest.raises(LoraRarError, match=rf"^{method}: no attention projection is known in this Krea2 model") as info:
            merge_loras(subject, style, None, method, roles=roles, family="Krea2")
        assert "\n" not in str(info.value)


def test_no_shared_attention_layer_refuses(pair):
    """Roles exist, but the two LoRAs share none of those layers: refused, not a sum called K-LoRA."""
    subject, style = (lora_from_tensors(_as_dit(sd), n) for sd, n in zip(pair, "st"))
    with pytest.raises(LoraRarError, match="k-lora found no attention projection in both LoRAs"):
        merge_loras(subject, style, None, "k-lora", roles={"lora_unet_elsewhere": "to_q"}, family="Flux2")


def test_lorarar_refuses_a_model_with_no_known_attention_like_k_lora(pair):
    """Every method whose rule is for attention projections gets the same one-line refusal (hypernet/merge.py),
    not only K-LoRA: here LoRA.rar with a hypernet of the LoRAs' width on a model whose roles are unknown."""
    from hypernet.model import new_hypernet

    subject, style = (lora_from_tensors(_as_dit(sd), n) for sd, n in zip(pair, "st"))
    net = new_hypernet({layer.d_out for layer in subject.layers.values()})
    net.model_classes = ("HunyuanVideo",)  # as a file trained for that family says (lorarar_model_classes)
    with pytest.raises(LoraRarError, match=r"^lorarar: no attention projection is known in this HunyuanVideo model"):
        merge_loras(subject, style, net, "lorarar", roles={}, family="HunyuanVideo")
