"""A real HTTP server on 127.0.0.1 that speaks OpenAI's chat completions and answers from a script.

    with FakeJudge(["yes", "no", "malformed", "slow", "500"], default="yes") as judge:
        ChatCompletionsJudge(judge.base_url, "llava-critic").ask("...", [image])
        judge.requests      # every request received: path, headers, parsed JSON body
        judge.questions     # the text part of each chat request

Actions (one consumed per POST /v1/chat/completions, then ``default``):
    "yes", "no"      answer that word
    "malformed"      answer text that is neither yes nor no
    "slow"           wait ``slow_s`` seconds, then answer "yes" (to trip a client timeout)
    "500"            HTTP 500 (any 3-digit string gives that status; bodies echo the request's
                     Authorization header, as careless servers do, to test that clients redact it)
    "badjson"        HTTP 200 with a body that is not JSON
    "redirect:URL"   HTTP 302 to URL (a client must not follow it with the key)
Hostile ones (a judge nobody should trust; "the key" is the request's Authorization header):
    "hang"           read the request, never answer (until the client leaves or the server stops)
    "drip"           a valid "yes" answer, its body sent one byte every ``drip_s`` seconds
    "drip_headers"   a status line, then header bytes one every ``drip_s`` seconds, never ending
    "huge"           HTTP 200 declaring ``huge_bytes`` in Content-Length, streaming them
    "huge_chunked"   HTTP 200, chunked, streaming ``huge_bytes`` with no length given up front
    "echo"           a successful answer "yes, your key is <key>"
    "echo_part"      a successful answer with the key's middle part, and the key upper-cased
    "echo_spaced"    "yes" and the key in 5-character pieces with spaces between (no 8 in a row)
    "echo_invisible" "yes" and the key with a zero-width space between every two characters
    "echo_parts"     content parts: "yes", then the key in 5-character parts
    "echo_escaped"   HTTP 400 whose JSON error message holds the key, every character JSON-escaped
    "echo_reason"    HTTP 500 with the key as the reason phrase
    "echo_status"    a status line that is the key (not HTTP at all)
    "echo_header"    HTTP 401 with the key in a response header
    "nested"         a chat completion whose content is a list nested ``nesting`` deep
    "nested_body"    a body of ``nesting`` opening brackets (RecursionError in json.loads)
    "object"         content {"yes": true}: a JSON object where text belongs
    "number"         content 1
    "parts"          content ["yes"]: parts that are not objects
    "raw:BODY"       HTTP 200 with BODY as the whole body (e.g. '{"choices": []}')
    "error:NNN:TEXT" HTTP NNN with the JSON error message TEXT
    anything else    answered verbatim
``responder(request) -> action`` replaces the script when given (e.g. answer by question kind).
``on_request(request)`` runs before answering (e.g. to cancel a ComfyUI prompt mid-run).
Threaded (a slow answer does not block the next request); the port is free and picked by the OS unless
``port`` is given; ``host="::1"`` listens on the IPv6 loopback instead of 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import threading
import unicodedata
import urllib.parse
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

def key_stretches(text: str, key: str, width: int = 8) -> list[str]:
    """Every ``width``-character stretch of ``key`` found in ``text`` (any case), reading through whitespace and
    invisible characters (``s k-\u200bp`` spells ``sk-p``): a leak check, must be empty."""
    spelled = "".join(c for c in text if not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf", "Mn")).lower()
    return [key[i:i + width] for i in range(len(key) - width + 1) if key[i:i + width].lower() in spelled]


def pieces(secret: str, size: int = 5) -> list[str]:
    return [secret[i:i + size] for i in range(0, len(secret), size)]


HOSTILE = ("hang", "drip", "drip_headers", "huge", "huge_chunked", "echo", "echo_part", "echo_spaced", "echo_invisible",
           "echo_parts", "echo_escaped", "echo_reason", "echo_status", "echo_header", "nested", "nested_body", "object",
           "number", "parts")


@dataclass
class Request:
    path: str
    headers: dict
    body: dict

    @property
    def question(self) -> str:
        content = self.body["messages"][0]["content"]
        return " ".join(part["text"] for part in content if part.get("type") == "text")

    @property
    def image_urls(self) -> list[str]:
        content = self.body["messages"][0]["content"]
        return [part["image_url"]["url"] for part in content if part.get("type") == "image_url"]


class FakeJudge:
    def __init__(self, script=(), default: str = "yes", responder: Callable[[Request], str] | None = None,
                 on_request: Callable[[Request], None] | None = None, slow_s: float = 1.0,
                 drip_s: float = 0.5, huge_bytes: int = 100 * 1024 * 1024, nesting: int = 100_000,
                 host: str = "127.0.0.1", port: int = 0):
        self.script = list(script)
        self.default = default
        self.responder = responder
        self.on_request = on_request
        self.slow_s = slow_s
        self.drip_s, self.huge_bytes, self.nesting = drip_s, huge_bytes, nesting
        self.sent_bytes = 0  # body bytes written by "huge" answers: the client must stop reading early
        self._stopping = threading.Event()  # ends "hang" and the drips when the server stops
        self.requests: list[Request] = []
        self.raw_bytes: list[bytes] = []  # everything received, headers and bodies, for leak checks
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._host, self._port = host, port  # host "::1": listen on IPv6 loopback

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "FakeJudge":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "FakeJudge":
        judge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                judge._handle(self)

            do_GET = do_POST  # recorded too (a followed redirect arrives as GET), then refused as not JSON

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in self._host else socket.AF_INET

        self._server = Server((self._host, self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-judge", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        return self._port  # kept after stop(), for messages

    @property
    def base_url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/v1"

    @property
    def questions(self) -> list[str]:
        return [r.question for r in self.requests]

    # ------------------------------------------------------------ answering

    def _next_action(self, request: Request) -> str:
        if self.responder is not None:
            return self.responder(request)
        with self._lock:
            return self.script.pop(0) if self.script else self.default

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        raw = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        with self._lock:
            self.raw_bytes.append(bytes(handler.requestline, "latin-1") + b"\n" + bytes(str(handler.headers), "latin-1") + raw)
        if not urllib.parse.urlsplit(handler.path).path.endswith("/chat/completions"):
            return self._send(handler, 404, {"error": {"message": f"no route {handler.path}"}})
        try:
            body = json.loads(raw)
        except ValueError:
            return self._send(handler, 400, {"error": {"message": "body is not JSON"}})
        request = Request(handler.path, dict(handler.headers), body)
        with self._lock:
            self.requests.append(request)
        if self.on_request is not None:
            self.on_request(request)
        action = self._next_action(request)
        if action in HOSTILE:
            return getattr(self, "_" + action)(handler, handler.headers.get("Authorization", ""))
        if action == "slow":
            time.sleep(self.slow_s)
            action = "yes"
        if action.isdigit() and len(action) == 3:
            echo = handler.headers.get("Authorization", "")
            return self._send(handler, int(action), {"error": {"message": f"scripted failure (auth was {echo!r})"}})
        if action.startswith("redirect:"):
            return self._send(handler, 302, {}, {"Location": action.split(":", 1)[1]})
        if action == "badjson":
            return self._send(handler, 200, b"<html>not json</html>")
        if action.startswith("raw:"):
            return self._send(handler, 200, action[4:].encode())
        if action.startswith("error:"):
            _, status, text = action.split(":", 2)
            return self._send(handler, int(status), {"error": {"message": text}})
        text = {"malformed": "I cannot tell from these pictures."}.get(action, action)
        self._send(handler, 200, {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        })

    # ------------------------------------------------------------ hostile answers

    @staticmethod
    def _completion(content) -> dict:
        return {"id": "chatcmpl-x", "object": "chat.completion", "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}

    def _raw(self, handler, *parts: bytes) -> None:
        try:
            for part in parts:
                handler.wfile.write(part)
        except OSError:  # the client left
            pass

    def _hang(self, handler, key) -> None:
        self._stopping.wait()

    def _drip(self, handler, key) -> None:
        body = json.dumps(self._completion("yes")).encode()
        self._raw(handler, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
                  f"Content-Length: {len(body)}\r\n\r\n".encode())
        for byte in body:
            if self._stopping.wait(self.drip_s):
                return
            try:
                handler.wfile.write(bytes([byte]))
            except OSError:
                return

    def _drip_headers(self, handler, key) -> None:
        self._raw(handler, b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not self._stopping.wait(self.drip_s):
            try:
                handler.wfile.write(b"a")
            except OSError:
                return

    def _stream(self, handler, head: bytes, chunked: bool) -> None:
        block = b"0" * 65536
        try:
            handler.wfile.write(head)
            while self.sent_bytes < self.huge_bytes and not self._stopping.is_set():
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                self.sent_bytes += len(block)
        except OSError:
            pass
        handler.close_connection = True

    def _huge(self, handler, key) -> None:
        self._stream(handler, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % self.huge_bytes, chunked=False)

    def _huge_chunked(self, handler, key) -> None:
        self._stream(handler, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n", chunked=True)

    def _echo(self, handler, key) -> None:
        self._send(handler, 200, self._completion(f"yes, your key is {key}"))

    def _echo_part(self, handler, key) -> None:
        secret = key.removeprefix("Bearer ")
        self._send(handler, 200, self._completion(f"yes {secret[3:-3]} and {secret.upper()}"))

    def _echo_spaced(self, handler, key) -> None:
        self._send(handler, 200, self._completion("yes " + " ".join(pieces(key.removeprefix("Bearer ")))))

    def _echo_invisible(self, handler, key) -> None:
        self._send(handler, 200, self._completion("yes " + "\u200b".join(key.removeprefix("Bearer "))))

    def _echo_parts(self, handler, key) -> None:
        parts = ["yes", *pieces(key.removeprefix("Bearer "))]
        self._send(handler, 200, self._completion([{"type": "text", "text": part} for part in parts]))

    def _echo_escaped(self, handler, key) -> None:
        escaped = "".join(f"\\u{ord(c):04x}" for c in key)
        self._send(handler, 400, b'{"error": {"message": "bad key ' + escaped.encode() + b'"}}')

    def _echo_reason(self, handler, key) -> None:
        body = b'{"error": "overloaded"}'
        self._raw(handler, f"HTTP/1.1 500 {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode("latin-1"), body)

    def _echo_status(self, handler, key) -> None:
        self._raw(handler, f"{key}\r\n\r\n".encode("latin-1"))
        handler.close_connection = True

    def _echo_header(self, handler, key) -> None:
        self._send(handler, 401, {"error": {"message": "unauthorised"}}, {"X-Your-Key": key})

    def _nested(self, handler, key) -> None:
        content = b"[" * self.nesting + b"]" * self.nesting
        self._send(handler, 200, b'{"choices": [{"message": {"content": ' + content + b"}}]}")

    def _nested_body(self, handler, key) -> None:
        self._send(handler, 200, b"[" * self.nesting)

    def _object(self, handler, key) -> None:
        self._send(handler, 200, self._completion({"yes": True}))

    def _number(self, handler, key) -> None:
        self._send(handler, 200, self._completion(1))

    def _parts(self, handler, key) -> None:
        self._send(handler, 200, self._completion(["yes"]))

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): fine
            pass
