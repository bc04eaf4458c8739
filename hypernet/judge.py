"""A multimodal judge behind any OpenAI-compatible chat-completions endpoint (standard library only).

Ollama, vLLM, LM Studio and llama.cpp's server all speak it: POST <base>/chat/completions with
the images as base64 ``data:`` URLs and greedy decoding (temperature 0). The API key, when one is
needed, is read from an environment variable at call time; it goes into the Authorization header
and nowhere else (never into errors, logs or results). Since workflows are shared, the key rules
hold for whoever wrote the URL and variable name: only ``LORARAR_*`` variables are read, a key is
sent over plain http only to a loopback host, only to ``$LORARAR_JUDGE_URL`` when the operator set
it, and redirects are never followed.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Protocol, Sequence

from PIL import Image

from .errors import LoraRarError

DEFAULT_API_KEY_ENV = "LORARAR_JUDGE_API_KEY"
KEY_ENV_PREFIX = "LORARAR_"  # the only variables ever read as keys: a workflow cannot name AWS_SECRET_ACCESS_KEY
PINNED_URL_ENV = "LORARAR_JUDGE_URL"  # set by the server's operator: keys go to this judge URL and no other
_KEY_ENV_NAME = re.compile(rf"^{KEY_ENV_PREFIX}[A-Za-z0-9_]*$")
RETRYABLE_STATUS = {429, 500, 502, 503, 504}


class JudgeError(LoraRarError):
    """The judge endpoint failed or answered something unusable (one line, names the endpoint)."""


class Judge(Protocol):
    def ask(self, question: str, images: Sequence[Image.Image]) -> str:
        """The judge's raw text answer to ``question`` about ``images`` (shown in that order)."""


def chat_completions_url(base_url: str) -> str:
    """``http://host:port/v1`` -> ``.../v1/chat/completions``; a bare ``http://host:port`` gets ``/v1``."""
    url = base_url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise JudgeError(f"judge URL {base_url!r}: expected http(s)://host:port/v1 (an OpenAI-compatible base URL)")
    if url.endswith("/chat/completions"):
        return url
    if parts.path in ("", "/"):
        url += "/v1"
    return url + "/chat/completions"


def check_key_env(name: str) -> str:
    """``name`` stripped, if it may be read as a key (empty: no key); never echoed, it may be a pasted key."""
    name = name.strip()
    if name and not _KEY_ENV_NAME.match(name):
        raise JudgeError(f"api_key_env must be the NAME of an environment variable starting with {KEY_ENV_PREFIX} "
                         f"(e.g. {DEFAULT_API_KEY_ENV}), not the key itself; other variables are never read")
    return name


def _normalised(url: str) -> str:
    parts = urllib.parse.urlsplit(chat_completions_url(url))
    return urllib.parse.urlunsplit(parts._replace(scheme=parts.scheme.lower(), netloc=parts.netloc.lower()))


def check_key_destination(url: str) -> None:
    """Raise unless an API key may be sent to the chat-completions ``url`` (https, or http to loopback; the pin)."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme.lower() != "https" and not loopback:
        raise JudgeError(f"judge {public_url(url)}: refusing to send the API key over plain http to a non-loopback "
                         "host; use https (or a judge on 127.0.0.1), or leave the key variable unset")
    pinned = os.environ.get(PINNED_URL_ENV, "").strip()
    try:
        pinned = pinned and _normalised(pinned)
    except JudgeError:
        raise JudgeError(f"${PINNED_URL_ENV} is not an http(s) URL; no key is sent until it is fixed") from None
    if pinned and _normalised(url) != pinned:
        raise JudgeError(f"judge {public_url(url)}: refusing to send the API key: this server sends keys only to "
                         f"the judge URL in ${PINNED_URL_ENV}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # urllib would forward the Authorization header anywhere
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


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


class ChatCompletionsJudge:
    """Asks one question with images per request; retries 5xx/429, timeouts and refused connections.

    base_url: e.g. ``http://127.0.0.1:11434/v1`` (Ollama). model: the served model's name.
    api_key_env: the *name* of the environment variable holding the key (unset or empty: no key sent);
    it must start with ``LORARAR_``, and a key is only sent where :func:`check_key_destination` allows.
    timeout: seconds per request. retries: extra attempts after the first; the wait before attempt
    k+1 is ``backoff * 2**k`` seconds, capped at ``max_backoff``.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = DEFAULT_API_KEY_ENV,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 max_tokens: int = 16, sleep: Callable[[float], None] = time.sleep):
        if not model.strip():
            raise JudgeError(f"judge {public_url(base_url)}: no model name given")
        self.url = chat_completions_url(base_url)
        self.model = model.strip()
        self.api_key_env = check_key_env(api_key_env)
        self.timeout, self.retries = float(timeout), max(0, int(retries))
        self.backoff, self.max_backoff, self.max_tokens = backoff, max_backoff, max_tokens
        self.sleep = sleep
        self.requests_sent = 0

    @property
    def endpoint(self) -> str:
        return public_url(self.url)

    def _api_key(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""

    def _redact(self, text: str) -> str:
        key, text = self._api_key(), str(text)
        text = text.replace(key, "[redacted]") if key else text  # before truncating: no partial key survives
        return " ".join(text.split())[:300]

    def payload(self, question: str, images: Sequence[Image.Image]) -> dict:
        content = [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in images]
        content.append({"type": "text", "text": question})
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": 0, "top_p": 1, "max_tokens": self.max_tokens, "stream": False}

    def ask(self, question: str, images: Sequence[Image.Image]) -> str:
        body = json.dumps(self.payload(question, images)).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._api_key()
        if key:
            check_key_destination(self.url)
            headers["Authorization"] = f"Bearer {key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            self.requests_sent += 1
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    raw = response.read()
                return self._answer(raw)
            except urllib.error.HTTPError as error:
                detail = self._redact(error.read().decode("utf-8", "replace"))
                if error.code not in RETRYABLE_STATUS:
                    hint = {401: "; check the key in $" + (self.api_key_env or "<api_key_env>"), 403: "; check the key's permissions",
                            404: "; check the base URL (usually ends in /v1) and the model name"}.get(
                        error.code, "; redirects are not followed: give the final URL" if error.code < 400 else "")
                    raise JudgeError(f"judge {self.endpoint} answered HTTP {error.code}: {detail}{hint}") from None
                last = f"HTTP {error.code}: {detail}"
            except (TimeoutError, socket.timeout):
                last = f"no answer within {self.timeout:g} s"
            except urllib.error.URLError as error:
                if isinstance(error.reason, (TimeoutError, socket.timeout)):
                    last = f"no answer within {self.timeout:g} s"
                else:
                    last = f"cannot connect ({self._redact(error.reason)})"
            except (ConnectionError, http.client.HTTPException) as error:
                last = f"connection failed ({type(error).__name__})"
        raise JudgeError(f"judge {self.endpoint} unreachable after {self.retries + 1} attempt{'s' if self.retries else ''}: {last}; "
                         f"is the server running and serving model {self.model!r}?")

    def _answer(self, raw: bytes) -> str:
        try:
            message = json.loads(raw)["choices"][0]["message"]
            content = message["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge {self.endpoint}: answer is not a chat completion: "
                             f"{self._redact(raw.decode('utf-8', 'replace'))[:120]!r}") from None
        if isinstance(content, list):  # some servers return content parts
            content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content or "")

