"""One HTTP POST with one deadline, a size cap and a cancel check (standard library only).

urllib's ``timeout`` bounds each socket operation, so a server sending one byte a second never trips
it. Here the exchange (connect, send, headers, body) runs on a worker thread while the caller waits
in short slices; at the deadline, or when ``cancelled()`` turns true, the caller shuts the socket
down, which wakes whatever the worker is blocked in, and returns at once. The worker refuses a
declared Content-Length over ``max_bytes`` and stops reading once it has counted more.

Failures are :class:`TransferError` with a ``detail`` built only from error types and OS error
texts, never from bytes the server sent (a status line or header could carry anything).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable

MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # a chat answer is a few hundred bytes; JSON of 16 tokens, never MiBs
DEFAULT_PORTS = {"http": 80, "https": 443}
_POLL_S = 0.05  # how often the caller looks at the clock and the cancel flag
_CHUNK = 64 * 1024


class TransferError(Exception):
    """kind: 'timeout', 'cancelled', 'too_large', 'url', 'connect' or 'protocol'; detail: safe to show."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass
class Reply:
    status: int
    body: bytes  # at most max_bytes


@dataclass
class _Exchange:
    """State shared by the caller and the worker thread of one request."""

    connection: http.client.HTTPConnection
    done: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False  # set by the caller before it shuts the socket: the worker stops at its next check
    reply: Reply | None = None
    failure: BaseException | None = None


def destination(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) that a request to ``url`` connects to: the port is always explicit.

    Given no port, http.client would split an unbracketed IPv6 host at its last colon:
    ``https://[2001:db8::1:50]/`` would reach [2001:db8::1] on port 50. ValueError for a URL without
    an http(s) scheme and a host, or with a port that is not a number.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError("not an http(s) URL with a host")
    return scheme, parts.hostname, parts.port or DEFAULT_PORTS[scheme]


def post(url: str, body: bytes, headers: dict, *, timeout: float, max_bytes: int = MAX_RESPONSE_BYTES,
         cancelled: Callable[[], bool] | None = None) -> Reply:
    """POST ``body`` to ``url`` (query kept); the reply within ``timeout`` seconds in all, or TransferError."""
    try:
        scheme, host, port = destination(url)
        kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        # the per-operation timeout only bounds how long an abandoned worker can linger
        connection = kind(host, port, timeout=timeout)
    except (ValueError, http.client.HTTPException) as error:  # InvalidURL is both
        raise TransferError("url", f"not a usable URL ({type(error).__name__})") from None
    parts = urllib.parse.urlsplit(url)
    exchange = _Exchange(connection)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    worker = threading.Thread(target=_run, args=(exchange, target, body, headers, max_bytes),
                              name="lorarar-judge-request", daemon=True)
    deadline = time.monotonic() + timeout
    worker.start()
    try:
        while not exchange.done.wait(max(0.0, min(_POLL_S, deadline - time.monotonic()))):
            if cancelled is not None and cancelled():
                raise TransferError("cancelled", "cancelled while waiting for the answer")
            if time.monotonic() >= deadline:
                raise TransferError("timeout", f"no answer within {timeout:g} s")
    finally:
        if not exchange.done.is_set():
            _abandon(exchange)
    if exchange.failure is not None:
        raise _describe(exchange.failure, timeout)
    return exchange.reply


def _abandon(exchange: _Exchange) -> None:
    exchange.abandoned = True
    sock = exchange.connection.sock
    if sock is not None:
        try:  # the base class's shutdown: SSLSocket.shutdown would drop its state under the worker's feet
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _run(exchange: _Exchange, target: str, body: bytes, headers: dict, max_bytes: int) -> None:
    """The worker: every exception is kept for the caller, none is printed (it could hold server bytes)."""
    connection = exchange.connection
    try:
        connection.connect()
        if exchange.abandoned:
            return
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        declared = response.getheader("Content-Length", "")
        if declared.strip().isdigit() and int(declared) > max_bytes:
            exchange.failure = TransferError("too_large", f"the answer declares {int(declared)} bytes")
            return
        exchange.reply = Reply(response.status, _read_capped(exchange, response, max_bytes))
    except BaseException as error:  # noqa: BLE001 - handed to the caller, which decides
        exchange.failure = error
    finally:
        connection.close()
        exchange.done.set()


def _read_capped(exchange: _Exchange, response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    chunks, received = [], 0
    while not exchange.abandoned:
        chunk = response.read1(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        received += len(chunk)
        if received > max_bytes:
            raise TransferError("too_large", f"the answer is longer than {max_bytes} bytes")
        chunks.append(chunk)
    return b""


def _describe(error: BaseException, timeout: float) -> TransferError:
    """A TransferError for what the worker hit, from its type and OS error text only."""
    if isinstance(error, TransferError):
        return error
    if isinstance(error, (TimeoutError, socket.timeout)):
        return TransferError("timeout", f"no answer within {timeout:g} s")
    if isinstance(error, ssl.SSLError):
        return TransferError("connect", f"TLS failed ({getattr(error, 'reason', None) or type(error).__name__})")
    if isinstance(error, (ConnectionRefusedError, socket.gaierror)):
        return TransferError("connect", f"cannot connect ({error.strerror or type(error).__name__})")
    if isinstance(error, OSError):
        return TransferError("connect", f"connection failed ({error.strerror or type(error).__name__})")
    if isinstance(error, http.client.HTTPException):
        return TransferError("protocol", f"not a valid HTTP answer ({type(error).__name__})")
    return TransferError("protocol", f"request failed ({type(error).__name__})")
