"""The chat-completions judge client (hypernet/evaluation/judge.py) against real HTTP servers on 127.0.0.1
(tests/support/fake_judge.py): first a judge that behaves (the request, the key only in its header, retries,
timeouts, URL rules), then judges nobody should trust: servers that stall, flood, echo the key, nest JSON, or
answer objects where text belongs."""

import base64
import contextlib
import io
import json
import random
import socket
import threading
import time
import traceback

import pytest
from PIL import Image

from devkit.comfy_server import free_port
from hypernet.evaluation import transport
from hypernet.evaluation.judge import (ANSWER_CHARS, KEY_WINDOW, ChatCompletionsJudge, JudgeCancelled, JudgeError,
                                       UnreadableAnswer, answer_text, chat_completions_url, check_key_destination,
                                       clean_line, redact)
from hypernet.evaluation.protocol import Vote, parse_answer
from tests.support.fake_judge import FakeJudge, key_stretches, pieces

TEST_KEY = "sk-test-0123456789-secret"  # set by the tests of a judge that behaves, where they need a key
KEY = "sk-hostile-3f9a7c1e5b2d8f40"  # in $LORARAR_JUDGE_API_KEY for every test unless a test sets or removes it


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    """No operator list of judges (a test sets $LORARAR_JUDGE_URL where it matters) and KEY in the environment,
    as a user's shell may have it: a test of a keyless request removes it."""
    monkeypatch.delenv("LORARAR_JUDGE_URL", raising=False)
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", KEY)


def _retrying_judge(server, **kwargs):
    kwargs.setdefault("retries", 2)
    kwargs.setdefault("backoff", 0.01)
    return ChatCompletionsJudge(server.base_url if isinstance(server, FakeJudge) else server, "llava-critic-7b", **kwargs)


def _picture(size=(40, 30), colour=(200, 10, 10)):
    return Image.new("RGB", size, colour)


def test_request_is_a_greedy_chat_completion_with_png_data_urls(monkeypatch):
    monkeypatch.delenv("LORARAR_JUDGE_API_KEY", raising=False)
    with FakeJudge(["Yes."]) as server:
        answer = _retrying_judge(server).ask("Same subject?", [_picture(), _picture((20, 20), (0, 0, 255))])
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
    monkeypatch.setenv("LORARAR_MY_JUDGE_KEY", TEST_KEY)
    with FakeJudge(["401"]) as server:  # the server echoes the Authorization header in its error body
        judge = _retrying_judge(server, api_key_env="LORARAR_MY_JUDGE_KEY")
        with pytest.raises(JudgeError) as error:
            judge.ask("q", [_picture()])
    assert server.requests[0].headers["Authorization"] == f"Bearer {TEST_KEY}"
    assert len(server.requests) == 1  # 401 is not retried
    message = str(error.value)
    assert TEST_KEY not in message and "[redacted]" in message and "HTTP 401" in message and "$LORARAR_MY_JUDGE_KEY" in message
    assert TEST_KEY not in repr(judge.__dict__)  # the client never stores the key itself


def test_server_errors_are_retried_with_exponential_backoff():
    waits = []
    with FakeJudge(["500", "503", "no"]) as server:
        answer = _retrying_judge(server, retries=3, backoff=0.5, sleep=waits.append).ask("q", [_picture()])
    assert answer == "no" and len(server.requests) == 3 and waits == [0.5, 1.0]


def test_retries_are_bounded_then_one_line_error():
    waits = []
    with FakeJudge(default="500") as server:
        judge = _retrying_judge(server, retries=2, backoff=1.0, max_backoff=1.5, sleep=waits.append)
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
        assert _retrying_judge(server, timeout=0.2).ask("q", [_picture()]) == "no"
        assert len(server.requests) == 2 and time.monotonic() - started < 5.0  # did not wait the slow one out


def test_only_slow_answers_give_a_timeout_error():
    with FakeJudge(default="slow", slow_s=0.6) as server:
        with pytest.raises(JudgeError, match=r"unreachable after 2 attempts: no answer within 0.1 s"):
            _retrying_judge(server, timeout=0.1, retries=1).ask("q", [_picture()])


def test_unreachable_endpoint_is_one_clear_line():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(JudgeError) as error:
        _retrying_judge(url, retries=1).ask("q", [_picture()])
    message = str(error.value)
    assert message.startswith(f"judge {url}/chat/completions unreachable after 2 attempts: cannot connect")
    assert "llava-critic-7b" in message and "\n" not in message and time.monotonic() - started < 5


def test_malformed_answers_and_broken_bodies():
    with FakeJudge(["malformed", "badjson"]) as server:
        judge = _retrying_judge(server)
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
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_KEY)
    with FakeJudge() as server:
        for name in ("AWS_SECRET_ACCESS_KEY", "lorarar_judge_api_key", TEST_KEY, "LORARAR_X-Y"):
            with pytest.raises(JudgeError) as error:
                _retrying_judge(server, api_key_env=name)
            message = str(error.value)
            assert "starting with LORARAR_" in message and "\n" not in message
            assert name not in message and TEST_KEY not in message  # the name may be a pasted key: never echoed
    assert server.requests == []
    assert _retrying_judge("http://127.0.0.1:1/v1", api_key_env=" ").api_key_env == ""  # empty: no key, allowed


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
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", TEST_KEY)
    with pytest.raises(JudgeError, match="refusing to send the API key") as error:
        _retrying_judge("http://192.0.2.1:9/v1")  # TEST-NET: would hang or fail if anything were sent
    assert TEST_KEY not in str(error.value)


def test_the_operators_pinned_url_is_the_only_one_that_gets_the_key(monkeypatch):
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", TEST_KEY)
    with FakeJudge() as server, FakeJudge() as other:
        monkeypatch.setenv("LORARAR_JUDGE_URL", other.base_url)
        with pytest.raises(JudgeError, match=r"sends keys only to the judge URLs in \$LORARAR_JUDGE_URL"):
            _retrying_judge(server).ask("q", [_picture()])
        assert server.requests == [] and server.raw_bytes == []
        monkeypatch.setenv("LORARAR_JUDGE_URL", " " + server.base_url.upper().replace("/V1", "/v1") + "/ ")  # normalised
        assert _retrying_judge(server).ask("q", [_picture()]) == "yes"
        monkeypatch.setenv("LORARAR_JUDGE_URL", "not a url")
        with pytest.raises(JudgeError, match=r"\$LORARAR_JUDGE_URL: entry 1 is not an http\(s\) URL"):
            _retrying_judge(server).ask("q", [_picture()])
        monkeypatch.delenv("LORARAR_JUDGE_API_KEY")  # no key: the pin does not restrict keyless judges
        monkeypatch.setenv("LORARAR_JUDGE_URL", other.base_url)
        assert _retrying_judge(server).ask("q", [_picture()]) == "yes"
    assert [r.headers.get("Authorization") for r in server.requests] == [f"Bearer {TEST_KEY}", None]


def test_redirects_are_not_followed_with_the_key(monkeypatch):
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", TEST_KEY)
    with FakeJudge() as elsewhere, FakeJudge(default=f"redirect:{elsewhere.base_url}/chat/completions") as server:
        with pytest.raises(JudgeError, match="HTTP 302.*redirects are not followed"):
            _retrying_judge(server).ask("q", [_picture()])
    assert len(server.requests) == 1 and elsewhere.raw_bytes == []


def test_redaction_happens_before_truncation(monkeypatch):
    monkeypatch.setenv("LORARAR_JUDGE_API_KEY", TEST_KEY)
    judge = _retrying_judge("http://127.0.0.1:1/v1")
    for cut in range(1, len(TEST_KEY)):  # the key straddles the 300-character limit at every position
        assert judge._redact("x" * (300 - cut) + TEST_KEY + " tail") == ("x" * (300 - cut) + "[redacted] tail")[:300]

# ------------------------------------------------------------------ judges nobody should trust

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


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0.0, -1.0, 1e300, 3600.5])
def test_timeouts_must_be_positive_finite_and_at_most_an_hour(timeout):
    with pytest.raises(JudgeError, match="timeout must be a positive number of seconds, at most 3600"):
        _judge("http://127.0.0.1:1/v1", timeout=timeout)


@pytest.mark.parametrize("retries", [-1, 11, 10**9, 1.5])
def test_retries_are_a_whole_number_up_to_ten(retries):
    with pytest.raises(JudgeError, match="retries must be a whole number from 0 to 10"):
        _judge("http://127.0.0.1:1/v1", retries=retries)


# ------------------------------------------------------------------ malformed answers

@pytest.mark.parametrize("action", ["nested", "object", "number", "parts", 'raw:{"choices": []}',
                                    'raw:{"choices": [{}]}', 'raw:{"choices": [{"message": {}}]}',
                                    'raw:{"choices": "yes"}', 'raw:{"choices": [{"message": "no"}]}',
                                    'raw:{"choices": [{"message": {"content": {"no": 1}}}]}'])
def test_malformed_answers_are_unparsed_never_yes_or_no(action):
    with FakeJudge(default=action) as server:
        answer = _ask(_judge(server))
    assert isinstance(answer, UnreadableAnswer) and answer.startswith("[unreadable answer")
    assert parse_answer(answer) == "unparsed"
    vote = Vote()
    vote.add(answer)
    assert vote.verdicts == ["unparsed"]


@pytest.mark.parametrize("reply", [{"choices": []}, {"choices": [{}]}, {"choices": [{"message": {}}]},
                                   {"choices": "yes"}, {"choices": [{"message": {"content": []}}]},
                                   {"choices": [{"message": {"content": {"yes": 1}}}]}])
def test_unreadable_is_a_flag_not_a_wording(reply):
    """The vote reads the flag, not the words: even a marker saying "yes" or "no" stays unparsed, and today's
    wordings would parse as neither anyway."""
    marker = answer_text(reply)
    assert isinstance(marker, UnreadableAnswer) and parse_answer(str(marker)) == "unparsed"
    assert parse_answer(UnreadableAnswer("yes")) == parse_answer(UnreadableAnswer("no")) == "unparsed"


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

@pytest.mark.parametrize("action", ["echo", "echo_part", "echo_spaced", "echo_invisible", "echo_parts"])
def test_a_key_echoed_in_a_successful_answer_is_not_returned(action):
    with FakeJudge(default=action) as server:
        answer = _ask(_judge(server))
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert "[redacted]" in answer and not key_stretches(answer, KEY, KEY_WINDOW)
    assert parse_answer(answer) == "yes"  # the rest of the answer still counts


def _spelled(responder):
    """A judge answering, with the key it was sent, whatever ``responder(key)`` makes of it."""
    return FakeJudge(responder=lambda request: responder(request.headers["Authorization"].removeprefix("Bearer ")))


@pytest.mark.parametrize("name, spell", [
    ("7-character pieces", lambda key: "yes " + " ".join(key[i:i + 7] for i in range(0, len(key), 7))),
    ("tabs and newlines", lambda key: "yes " + "\t\n".join(pieces(key, 3))),
    ("zero-width joiners", lambda key: "yes " + "\u200d".join(key)),
    ("bidi marks", lambda key: "yes " + "\u200e\u202e".join(pieces(key, 2))),
    ("soft hyphens", lambda key: "yes " + "\u00ad".join(key)),
    ("combining marks", lambda key: "yes " + "\u0301".join(key)),
    ("fullwidth", lambda key: "yes " + "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in key)),
    ("straddling the cut", lambda key: "yes" + " " * (ANSWER_CHARS + 4 * len(key) + 64 - 3 - 7) + key),
    ("straddling the cut, spaced", lambda key: "yes " + "x" * (ANSWER_CHARS - 8) + " ".join(key)),
    ("parts", lambda key: "raw:" + json.dumps({"choices": [{"message": {"content": [
        {"type": "text", "text": piece} for piece in ["yes", *pieces(key, 4)]]}}]})),
])
def test_a_key_spelled_out_across_separators_is_redacted(name, spell):
    with _spelled(spell) as server:
        answer = _ask(_judge(server))
    assert not key_stretches(answer, KEY, KEY_WINDOW), (name, answer[-80:])
    assert len(answer) <= ANSWER_CHARS and "\n" not in answer and answer.isprintable()
    assert parse_answer(answer) == "yes"


def test_a_key_spelled_out_in_an_error_body_is_redacted():
    with _spelled(lambda key: "error:400:bad key " + " ".join(pieces(key, 5))) as server:
        message = _failure(_judge(server))
    assert "HTTP 400: bad key [redacted]" in message and not key_stretches(message, KEY, KEY_WINDOW)


def test_clean_line_never_keeps_six_key_characters_in_a_row():
    """Random answers built from key pieces, separators and filler: whatever survives spells no window of the
    key, is one printable line, and is at most the limit long."""
    rng = random.Random(8)
    separators = [" ", "\t", "\n", "\u200b", "\u2060", "\ufeff", "\u0300", "\x00", "\u2028", ""]
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.5:
                start = rng.randrange(len(KEY))
                piece = KEY[start:start + rng.randint(1, len(KEY))]
                piece = piece.upper() if rng.random() < 0.3 else piece
                parts.append(rng.choice(separators).join(piece) if rng.random() < 0.5 else piece)
            else:
                parts.append(rng.choice(["yes", "no", "x" * rng.randint(0, 400), " " * rng.randint(0, 400)]))
        text = rng.choice(separators).join(parts)
        limit = rng.choice([40, 120, 300, ANSWER_CHARS])
        line = clean_line(text, KEY, limit)
        assert not key_stretches(line, KEY, KEY_WINDOW), (text, line)
        assert len(line) <= limit and line.isprintable()


def test_clean_line_is_linear_on_the_largest_answer():
    started = time.monotonic()
    for filler in ["\u200b", " ", "a", "yes "]:
        assert len(clean_line(filler * transport.MAX_RESPONSE_BYTES, KEY, ANSWER_CHARS)) <= ANSWER_CHARS
    assert time.monotonic() - started < 10


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
    text = f"a {KEY} b {KEY[4:14]} c {KEY.upper()} d {KEY[:5]} e"
    cleaned = redact(text, KEY)
    assert not windows(cleaned) and cleaned.startswith("a [redacted] b [redacted] c [redacted] d ")
    assert cleaned.endswith(f"{KEY[:5]} e")  # fewer than 6 shared characters are kept: "sk-" is not a secret
    assert redact(f"a {KEY[3:9]} b", KEY) == "a [redacted] b"
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
                                 "ftp://h/v1", "http://h/ v1", "http://[::1%25lo]/v1", "http://[fe80::1%eth0]:80/v1",
                                 "http://[::1/v1", "http://[zz::]/v1", "http://[v1.x]/v1", "http://bücher.example/v1"])
def test_unusable_urls_are_one_line_errors(url):
    with pytest.raises(JudgeError, match="expected http") as error:
        _judge(url)
    assert "\n" not in str(error.value) and repr(url) in str(error.value)


@pytest.mark.parametrize("url, expected", [
    ("https://[2001:db8::1:50]/v1", ("https", "2001:db8::1:50", 443)),  # not [2001:db8::1] port 50
    ("http://[::1]/v1", ("http", "::1", 80)),
    ("http://[::ffff:127.0.0.1]/v1", ("http", "::ffff:127.0.0.1", 80)),
    ("HTTPS://Judge.Example.com:8443/v1", ("https", "judge.example.com", 8443)),
])
def test_every_request_names_its_port(url, expected):
    assert transport.destination(chat_completions_url(url)) == expected


def _ipv6_listener():
    """A TCP listener on [::1] at a free port, recording who connects; None where IPv6 is missing."""
    try:
        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
    except OSError:
        return None, []
    listener.listen(4)
    listener.settimeout(0.2)
    connected = []

    def accept():
        while listener.fileno() != -1:
            try:
                connected.append(listener.accept()[1])
            except OSError:
                continue
    threading.Thread(target=accept, daemon=True).start()
    return listener, connected


def test_a_port_less_ipv6_url_never_reaches_a_port_hidden_in_its_address(monkeypatch):
    """[::1:P] is the host 0::1:P on port 443; before, http.client took P as the port and sent the key to [::1]:P."""
    listener, connected = _ipv6_listener()
    if listener is None:
        pytest.skip("no IPv6 loopback here")
    port = listener.getsockname()[1]
    url = f"https://[::1:{port:x}]/v1"  # hex: the group P is the listener's port number
    monkeypatch.setenv("LORARAR_JUDGE_URL", url)  # the operator listed that host, on https's port
    message = _failure(_judge(url, timeout=1.0))
    time.sleep(0.3)
    listener.close()
    assert connected == [], "the request went to [::1] on the port hidden in the address"
    assert "unreachable" in message


def test_a_pin_compares_the_port_a_request_really_uses(monkeypatch):
    monkeypatch.setenv("LORARAR_JUDGE_URL", "https://judge.example.com:8443/v1 https://other.example.com/v1")
    _judge("https://judge.example.com:8443/v1")
    _judge("https://other.example.com:443/v1")  # the same place: https's own port written out
    for url in ["https://judge.example.com/v1", "https://judge.example.com:443/v1", "https://other.example.com:8443/v1"]:
        with pytest.raises(JudgeError, match="sends keys only to the judge URLs"):
            _judge(url)


@contextlib.contextmanager
def _ipv6_judge(port=0):
    server = FakeJudge(host="::1", port=port)
    try:
        server.start()
    except OSError as error:
        pytest.skip(f"cannot listen on [::1]:{port} here ({error.strerror})")
    try:
        yield server
    finally:
        server.stop()


def test_ipv6_loopback_judges_work_and_get_the_key():
    with _ipv6_judge() as server:
        assert _ask(_judge(server.base_url)) == "yes"
    assert server.requests[0].headers["Host"] == f"[::1]:{server.port}"
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"


def test_a_port_less_ipv6_loopback_url_reaches_port_80():
    with _ipv6_judge(port=80) as server:
        assert _ask(_judge("http://[::1]/v1")) == "yes"
    assert server.requests[0].headers["Host"] == "[::1]"


def test_an_ipv4_mapped_address_is_a_connection_failure_not_a_crash(monkeypatch):
    monkeypatch.delenv("LORARAR_JUDGE_API_KEY")  # not loopback to the key rule: asked without a key
    with FakeJudge() as server:
        pass  # its port is free again: nothing answers there
    message = _failure(_judge(f"http://[::ffff:127.0.0.1]:{server.port}/v1"))
    assert "unreachable after 1 attempt" in message


def test_several_judges_can_be_allowed(monkeypatch):
    with FakeJudge() as first, FakeJudge() as second, FakeJudge() as third:
        monkeypatch.setenv("LORARAR_JUDGE_URL", f" {first.base_url}, {second.base_url}/chat/completions\n")
        assert _ask(_judge(first)) == "yes" and _ask(_judge(second)) == "yes"
        with pytest.raises(JudgeError, match="sends keys only to the judge URLs"):
            _judge(third)
    assert third.raw_bytes == []
