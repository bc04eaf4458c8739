"""Why the nodes use ComfyUI's V1 node API and not the V3 schema (README, Install), rechecked on each host.

When the V3 expectations below stop holding (0.3.75 dropped, or a v0_0_2 that is a real frozen copy), the
reasons are gone: revisit the README paragraph and port the nodes to V3.
"""

import asyncio

import pytest

pytestmark = pytest.mark.host

# Whether a V3 combo's value is checked at queue time, per host: 0.3.75's execution.py checks only
# list-typed combos, and V3 declares every combo as the type "COMBO" with its options beside it.
V3_COMBO_CHECKED = {"0.3.75": False, "0.33.0": True}


def _refused(execution, class_type: str, inputs: dict) -> list[str]:
    """The error types the host's queue-time validation gives one node (empty: accepted)."""
    prompt = {"1": {"class_type": class_type, "inputs": inputs}}
    valid, errors, _ = asyncio.run(execution.validate_inputs("test", prompt, "1", {}))
    return [] if valid else [error["type"] for error in errors]


def _v3_probe():
    """The smallest V3 node with one combo, written against the versioned module the issue asked for."""
    from comfy_api.v0_0_2 import io

    class LoraRarV3Probe(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="LoraRarV3Probe", inputs=[io.Combo.Input("method", options=["lorarar", "direct"])],
                             outputs=[io.String.Output()])

        @classmethod
        def execute(cls, method):
            return io.NodeOutput(method)

    return LoraRarV3Probe


def test_our_combos_refuse_unknown_values_at_queue_time(comfy_host):
    import execution

    assert _refused(execution, "LoraRarHypernetLoader", {"hypernet": "auto"}) == []
    assert _refused(execution, "LoraRarHypernetLoader", {"hypernet": "no_such_hypernet.pth"}) == ["value_not_in_list"]


def test_a_v0_0_2_combo_is_checked_only_on_the_current_host(comfy_host, monkeypatch):
    import comfyui_version
    import execution

    nodes, _, _ = comfy_host
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "LoraRarV3Probe", _v3_probe())
    assert _refused(execution, "LoraRarV3Probe", {"method": "lorarar"}) == []
    checked = _refused(execution, "LoraRarV3Probe", {"method": "no_such_method"}) == ["value_not_in_list"]
    assert checked is V3_COMBO_CHECKED[comfyui_version.__version__]


def test_v0_0_2_is_no_pin(comfy_host):
    """comfy_api.v0_0_2 re-exports comfy_api.latest's io on both hosts: the version in the import path
    freezes nothing, the node classes are whatever the running ComfyUI's latest API is."""
    import comfy_api.latest
    import comfy_api.v0_0_2

    assert comfy_api.v0_0_2.io is comfy_api.latest.io
