"""The evaluation example workflow on a real server, judged by a real local chat-completions server."""

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.e2e.conftest import JUDGE_KEY
from tests.support.fake_judge import FakeJudge
from devkit.workflows import ui_to_api

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
IMAGES = {"lorarar_generated_1.png": (200, 60, 60), "lorarar_generated_2.png": (60, 200, 60),
          "lorarar_subject_1.png": (200, 60, 60), "lorarar_subject_2.png": (190, 70, 60),
          "lorarar_style_1.png": (60, 60, 200)}


def test_evaluate_workflow_asks_every_question_and_leaks_no_key(pack_server):
    server, _ = pack_server
    for name, colour in IMAGES.items():
        Image.new("RGB", (640, 480), colour).save(server.input_dir / name)
    workflow = json.loads((REPO / "example_workflows" / "lorarar_evaluate.json").read_text())
    prompt = ui_to_api(workflow, server.object_info())
    # generated #1 and #2: subject yes on both references, style yes; except #2's style answer is malformed
    script = ["yes", "yes", "yes", "yes", "yes", "maybe, hard to tell"]
    with FakeJudge(script) as judge:
        for node in prompt.values():
            if node["class_type"] == "LoraRarEvaluate":
                node["inputs"]["judge_url"] = judge.base_url
        entry = server.wait(server.queue_prompt(prompt), timeout=300)
        received = b"".join(judge.raw_bytes)
        requests = list(judge.requests)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(requests) == 2 * (2 + 1)  # generated x (subject refs + style refs)
    assert all(r.headers.get("Authorization") == f"Bearer {JUDGE_KEY}" for r in requests)
    assert all(r.body.get("temperature") == 0 for r in requests)
    (summary,) = [t for o in entry["outputs"].values() for t in o.get("text", []) if t.startswith("subject ")]
    assert "subject 100%" in summary and "style 50%" in summary and "1 unparsed" in summary
    assert JUDGE_KEY.encode() in received  # it was sent to the judge ...
    history = json.dumps(server.get("/history"))
    assert JUDGE_KEY not in history and JUDGE_KEY not in json.dumps(prompt)  # ... and nowhere else
    assert JUDGE_KEY not in server.log_text()
