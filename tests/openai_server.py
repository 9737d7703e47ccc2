"""Shared by the engine, eval, RLEF and LLM-judge tests (fixtures ``serve`` and ``no_proxy``, made
available to every test module by tests/conftest.py): a real HTTP server on 127.0.0.1 that speaks the
OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions`` APIs and answers from a script.

``respond`` is a function ``(body, index) -> action`` (``index``: the request's number) or a list
of actions, one per request (the last repeats). Actions:

- ``"text"`` or ``["text", ...]``: 200 with those choices (one string is repeated ``n`` times)
- ``("slow", seconds, action)``: the action after sleeping
- ``("status", code)``: an HTTP error with a JSON error body
- ``("length", "text")``: one choice per ``n`` that stopped at the token limit
- ``("raw", code, content_type, body)``: exactly that status, content type and body (str or a
  JSON-able object): HTML error pages, invalid JSON, ``message: null`` and other malformed shapes

With ``logprobs`` asked, every character of a reply is one token ``token_id:<ord(c)>`` with
log-prob -0.5 (vLLM's ``return_tokens_as_token_ids`` form).
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class FakeOpenAIServer:
    def __init__(self, respond):
        self.respond = respond
        self.requests: list[dict] = []  # {"path", "headers" (lower-case names), "body"}
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    n = len(server.requests)
                    server.requests.append({"path": self.path, "body": body,
                                            "headers": {k.lower(): v for k, v in self.headers.items()}})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    r = server.respond
                    self._act(r(body, n) if callable(r) else r[min(n, len(r) - 1)], body)
                except OSError:  # the client gave up (timeout) and closed the connection
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _act(self, action, body):
                if isinstance(action, tuple) and action[0] == "slow":
                    server.stop.wait(action[1])
                    return self._act(action[2], body)
                if isinstance(action, tuple) and action[0] == "raw":
                    _, code, ctype, payload = action
                    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return self.wfile.write(data)
                if isinstance(action, tuple) and action[0] == "status":
                    return self._send(action[1], {"error": {"message": "scripted failure", "type": "server_error"}})
                finish = "stop"
                if isinstance(action, tuple) and action[0] == "length":
                    action, finish = action[1], "length"
                texts = [action] * int(body.get("n") or 1) if isinstance(action, str) else list(action)
                chat = self.path.endswith("/chat/completions")
                self._send(200, {"id": "cmpl-test", "object": "chat.completion" if chat else "text_completion",
                                 "created": 0, "model": body.get("model", "fake"),
                                 "choices": [_choice(i, t, finish, chat, body.get("logprobs")) for i, t in enumerate(texts)],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _choice(i: int, text: str, finish: str, chat: bool, logprobs) -> dict:
    tokens = [f"token_id:{ord(c)}" for c in text]
    if chat:
        lp = {"content": [{"token": t, "logprob": -0.5, "bytes": None, "top_logprobs": []} for t in tokens]}
        return {"index": i, "finish_reason": finish, "message": {"role": "assistant", "content": text},
                "logprobs": lp if logprobs else None}
    lp = {"tokens": tokens, "token_logprobs": [-0.5] * len(tokens), "text_offset": list(range(len(tokens))),
          "top_logprobs": None}
    return {"index": i, "finish_reason": finish, "text": text, "logprobs": lp if logprobs else None}


def messages_text(body: dict) -> str:
    """Everything the request asked about: its messages' contents, or its prompt."""
    if "messages" in body:
        return "\n".join(m["content"] for m in body["messages"])
    return body["prompt"] if isinstance(body["prompt"], str) else json.dumps(body["prompt"])


@pytest.fixture
def no_proxy(monkeypatch):
    """Loopback requests must not go through a proxy from the environment."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def serve(no_proxy):
    """``serve(respond)``: a FakeOpenAIServer, closed when the test ends."""
    made = []

    def make(respond):
        s = FakeOpenAIServer(respond)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
