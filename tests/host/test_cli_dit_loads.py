"""The CLI's merge of DiT LoRAs (``--base any``) loads with ComfyUI's stock ``comfy.sd.load_lora_for_models``.

On the synthetic Flux and SD3.5 (devkit.synthetic_dit, loaded as tests/host/test_synthetic_dit.py loads them):
the written file patches exactly the native linears the input LoRAs train, fused q/k/v pieces included, and
each weight changes by the merged update: for direct, a * dW_subject + b * dW_style computed densely from the
inputs; for NP-LoRA, the update the written factors give (their values are checked against the dense formula
by tests/host/test_cli_any_family.py).
"""

import pytest
import torch

from devkit.dit_loras import dense_updates
from devkit.synthetic_dit import FAMILIES
from hypernet.lora_io import split_key
from tests.host.test_cli_any_family import PAIRS, write_pair
from tests.host.test_synthetic_dit import _skip_if_host_lacks, _weight_deltas, dit_host, patchers  # noqa: F401
from tests.unit.test_cli_any_family import STRENGTHS, merge

pytestmark = pytest.mark.host

_AS_INPUT = {"up": "lora_B.weight", "down": "lora_A.weight"}  # the written roles in the PEFT spelling


def written_as(fmt: str, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The written file in the input format ``fmt`` (kohya: as it is; peft: lora_up/down as lora_B/A, alpha = rank
    so scale 1), for devkit.dit_loras.dense_updates to place each layer on its native rows."""
    if fmt == "kohya":
        return merged
    out = {}
    for key, tensor in merged.items():
        stem, role = split_key(key)
        if role in _AS_INPUT:
            out[f"{stem}.{_AS_INPUT[role]}"] = tensor
    return out


def expected_updates(family, pair, method, subject, style, merged, root) -> dict[str, torch.Tensor]:
    """Model weight key -> the change the merged LoRA must make to it."""
    subject_fmt, style_fmt = PAIRS[pair]
    if method == "direct":
        a, b = STRENGTHS
        trained_s, trained_t = dense_updates(family, subject_fmt, subject, root), dense_updates(family, style_fmt, style, root)
        updates = {key: a * trained_s[key] + b * trained_t[key] for key in trained_s}
    else:
        updates = dense_updates(family, subject_fmt, written_as(subject_fmt, merged), root)
    return {f"diffusion_model.{key}": update for key, update in updates.items()}


@pytest.mark.parametrize("method", ["direct", "np-lora"])
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_merged_file_patches_the_trained_linears_with_the_merged_update(dit_host, patchers, tmp_path, name,
                                                                            pair, method):
    import comfy.sd
    import comfy.utils

    version, root = dit_host
    family = FAMILIES[name]
    _skip_if_host_lacks(family, version)
    subject, style = write_pair(tmp_path, family, pair, root)
    out = merge(tmp_path, subject, style, method, "--base", "any")
    inputs = [comfy.utils.load_torch_file(str(path)) for path in (subject, style, out)]
    expected = expected_updates(family, pair, method, *inputs, root)
    trained = {f"diffusion_model.{key}" for key in dense_updates(family, PAIRS[pair][0], inputs[0], root)}

    patched, _ = comfy.sd.load_lora_for_models(patchers[name][0], None, inputs[2], 1.0, 0.0)

    assert set(patched.patches) == trained == set(expected)
    deltas = _weight_deltas(patched, list(expected))
    assert set(deltas) == set(expected)
    for key, update in expected.items():
        torch.testing.assert_close(deltas[key], update, atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
