"""UI-format workflows (what ComfyUI saves and users share) <-> API-format prompts (what POST /prompt takes)."""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED_OR_BYPASSED = (2, 4)


def _is_widget(spec) -> bool:
    """Whether the frontend shows this input as a widget (stored in widgets_values); forceInput ones are sockets."""
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def _has_control_widget(name: str, spec) -> bool:
    """The frontend adds a 'control after generate' widget after seed-like INT inputs."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed"))


def _input_specs(info: dict) -> list[tuple[str, list]]:
    inputs = info["input"]
    return [*inputs.get("required", {}).items(), *inputs.get("optional", {}).items()]


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to an API prompt using the server's /object_info for widget order.

    Raises KeyError naming the node type when the server does not know it (a missing node pack).
    """
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode") in MUTED_OR_BYPASSED or node["type"] in ("Note", "MarkdownNote"):
            continue
        if node["type"] not in object_info:
            raise KeyError(f"node type {node['type']} (node {node['id']}) is not installed")
        inputs = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values") or [])
        index = 0
        for name, spec in _input_specs(object_info[node["type"]]):
            if not _is_widget(spec) or index >= len(values):
                continue
            inputs.setdefault(name, values[index])
            index += 2 if _has_control_widget(name, spec) else 1
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def build_ui_workflow(nodes: list[dict], object_info: dict, title: str) -> dict:
    """A UI-format workflow from compact node specs.

    Each spec: {"id", "type", "pos": [x, y], "widgets": {name: value}, "links": {input: (node id, output)}}.
    Widgets not given take the node's default.
    """
    by_id = {spec["id"]: spec for spec in nodes}
    links, ui_nodes = [], []
    outputs_links: dict[tuple[int, int], list[int]] = {}
    for spec in nodes:
        for input_name, (source, output) in spec.get("links", {}).items():
            link_id = len(links) + 1
            source_info = object_info[by_id[source]["type"]]
            links.append([link_id, source, output, spec["id"], input_name, source_info["output"][output]])
            outputs_links.setdefault((source, output), []).append(link_id)
    for order, spec in enumerate(nodes):
        info = object_info[spec["type"]]
        inputs, widgets = [], []
        for name, input_spec in _input_specs(info):
            link = next((l for l in links if l[3] == spec["id"] and l[4] == name), None)
            if _is_widget(input_spec):
                options = input_spec[1] if len(input_spec) > 1 else {}
                default = input_spec[0][0] if isinstance(input_spec[0], list) and input_spec[0] else options.get("default")
                widgets.append(spec.get("widgets", {}).get(name, default))
                if _has_control_widget(name, input_spec):
                    widgets.append("fixed")
            elif link is not None or name in _input_specs_required(info):
                inputs.append({"name": name, "type": input_spec[0] if isinstance(input_spec[0], str) else "*",
                               "link": link[0] if link else None})
        outputs = [{"name": out_name, "type": out_type, "links": outputs_links.get((spec["id"], index), []),
                    "slot_index": index}
                   for index, (out_name, out_type) in enumerate(zip(info["output_name"], info["output"]))]
        ui_nodes.append({"id": spec["id"], "type": spec["type"], "pos": spec["pos"], "size": spec.get("size", [320, 130]),
                         "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                         "properties": {"Node name for S&R": spec["type"]}, "widgets_values": widgets,
                         **({"title": spec["title"]} if "title" in spec else {})})
    for link in links:
        link[4] = next(i for i, slot in enumerate(next(n for n in ui_nodes if n["id"] == link[3])["inputs"]) if slot["name"] == link[4])
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"title": title}, "version": 0.4}


def _input_specs_required(info: dict) -> dict:
    return info["input"].get("required", {})
