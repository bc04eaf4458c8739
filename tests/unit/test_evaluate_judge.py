"""The chat-completions judge client against a real HTTP server on 127.0.0.1 (tests/support/fake_judge.py)."""

import base64
import io
import time

import pytest
from PIL import Image

from hypernet.evaluation.judge import ChatCompletionsJudge, JudgeError, chat_completions_url, check_key_destination
from tests.support.fake_judge import FakeJudge
from devkit.comfy_server import free_port

KEY = "sk-test-0123456789-secret"


@pytest.fixture(autouse=True)
def _no_pinned_url(monkeypatch):
    monkeypatch.delenv("LORARAR_JUDGE_URL", raising=False)  # the operator's pin, set per test where it matters


def _judge(server, **kwargs):
    kwargs.setdefault("retries", 2)
    kwargs.setdefault("backoff", 0.01)
    return ChatCompletionsJudge(server.base_url if isinstance(server, FakeJudge) else server, "llava-critic-7b", **kwargs)


def _picture(size=(40, 30), colour=(200, 10, 10)):
    return Image.new("RGB", size, colour)


def test_request_is_a_greedy_chat_completion_with_png_data_urls(monkeypatch):
    monkeypatch.delenv("LORARAR_JUDGE_API_KEY", raising=False)
    with FakeJudge(["Yes."]) as server:
        answer = _judge(server).ask("Same subject?", [_picture(), _picture((20, 20), (0, 0, 255))])
    assert answer == "Yes."
    (request,) = server.requests
    body = request.body
    assert request.path == "/v1/chat/completions"
    assert body["model"] == "llava-critic-7b" and body["temperature"] == 0 and body["stream"] is False
    assert request.question == "Same subject?"
    assert [part["type"] for part in body["messages"][0]["content"]] == ["image_url", "image_url", "text"]
    decoded = []
    for url in request.image_urls:
        assert url.startswith("data:image/png;base64,")
        decoded.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert [(d.size, d.getpixel((0, 0))) for d in decoded] == [((40, 30), (200, 10, 10)), ((20, 20), (0, 0, 255))]
    assert "Authorization" not in request.headers  # no variable set: no key sent


def test_key_from_the_named_variable_goes_only_into_the_header(monkeypatch):
    monkeypatch.setenv("LORARAR_MY_JUDGE_KEY", KEY)
    with FakeJudge(["401"]) as server:  # the server echoes the Authorization header in its error body
        judge = _judge(server, api_key_env="LORARAR_MY_JUDGE_KEY")
        with pytest.raises(JudgeError) as error:
            judge.ask("q", [_picture()])
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert len(server.requests) == 1  # 401 is not retried
    message = str(error.value)
    assert KEY not in message and "[redacted]" in message and "HTTP 401" in message and "$LORARAR_MY_JUDGE_KEY" in message
    assert KEY not in repr(judge.__dict__)  # the client never stores the key itself


def test_server_errors_are_retried_with_exponential_backoff():
    waits = []
    with FakeJudge(["500", "503", "no"]) as server:
        answer = _judge(server, retries=3, backoff=0.5, sleep=waits.append).ask("q", [_picture()])
    assert answer == "no" and len(server.requests) == 3 and waits == [0.5, 1.0]


def test_retries_are_bounded_then_one_line_error():
    waits = []
    with FakeJudge(default="500") as server:
        judge = _judge(server, retries=2, backoff=1.0, max_backoff=1.5, sleep=waits.append)
        with pytest.raises(JudgeError) as error:
            judge.ask("q", [_picture()])
    assert len(server.requests) == 3 and waits == [1.0, 1.5]
    message = str(error.value)
    assert "\n" not in message and server.base_url + "/chat/completions" in message
    assert "after 3 attempts" in message and "HTTP 500" in message


def test_a_slow_answer_times_out_and_is_retried():
    # the slow answer would be "yes" after 5 s; "no" can only come from the retry after the 0.2 s timeout
    with FakeJudge(["slow", "no"], slow_s=5.0) as server:
        started = time.monotonic()
        assert _judge(server, timeout=0.2).ask("q", [_picture()]) == "no"
        assert len(server.requests) == 2 and time.monotonic() - started < 5.0  # did not wait the slow one out


def test_only_slow_answers_give_a_timeout_error():
    with FakeJudge(default="slow", slow_s=0.6) as server:
        with pytest.raises(JudgeError, match=r"unreachable after 2 attempts: no answer within 0.1 s"):
            _judge(server, timeout=0.1, retries=1).ask("q", [_picture()])


def test_unreachable_endpoint_is_one_clear_line():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(JudgeError) as error:
        _judge(url, retries=1).ask("q", [_picture()])
    message = str(error.value)
    assert message.startswith(f"judge {url}/chat/completions unreachable after 2 attempts: cannot connect")
    assert "llava-critic-7b" in message and "\n" not in message and time.monotonic() - started < 5


def test_malformed_answers_and_broken_bodies():
    with FakeJudge(["malformed", "badjson"]) as server:
        judge = _judge(server)
        assert judge.ask("q", [_picture()]) == "I cannot tell from these pictures."
        with pytest.raises(JudgeError, match="answer is not a chat completion"):
            judge.ask("q", [_picture()])


@pytest.mark.parametrize("base, url", [
    ("http://127.0.0.1:11434/v1", "http://127.0.0.1:11434/v1/chat/completions"),
    ("http://127.0.0.1:11434/v1/", "http://127.0.0.1:11434/v1/chat/completions"),
    ("http://127.0.0.1:11434", "http://127.0.0.1:11434/v1/chat/completions"),
    ("https://host/api/v1/chat/completions", "https://host/api/v1/chat/completions"),
])
def test_base_urls(base, url):
    assert chat_completions_url(base) == url


def test_bad_url_and_model_are_named():
    with pytest.raises(JudgeError, match="expected http"):
        chat_completions_url("127.0.0.1:11434")
    with pytest.raises(JudgeError, match="no model name"):
        ChatCompletionsJudge("http://user:pw@127.0.0.1:1/v1", " ")
    assert ChatCompletionsJudge("http://user:pw@127.0.0.1:1/v1", "m").endpoint == "http://127.0.0.1:1/v1/chat/completions"


def test_only_lorarar_variables_are_read_as_keys(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEY)
    with FakeJudge() as server:
        for name in ("AWS_SECRET_ACCESS_KEY", "lorarar_judge_api_key", KEY, "LORARAR_X-Y"):
            with pytest.raises(JudgeError) as error:
                _judge(server, api_key_env=name)
            message = str(error.value)
            assert "starting with LORARAR_" in message and "\n" not in message
            assert name not in message and KEY not in message  # the name may be a pasted key: never echoed
    assert server.requests == []
    assert _judge("http://127.0.0.1:1/v1", api_key_env=" ").api_key_env == ""  # empty: no key, allowed


@pytest.mark.parametrize("url, allowed", [
    ("http://127.0.0.1:11434/v1/chat/completions", True),
    ("https://127.0.0.1:8443/v1/chat/completions", True),
    ("http://127.8.9.10/v1/chat/completions", True),
    ("http://[::1]:8000/v1/chat/completions", True),
    ("http://LocalHost:1234/v1/chat/completions", True),
    ("http://192.168.1.20:11434/v1/chat/completions", False),
    ("http://attacker.example/v1/chat/completions", False),
    ("http://127.0.0.1.attacker.example/v1/chat/completions", False),
    ("http://localhost.attacker.example/v1/chat/completions", False),
    ("http://user:pw@attacker.example/v1/chat/completions", False),
])
def test_keys_go_over_plain_http_only_to_loopback(url, allowed):
    if allowed:
        check_key_destination(url)
    else:
        with pytest.raises(JudgeError, match="refusing to send the API key over plain http") as error:
            check_key_destination(url)
        assert "user:pw" not in str(error.value)


@pytest.mark.parametrize("url", ["https://api.example.com/v1/chat/completions",
                                 "HTTPS://API.example.com/v1/chat/completions",
                                 "https://127.0.0.1.attacker.example/v1/chat/completions"])
def test_without_a_pin_keys_go_to_no_remote_host_even_over_https(url):
    with pytest.raises(JudgeError, match="refusing to send the API key to a host the server's operator did not "
                                         "list; to allow it, start the server with LORARAR_JUDGE_URL"):
        check_key_destination(url)


def test_a_key_is_not_sent_over_plain_http_to_a_remote_host(monkeypatch):
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", KEY)
    with pytest.raises(JudgeError, match="refusing to send the API key") as error:
        _judge("http://192.0.2.1:9/v1")  # TEST-NET: would hang or fail if anything were sent
    assert KEY not in str(error.value)


def test_the_operators_pinned_url_is_the_only_one_that_gets_the_key(monkeypatch):
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", KEY)
    with FakeJudge() as server, FakeJudge() as other:
        monkeypatch.setenv("LORARAR_JUDGE_URL", other.base_url)
        with pytest.raises(JudgeError, match=r"sends keys only to the judge URLs in \$LORARAR_JUDGE_URL"):
            _judge(server).ask("q", [_picture()])
        assert server.requests == [] and server.raw_bytes == []
        monkeypatch.setenv("LORARAR_JUDGE_URL", " " + server.base_url.upper().replace("/V1", "/v1") + "/ ")  # normalised
        assert _judge(server).ask("q", [_picture()]) == "yes"
        monkeypatch.setenv("LORARAR_JUDGE_URL", "not a url")
        with pytest.raises(JudgeError, match=r"\$LORARAR_JUDGE_URL: entry 1 is not an http\(s\) URL"):
            _judge(server).ask("q", [_picture()])
        monkeypatch.delenv("LORARAR_JUDGE_API_KEY")  # no key: the pin does not restrict keyless judges
        monkeypatch.setenv("LORARAR_JUDGE_URL", other.base_url)
        assert _judge(server).ask("q", [_picture()]) == "yes"
    assert [r.headers.get("Authorization") for r in server.requests] == [f"Bearer {KEY}", None]


def test_redirects_are_not_followed_with_the_key(monkeypatch):
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", KEY)
    with FakeJudge() as elsewhere, FakeJudge(default=f"redirect:{elsewhere.base_url}/chat/completions") as server:
        with pytest.raises(JudgeError, match="HTTP 302.*redirects are not followed"):
            _judge(server).ask("q", [_picture()])
    assert len(server.requests) == 1 and elsewhere.raw_bytes == []


def test_redaction_happens_before_truncation(monkeypatch):
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", KEY)
    judge = _judge("http://127.0.0.1:1/v1")
    for cut in range(1, len(KEY)):  # the key straddles the 300-character limit at every position
        assert judge._redact("x" * (300 - cut) + KEY + " tail") == ("x" * (300 - cut) + "[redacted] tail")[:300]
