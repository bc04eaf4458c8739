"""What ComfyUI-Manager, the Comfy Registry and the template browser read from the repository."""

import json
import re
import tomllib
from pathlib import Path

import hypernet

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_is_registry_ready():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["version"] == hypernet.__version__
    assert "comfyui" not in project["project"]["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["project"]["version"])
    assert not any(dep.split("=")[0].split(">")[0].strip() == "torch" for dep in project["project"]["dependencies"])
    comfy = project["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon", "includes", "requires-comfyui"} <= set(comfy)
    assert (REPO / "docs" / "icon.png").is_file()
    requirements = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert not any(re.match(r"torch\b", line) for line in requirements)


def test_every_example_workflow_has_a_thumbnail_and_pack_nodes():
    workflows = sorted((REPO / "example_workflows").glob("*.json"))
    assert len(workflows) >= 4
    for workflow in workflows:
        assert workflow.with_suffix(".jpg").is_file(), f"{workflow.name} has no thumbnail"
        types = {node["type"] for node in json.loads(workflow.read_text())["nodes"]}
        assert any(t.startswith("LoraRar") for t in types), workflow.name
