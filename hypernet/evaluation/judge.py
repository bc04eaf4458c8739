"""A multimodal judge behind any OpenAI-compatible chat-completions endpoint (standard library only).

Ollama, vLLM, LM Studio and llama.cpp's server all speak it: POST <base>/chat/completions with
the images as base64 ``data:`` URLs and greedy decoding (temperature 0). The API key, when one is
needed, is read from an environment variable at call time; it goes into the Authorization header
and nowhere else. Since workflows are shared, the key rules hold whoever wrote the URL and the
variable name: only ``LORARAR_*`` variables are read; a key is sent only to the judge URLs the
server's operator listed in ``$LORARAR_JUDGE_URL``, or, with none listed, only to a loopback host;
never over plain http to another host; redirects are never followed. Whatever the judge sends back
(error bodies, answers) is shown or stored only as :func:`clean_line` makes it: one bounded line with
every stretch that spells 6 or more consecutive characters of the key replaced (see :func:`redact` for
exactly what that catches). Each request has one deadline and a size cap (see ``transport``).
"""

from __future__ import annotations

import base64
import functools
import io
import ipaddress
import json
import math
import os
import re
import sys
import time
import unicodedata
import urllib.parse
from typing import Callable, Protocol, Sequence

from PIL import Image

from ..errors import LoraRarError
from . import transport

DEFAULT_API_KEY_ENV = "LORARAR_JUDGE_API_KEY"
KEY_ENV_PREFIX = "LORARAR_"  # the only variables ever read as keys: a workflow cannot name AWS_SECRET_ACCESS_KEY
PINNED_URL_ENV = "LORARAR_JUDGE_URL"  # set by the server's operator: the judge URLs that may receive keys
_KEY_ENV_NAME = re.compile(rf"^{KEY_ENV_PREFIX}[A-Za-z0-9_]*$")
_HEADER_SAFE_KEY = re.compile(r"[\x21-\x7e]+")  # visible ASCII: nothing http.client would refuse or split
RETRYABLE_STATUS = {429, 500, 502, 503, 504}
KEY_WINDOW = 6  # any stretch spelling this many consecutive characters of the key is cut out of what the judge says
ANSWER_CHARS = 1000  # a yes/no answer is a few words; longer ones are cut (after redaction) before storing
MAX_TIMEOUT_S = 3600.0  # per request; with MAX_RETRIES it bounds how long one question can take
MAX_RETRIES = 10


class JudgeError(LoraRarError):
    """The judge endpoint failed or answered something unusable (one line, names the endpoint)."""


class JudgeCancelled(JudgeError):
    """The caller's ``cancelled()`` turned true during a request or a wait between attempts."""


class Judge(Protocol):
    def ask(self, question: str, images: Sequence[Image.Image]) -> str:
        """The judge's raw text answer to ``question`` about ``images`` (shown in that order)."""


def chat_completions_url(base_url: str) -> str:
    """``http://host:port/v1`` -> ``.../v1/chat/completions``; a bare ``http://host:port`` gets ``/v1``.

    A query (Azure's ``?api-version=...``) stays on the final URL; a fragment is dropped.
    """
    text = base_url.strip()
    problem = _url_problem(text)
    if problem:
        raise JudgeError(f"judge URL {base_url!r}: {problem}; expected http(s)://host:port/v1 "
                         "(an OpenAI-compatible base URL)")
    parts = urllib.parse.urlsplit(text)
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path = (path or "/v1") + "/chat/completions"
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc, path, parts.query, ""))


def _url_problem(text: str) -> str:
    """Why ``text`` cannot be a judge URL that http.client connects to as written, or "" when it can."""
    if not text.isprintable() or " " in text:
        return "it holds spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is not a number or out of range
    except ValueError:  # also a bracketed host that is not an IP address
        return "its host or port cannot be read"
    host = parts.hostname or ""
    if parts.scheme.lower() not in transport.DEFAULT_PORTS or not host:
        return "it needs an http or https scheme and a host"
    if "%" in host:
        return "IPv6 zone IDs (%25...) are not supported"
    if not host.isascii():
        return "the host name must be ASCII (write an international name in its xn-- form)"
    if ":" in host or "[" in parts.netloc.rsplit("@", 1)[-1]:  # brackets hold an IPv6 address, nothing else
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "its host is not an IPv6 address"
    return ""


def check_key_env(name: str) -> str:
    """``name`` stripped, if it may be read as a key (empty: no key); never echoed, it may be a pasted key."""
    name = name.strip()
    if name and not _KEY_ENV_NAME.match(name):
        raise JudgeError(f"api_key_env must be the NAME of an environment variable starting with {KEY_ENV_PREFIX} "
                         f"(e.g. {DEFAULT_API_KEY_ENV}), not the key itself; other variables are never read")
    return name


def _normalised(url: str) -> str:
    """The chat-completions URL compared for the key rule: scheme and host in lower case, no user, and the
    port that a request really connects to, written out (so ``https://h/`` and ``https://h:443/`` match)."""
    url = chat_completions_url(url)
    parts = urllib.parse.urlsplit(url)
    scheme, host, port = transport.destination(url)
    host = f"[{host}]" if ":" in host else host
    return urllib.parse.urlunsplit((scheme, f"{host}:{port}", parts.path, parts.query, ""))


def allowed_key_urls() -> list[str]:
    """The operator's ``$LORARAR_JUDGE_URL``: base or full URLs separated by whitespace or commas, normalised."""
    entries = [e for e in re.split(r"[\s,]+", os.environ.get(PINNED_URL_ENV, "")) if e]
    allowed = []
    for number, entry in enumerate(entries, 1):
        try:
            allowed.append(_normalised(entry))
        except JudgeError:  # not echoed: an operator may have put credentials in it
            raise JudgeError(f"${PINNED_URL_ENV}: entry {number} is not an http(s) URL; "
                             "no key is sent until it is fixed") from None
    return allowed


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_key_destination(url: str) -> None:
    """Raise unless an API key may be sent to the chat-completions ``url``.

    Allowed: a URL in ``$LORARAR_JUDGE_URL``; with that unset, a loopback host. Never plain http to another host.
    """
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme.lower() != "https" and not _is_loopback(host):
        raise JudgeError(f"judge {public_url(url)}: refusing to send the API key over plain http to a non-loopback "
                         "host; use https (or a judge on 127.0.0.1), or leave the key variable unset")
    allowed = allowed_key_urls()
    if allowed and _normalised(url) not in allowed:
        raise JudgeError(f"judge {public_url(url)}: refusing to send the API key: this server sends keys only to "
                         f"the judge URLs in ${PINNED_URL_ENV}")
    if not allowed and not _is_loopback(host):
        raise JudgeError(f"judge {public_url(url)}: refusing to send the API key to a host the server's operator "
                         f"did not list; to allow it, start the server with {PINNED_URL_ENV} set to this URL "
                         "(several: separated by spaces or commas), or leave the key variable unset")


def check_key_value(key: str, variable: str) -> None:
    """Raise (without showing the key) unless ``key`` can travel in an HTTP header as it is."""
    if not _HEADER_SAFE_KEY.fullmatch(key):
        raise JudgeError(f"${variable} holds characters an HTTP header cannot carry (line breaks, spaces, control "
                         "or non-ASCII characters); set it to the key alone. The value is not shown")


def redact(text: str, key: str, window: int = KEY_WINDOW) -> str:
    """``text`` with every stretch that spells ``window`` consecutive characters of ``key`` replaced by ``[redacted]``.

    Spelling is compared after folding case (and compatibility forms: fullwidth letters) and skipping, in both,
    whitespace, invisible characters (control, format: zero-width spaces, bidi marks; unassigned), combining
    marks and characters above U+FFFF. So ``sk-pr oj``, ``SK-PROJ`` and ``s<U+200B>k-proj`` all spell ``sk-proj``; the stretch
    replaced runs from the first to the last character spelling the window, skipped ones included. A key
    shorter than ``window`` is matched whole. Not caught, and not claimed: the key encoded (base64, hex),
    reversed, split by other characters, or fewer than ``window`` characters of it at a time.
    """
    if not key or not text:
        return text
    return _render(text, _hidden(text, key, window), len(text))


def clean_line(text: str, key: str, limit: int) -> str:
    """What the judge sent, as it may be shown or stored: one line of at most ``limit`` characters,
    invisible characters dropped, whitespace runs as one space, and :func:`redact` applied before the cut
    (a key stretch across the limit is replaced whole, never left as a stub). Linear in ``len(text)``."""
    line = " ".join(_invisible().sub("", str(text)).split())
    if not key:
        return line[:limit]
    # with single spaces left, a window of the key spans at most 2 * KEY_WINDOW - 1 characters of the line: a
    # character is shown only when that much of what follows it was in sight. A stretch replaced by the shorter
    # "[redacted]" leaves room after it, so the look grows; past 64 * limit, the answer ends where it was judged.
    reach, size = 2 * KEY_WINDOW, limit + 2 * KEY_WINDOW
    while True:
        head = line[:size]
        whole = len(head) == len(line)
        shown = _render(head, _hidden(head, key, KEY_WINDOW), len(head) if whole else len(head) - reach)
        if whole or len(shown) >= limit or size >= 64 * limit:
            return shown[:limit]
        size *= 4


def _hidden(text: str, key: str, window: int) -> bytearray:
    """1 for each character of ``text`` inside a stretch spelling ``window`` characters of ``key`` (see redact)."""
    hidden = bytearray(len(text))
    folded_key = "".join(_fold(c) for c in key if not _skipped(c))
    width = min(window, len(folded_key))
    if not width:
        return hidden
    pieces = {folded_key[i:i + width] for i in range(len(folded_key) - width + 1)}
    kept = [i for i, c in enumerate(text) if not _skipped(c)]  # positions in text of what is compared
    folded = "".join(_fold(text[i]) for i in kept)
    for j in range(len(folded) - width + 1):
        if folded[j:j + width] in pieces:
            start, end = kept[j], kept[j + width - 1] + 1
            hidden[start:end] = b"\x01" * (end - start)
    return hidden


def _render(text: str, hidden: bytearray, stop: int) -> str:
    """``text[:stop]`` with each run of hidden characters as ``[redacted]`` (one starting before ``stop``: whole)."""
    out, i = [], 0
    while i < stop:
        j = i
        while j < len(text) and hidden[j] == hidden[i]:
            j += 1
        out.append("[redacted]" if hidden[i] else text[i:min(j, stop)])
        i = j
    return "".join(out)


def _skipped(c: str) -> bool:
    """A character :func:`redact` reads through: whitespace, invisible, a combining mark, or one outside the
    Basic Multilingual Plane (emoji, mathematical letters: nothing a yes/no needs; dropped from stored text)."""
    if c.isascii():
        return not "!" <= c <= "~"
    return (ord(c) > 0xFFFF or not c.isprintable() or c.isspace()
            or unicodedata.category(c) in ("Mn", "Me"))


def _fold(c: str) -> str:
    """One character in the form compared: lower case, compatibility forms (fullwidth) folded."""
    if c.isascii():
        return c.lower()
    folded = unicodedata.normalize("NFKC", c).casefold()
    return folded if len(folded) == 1 else c


@functools.cache
def _invisible() -> re.Pattern:
    """A regex of the non-whitespace characters :func:`_skipped` reads through (built once, in about 0.05 s).

    Above U+FFFF everything goes as one range: a class of the astral planes' hundreds of small ranges
    costs the regex engine a linear scan per character (seconds on a 4 MiB answer), a bitmap does not.
    """
    ranges, start = [], None
    for code in range(0x10001):
        drop = code <= 0xFFFF and _skipped(chr(code)) and not chr(code).isspace()
        if drop and start is None:
            start = code
        elif not drop and start is not None:
            ranges.append(f"\\u{start:04x}-\\u{code - 1:04x}")
            start = None
    return re.compile(f"[{''.join(ranges)}\\U00010000-\\U{sys.maxunicode:08x}]+")


def public_url(url: str) -> str:
    """The URL without any user:password part, for messages and reports."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def image_data_url(image: Image.Image) -> str:
    """A PNG ``data:`` URL of ``image`` (converted to RGB)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class UnreadableAnswer(str):
    """The "answer" when a reply holds no answer text: fixed words saying why, nothing the judge sent.

    The protocol records it as unparsed without reading it, so no wording (or a future one) can count
    as a yes or a no; its words avoid both anyway, for anyone reading results.json.
    """


def answer_text(reply: dict) -> str:
    """The text of a chat completion's first choice, or an :class:`UnreadableAnswer` saying what was there."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return UnreadableAnswer("[unreadable answer: missing choices[0].message.content]")
    if isinstance(content, list):  # some servers return content parts
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        texts = [text for text in texts if isinstance(text, str)]
        return " ".join(texts) if texts else UnreadableAnswer("[unreadable answer: content parts without text]")
    if content is None or isinstance(content, str):
        return content or ""
    kind = {dict: "an object", bool: "a boolean", int: "a number", float: "a number"}.get(type(content), "a value")
    return UnreadableAnswer(f"[unreadable answer: content is {kind}, expected text]")


class ChatCompletionsJudge:
    """Asks one question with images per request; retries 5xx/429, timeouts and failed connections.

    base_url: e.g. ``http://127.0.0.1:11434/v1`` (Ollama). model: the served model's name.
    api_key_env: the *name* of the environment variable holding the key (unset or empty: no key sent);
    it must start with ``LORARAR_``, and a key is only sent where :func:`check_key_destination` allows.
    timeout: seconds per request (0 < timeout <= 3600), covering connect, headers and the whole body.
    retries: extra attempts after the first (0 to 10); the wait before attempt k+1 is ``backoff * 2**k``
    seconds, capped at ``max_backoff``. So one question takes at most ``timeout * (retries + 1)`` plus
    those waits: about 8 minutes with the defaults, unless ``cancelled`` ends it sooner.
    cancelled: polled during requests and waits; when it returns True, ask() raises JudgeCancelled
    within about 0.1 s. max_bytes: the largest answer read; a longer one is an error.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = DEFAULT_API_KEY_ENV,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 max_tokens: int = 16, sleep: Callable[[float], None] | None = None,
                 cancelled: Callable[[], bool] | None = None, max_bytes: int = transport.MAX_RESPONSE_BYTES):
        if not model.strip():
            raise JudgeError(f"judge {public_url(base_url)}: no model name given")
        self.url = chat_completions_url(base_url)
        self.model = model.strip()
        self.api_key_env = check_key_env(api_key_env)
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_S):
            raise JudgeError(f"judge {self.endpoint}: timeout must be a positive number of seconds, at most "
                             f"{MAX_TIMEOUT_S:g}, not {timeout!r}")
        if not (isinstance(retries, int) and 0 <= retries <= MAX_RETRIES):
            raise JudgeError(f"judge {self.endpoint}: retries must be a whole number from 0 to {MAX_RETRIES}, "
                             f"not {retries!r}")
        self.timeout, self.retries = float(timeout), retries
        self.backoff, self.max_backoff, self.max_tokens = backoff, max_backoff, max_tokens
        self.sleep, self.cancelled, self.max_bytes = sleep, cancelled, max_bytes
        self.requests_sent = 0
        self._headers()  # a bad key or destination fails here, before any image is prepared

    @property
    def endpoint(self) -> str:
        return public_url(self.url)

    def _api_key(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._api_key()
        if key:
            check_key_value(key, self.api_key_env)
            check_key_destination(self.url)
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _redact(self, text: str, limit: int = 300) -> str:
        """:func:`clean_line` with this judge's key: one line of at most ``limit`` characters."""
        return clean_line(text, self._api_key(), limit)

    def payload(self, question: str, images: Sequence[Image.Image]) -> dict:
        content = [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in images]
        content.append({"type": "text", "text": question})
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": 0, "top_p": 1, "max_tokens": self.max_tokens, "stream": False}

    def ask(self, question: str, images: Sequence[Image.Image]) -> str:
        body = json.dumps(self.payload(question, images)).encode()
        headers = self._headers()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._pause(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            self._raise_if_cancelled()
            self.requests_sent += 1
            try:
                reply = transport.post(self.url, body, headers, timeout=self.timeout, max_bytes=self.max_bytes,
                                        cancelled=self.cancelled)
            except transport.TransferError as failure:
                if failure.kind == "cancelled":
                    raise JudgeCancelled(f"judge {self.endpoint}: cancelled") from None
                if failure.kind == "url":  # chat_completions_url lets none through; a retry would not help
                    raise JudgeError(f"judge {self.endpoint}: {failure.detail}") from None
                if failure.kind == "too_large":
                    raise JudgeError(f"judge {self.endpoint}: refused an answer over {self.max_bytes} bytes "
                                     f"({failure.detail}); is this a chat-completions endpoint?") from None
                last = failure.detail
                continue
            if 200 <= reply.status < 300:
                return self._answer(reply.body)
            last = f"HTTP {reply.status}: {self._error_detail(reply.body)}"
            if reply.status not in RETRYABLE_STATUS:
                raise JudgeError(f"judge {self.endpoint} answered {last}{self._hint(reply.status)}")
        raise JudgeError(f"judge {self.endpoint} unreachable after {self.retries + 1} attempt{'s' if self.retries else ''}: "
                         f"{last}; is the server running and serving model {self.model!r}?")

    def _hint(self, status: int) -> str:
        return {401: "; check the key in $" + (self.api_key_env or "<api_key_env>"), 403: "; check the key's permissions",
                404: "; check the base URL (usually ends in /v1) and the model name"}.get(
            status, "; redirects are not followed: give the final URL" if status < 400 else "")

    def _raise_if_cancelled(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise JudgeCancelled(f"judge {self.endpoint}: cancelled")

    def _pause(self, seconds: float) -> None:
        """Wait before a retry; without an injected ``sleep``, in short slices so a cancel ends it."""
        if self.sleep is not None:
            return self.sleep(seconds)
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            self._raise_if_cancelled()
            time.sleep(min(0.05, left))

    def _error_detail(self, body: bytes) -> str:
        """An error body as one short line: its JSON ``error.message`` when there is one, decoded, key cut out."""
        text = body.decode("utf-8", "replace")  # whole (at most max_bytes): a cut could leave a stub of the key
        try:
            data = json.loads(text)
            message = data.get("error", data) if isinstance(data, dict) else data
            message = message.get("message", message) if isinstance(message, dict) else message
            text = message if isinstance(message, str) else json.dumps(message, ensure_ascii=False)
        except (ValueError, RecursionError):
            pass
        return self._redact(text)

    def _answer(self, raw: bytes) -> str:
        try:
            reply = json.loads(raw)
        except RecursionError:  # a hostile judge's nesting: an answer nobody can read, not a crash
            return UnreadableAnswer("[unreadable answer: JSON nested too deeply]")
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or "choices" not in reply:
            snippet = self._redact(raw.decode("utf-8", "replace"), 120)
            raise JudgeError(f"judge {self.endpoint}: answer is not a chat completion: {snippet!r}")
        text = answer_text(reply)
        return text if isinstance(text, UnreadableAnswer) else self._redact(text, ANSWER_CHARS)
