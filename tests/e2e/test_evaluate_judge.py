"""LoraRarEvaluate on a real ComfyUI server against judges nobody should trust (real HTTP servers on 127.0.0.1).

The server holds a planted key. Every failure mode the fake judge knows is provoked through /prompt; then
/history (errors, tracebacks, the table shown by Preview Any), the server log and the tracebacks are searched
for every 8-character stretch of the key, read through whitespace and invisible characters. Cancel is tried against a
judge that never answers.
"""

import contextlib
import json
import time

import pytest

from devkit.comfy_server import ComfyServer
from tests.support.fake_judge import FakeJudge, key_stretches

pytestmark = pytest.mark.e2e

KEY = "sk-e2e-hostile-5c8d1f3a9b7e42"
ENV = {"LORARAR_JUDGE_API_KEY": KEY, "LORARAR_JUDGE_URL": "",  # no operator list: keys go to loopback only
       "LORARAR_CRLF_KEY": KEY + "\r\nX-Injected: 1", "LORARAR_SPACE_KEY": KEY[:9] + " " + KEY[9:]}


def windows(text: str) -> list[str]:
    return key_stretches(text, KEY)


@pytest.fixture(scope="module")
def server():
    with ComfyServer(env=ENV) as comfy:  # no models: these graphs need none
        yield comfy


def graph(url: str, api_key_env: str = "LORARAR_JUDGE_API_KEY", timeout: float = 2.0, retries: int = 0) -> dict:
    """Empty Image -> LoRA.rar Evaluate -> Preview Any of its table (so stored answers reach /history)."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0xC83232}},
        "2": {"class_type": "LoraRarEvaluate", "inputs": {
            "images": ["1", 0], "subject_references": ["1", 0], "style_references": ["1", 0], "style_name": "ink",
            "judge_url": url, "judge_model": "critic", "api_key_env": api_key_env, "timeout_s": timeout,
            "retries": retries}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}},
    }


def errors(entry: dict) -> list[dict]:
    return [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]


SUCCEEDS = ["echo", "echo_part", "echo_spaced", "echo_invisible", "echo_parts", "nested", "object", "number", "parts",
            "nested_body", 'raw:{"choices": []}', 'raw:{"choices": [{"message": {}}]}', 'raw:{"choices": "yes"}']
FAILS = {"401": "HTTP 401", "500": "HTTP 500", "echo_escaped": "HTTP 400", "echo_reason": "HTTP 500",
         "echo_status": "BadStatusLine", "echo_header": "HTTP 401", "drip": "no answer within 1 s",
         "drip_headers": "no answer within 1 s", "huge": "refused an answer over", "huge_chunked": "refused an answer over",
         "badjson": "not a chat completion", "redirect:http://127.0.0.1:9/v1/chat/completions": "HTTP 302"}
REFUSED = {  # (judge_url, api_key_env) -> the one line expected; nothing is sent
    ("http://[::1%25lo]/v1", "LORARAR_JUDGE_API_KEY"): "IPv6 zone IDs (%25...) are not supported",
    ("https://[::1:50]/v1", "LORARAR_JUDGE_API_KEY"): "refusing to send the API key to a host the server's operator did not list",
    ("https://judge.example.com/v1", "LORARAR_JUDGE_API_KEY"): "refusing to send the API key to a host the server's operator did not list",
    ("http://192.0.2.1:9/v1", "LORARAR_JUDGE_API_KEY"): "refusing to send the API key over plain http",
    ("LOCAL", "LORARAR_CRLF_KEY"): "$LORARAR_CRLF_KEY holds characters an HTTP header cannot carry",
    ("LOCAL", "LORARAR_SPACE_KEY"): "$LORARAR_SPACE_KEY holds characters an HTTP header cannot carry",
}  # (a key pasted into api_key_env is in the workflow itself, so in /history: tests/host covers its refusal)


def test_no_failure_mode_leaks_any_part_of_the_key(server):
    with contextlib.ExitStack() as stack:
        judges = {mode: stack.enter_context(FakeJudge(default=mode, drip_s=0.3)) for mode in [*SUCCEEDS, *FAILS]}
        local = stack.enter_context(FakeJudge())
        queued = {mode: server.queue_prompt(graph(judge.base_url, timeout=1.0)) for mode, judge in judges.items()}
        refused = {case: server.queue_prompt(graph(local.base_url if case[0] == "LOCAL" else case[0], case[1]))
                   for case in REFUSED}
        entries = {name: server.wait(prompt_id, timeout=120) for name, prompt_id in {**queued, **refused}.items()}
    assert local.raw_bytes == []  # refused before anything was sent
    for mode in [*SUCCEEDS, "echo"]:
        assert judges[mode].requests[0].headers["Authorization"] == f"Bearer {KEY}"  # the key did go to the judge
    for mode in SUCCEEDS:
        assert entries[mode]["status"]["status_str"] == "success", (mode, errors(entries[mode]))
        (table,) = entries[mode]["outputs"]["3"]["text"]
        verdicts = [v for image in json.loads(table)["images"] for part in ("subject", "style")
                    for v in image[part]["verdicts"]]
        assert verdicts == (["yes", "yes"] if mode.startswith("echo") else ["unparsed", "unparsed"]), (mode, table)
    for name, expected in [*FAILS.items(), *REFUSED.items()]:
        (error,) = errors(entries[name])
        message = error["exception_message"].strip()
        assert expected in message and "\n" not in message, (name, message)
    history = json.dumps(server.get("/history"), ensure_ascii=False)
    assert not windows(history), windows(history)
    assert not windows(server.log_text()), windows(server.log_text())


def test_ipv6_urls_without_a_port_are_one_line_errors(server):
    """Unbracketed by http.client, these used to raise InvalidURL (a raw exception) or reach a port hidden in
    the address; now they connect to the scheme's port, and fail there in one line."""
    for url in ["http://[::ffff:127.0.0.1]/v1", "http://[::1]/v1"]:
        entry = server.wait(server.queue_prompt(graph(url, api_key_env="")), timeout=60)
        (error,) = errors(entry)
        message = error["exception_message"].strip()
        assert f"judge {url}/chat/completions" in message and "\n" not in message, message
        assert error["exception_type"].endswith("JudgeError"), error["exception_type"]


def test_cancel_stops_an_evaluation_waiting_on_a_judge_and_the_next_prompt_runs(server):
    with FakeJudge(default="hang") as hanging:
        prompt_id = server.queue_prompt(graph(hanging.base_url, timeout=600.0, retries=3))
        deadline = time.monotonic() + 60
        while not hanging.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hanging.requests, "the evaluation never reached the judge"
        cancelled_at = time.monotonic()
        status, _ = server._request("POST", "/interrupt", {})
        assert status == 200
        entry = server.wait(prompt_id, timeout=30, poll=0.05)
        assert time.monotonic() - cancelled_at < 5  # not the 600 s timeout, nor its retries
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [m[0] for m in entry["status"]["messages"]]
    with FakeJudge() as judge:
        after = server.wait(server.queue_prompt(graph(judge.base_url)), timeout=60)
    assert after["status"]["status_str"] == "success" and len(judge.requests) == 2
