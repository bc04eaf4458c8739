"""The judge client against judges nobody should trust: real HTTP servers on 127.0.0.1 that stall, flood,
echo the key, nest JSON, or answer objects where text belongs (tests/support/fake_judge.py)."""

import threading
import time
import traceback

import pytest
from PIL import Image

from hypernet.evaluate import Vote, parse_answer
from hypernet.judge import ChatCompletionsJudge, JudgeCancelled, JudgeError, chat_completions_url, redact
from tests.support.fake_judge import FakeJudge, key_stretches

KEY = "sk-hostile-3f9a7c1e5b2d8f40"


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.delenv("LORARAR_JUDGE_URL", raising=False)
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", KEY)


def windows(text: str) -> list[str]:
    return key_stretches(text, KEY)


def _judge(server, **kwargs):
    kwargs.setdefault("retries", 0)
    kwargs.setdefault("timeout", 5.0)
    url = server.base_url if isinstance(server, FakeJudge) else server
    return ChatCompletionsJudge(url, "llava-critic-7b", **kwargs)


def _ask(judge):
    return judge.ask("Same subject?", [Image.new("RGB", (8, 8))])


def _failure(judge) -> str:
    """The one-line error of a failing ask, with its full traceback text checked for the key."""
    with pytest.raises(JudgeError) as error:
        _ask(judge)
    text = "".join(traceback.format_exception(error.value))
    assert not windows(text + repr(error.value.args)), text
    assert error.value.__cause__ is None and (error.value.__context__ is None or error.value.__suppress_context__)
    message = str(error.value)
    assert "\n" not in message and judge.endpoint in message
    return message


# ------------------------------------------------------------------ deadline, size, cancel

@pytest.mark.parametrize("action", ["drip", "drip_headers", "hang"])
def test_one_deadline_covers_headers_and_the_whole_body(action):
    with FakeJudge(default=action, drip_s=0.2) as server:  # "drip" would take ~40 s for its ~200 bytes
        judge = _judge(server, timeout=1.0, retries=1, backoff=0.01)
        started = time.monotonic()
        message = _failure(judge)
        elapsed = time.monotonic() - started
    assert "unreachable after 2 attempts: no answer within 1 s" in message
    assert elapsed < 5, elapsed  # two 1 s deadlines and a short wait, not the judge's pace


@pytest.mark.parametrize("action", ["huge", "huge_chunked"])
def test_answers_over_the_size_cap_are_refused(action):
    with FakeJudge(default=action, huge_bytes=64 * 1024 * 1024) as server:
        message = _failure(_judge(server, max_bytes=1024 * 1024))
    assert f"refused an answer over {1024 * 1024} bytes" in message
    assert server.sent_bytes < 16 * 1024 * 1024  # it stopped reading early (socket buffers hold a few MiB)


def test_a_declared_length_over_the_cap_is_refused_before_reading():
    with FakeJudge(default="huge") as server:
        message = _failure(_judge(server))
    assert "declares 104857600 bytes" in message


def test_cancel_stops_a_request_in_flight():
    flag = threading.Event()
    with FakeJudge(default="hang") as server:
        judge = _judge(server, timeout=60, cancelled=flag.is_set)
        threading.Timer(0.3, flag.set).start()
        started = time.monotonic()
        with pytest.raises(JudgeCancelled, match="cancelled"):
            _ask(judge)
    assert time.monotonic() - started < 2


def test_cancel_stops_the_wait_between_retries():
    flag = threading.Event()
    with FakeJudge(default="503") as server:
        judge = _judge(server, retries=3, backoff=30.0, cancelled=flag.is_set)
        threading.Timer(0.3, flag.set).start()
        started = time.monotonic()
        with pytest.raises(JudgeCancelled):
            _ask(judge)
    assert len(server.requests) == 1 and time.monotonic() - started < 2


def test_a_cancelled_judge_sends_nothing():
    with FakeJudge() as server:
        with pytest.raises(JudgeCancelled):
            _ask(_judge(server, cancelled=lambda: True))
    assert server.raw_bytes == []


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0.0, -1.0])
def test_timeouts_must_be_positive_and_finite(timeout):
    with pytest.raises(JudgeError, match="timeout must be a positive number"):
        _judge("http://127.0.0.1:1/v1", timeout=timeout)


# ------------------------------------------------------------------ malformed answers

@pytest.mark.parametrize("action", ["nested", "object", "number", "parts"])
def test_malformed_answers_are_unparsed_never_yes(action):
    with FakeJudge(default=action) as server:
        answer = _ask(_judge(server))
    assert isinstance(answer, str) and answer.startswith("[unreadable answer")
    assert parse_answer(answer) == "unparsed"


def test_a_body_nested_too_deep_is_unreadable_not_a_crash():
    with FakeJudge(default="nested_body") as server:
        assert parse_answer(_ask(_judge(server))) == "unparsed"


@pytest.mark.parametrize("value", [{"yes": True}, ["yes"], 1, None, b"yes"])
def test_votes_never_count_non_text_as_yes(value):
    vote = Vote()
    vote.add(value)
    assert vote.verdicts == ["unparsed"] and not vote.passed


def test_long_answers_are_cut_before_they_are_stored():
    with FakeJudge(["no " + "blah " * 10000]) as server:
        answer = _ask(_judge(server))
    assert len(answer) <= 1000 and parse_answer(answer) == "no"


# ------------------------------------------------------------------ the key

@pytest.mark.parametrize("action", ["echo", "echo_part"])
def test_a_key_echoed_in_a_successful_answer_is_not_returned(action):
    with FakeJudge(default=action) as server:
        answer = _ask(_judge(server))
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert "[redacted]" in answer and not windows(answer)
    assert parse_answer(answer) == "yes"  # the rest of the answer still counts


@pytest.mark.parametrize("action, expected", [
    ("401", "HTTP 401"), ("echo_escaped", "HTTP 400"), ("echo_reason", "HTTP 500"),
    ("echo_status", "not a valid HTTP answer (BadStatusLine)"), ("echo_header", "HTTP 401"),
])
def test_a_key_echoed_in_a_failure_is_never_shown(action, expected):
    with FakeJudge(default=action) as server:
        message = _failure(_judge(server))
    assert expected in message


@pytest.mark.parametrize("value", [KEY + "\r\nX-Injected: 1", KEY + "\n", "\r" + KEY, KEY[:10] + " " + KEY[10:],
                                   KEY + "\x01", KEY + "\x7f", KEY + "\t", KEY + "é", KEY + "\u2028"])
def test_keys_a_header_cannot_carry_are_refused_unseen(monkeypatch, value):
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", value)
    with FakeJudge() as server:
        with pytest.raises(JudgeError) as error:
            _judge(server)
    text = "".join(traceback.format_exception(error.value))
    assert "$LORARAR_JUDGE_API_KEY holds characters an HTTP header cannot carry" in str(error.value)
    assert not windows(text) and "\n" not in str(error.value)
    assert server.raw_bytes == []


def test_redaction_catches_the_key_whole_in_part_and_in_any_case():
    text = f"a {KEY} b {KEY[4:14]} c {KEY.upper()} d {KEY[:7]} e"
    cleaned = redact(text, KEY)
    assert not windows(cleaned) and cleaned.startswith("a [redacted] b [redacted] c [redacted] d ")
    assert cleaned.endswith(f"{KEY[:7]} e")  # fewer than 8 shared characters are kept: "sk-" is not a secret
    assert redact("key abc here", "abc") == "key [redacted] here"  # a short key is matched whole


# ------------------------------------------------------------------ URLs

def test_a_query_on_the_base_url_stays_on_the_request(monkeypatch):
    monkeypatch.delenv("LORARAR_JUDGE_API_KEY")
    with FakeJudge() as server:
        base = f"http://127.0.0.1:{server.port}/openai/deployments/critic?api-version=2024-06-01"
        assert _ask(_judge(base)) == "yes"
    assert server.requests[0].path == "/openai/deployments/critic/chat/completions?api-version=2024-06-01"
    assert chat_completions_url("https://h/v1/chat/completions/?a=1#frag") == "https://h/v1/chat/completions?a=1"


@pytest.mark.parametrize("url", ["http://h:99999/v1", "http://h:port/v1", "http://h/v1\r\nX: y", "http:///v1",
                                 "ftp://h/v1", "http://h/ v1"])
def test_unusable_urls_are_one_line_errors(url):
    with pytest.raises(JudgeError, match="expected http") as error:
        chat_completions_url(url)
    assert "\n" not in str(error.value)


def test_several_judges_can_be_allowed(monkeypatch):
    with FakeJudge() as first, FakeJudge() as second, FakeJudge() as third:
        monkeypatch.setenv("LORARAR_JUDGE_URL", f" {first.base_url}, {second.base_url}/chat/completions\n")
        assert _ask(_judge(first)) == "yes" and _ask(_judge(second)) == "yes"
        with pytest.raises(JudgeError, match="sends keys only to the judge URLs"):
            _judge(third)
    assert third.raw_bytes == []
