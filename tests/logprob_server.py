"""A real HTTP server on 127.0.0.1 that serves a transformers causal LM as vLLM's OpenAI server
does for a teacher: ``POST /v1/completions`` with a token-id ``prompt`` and ``prompt_logprobs: K``
answers each choice with ``prompt_logprobs``, computed by the model (raw logits, temperature 1):
a list with one entry per prompt token, the first ``null``, each other a dict keyed by token id
(a string) holding the actual token (whatever its rank, first) and the K most likely tokens, each
``{"logprob", "rank", "decoded_token"}`` (-inf clamped to -9999.0, as vLLM does). ``POST /tokenize``
answers ``{"count", "max_model_len", "tokens", "token_strs"}`` at the server's root, as vLLM does,
unless ``tokenize=False`` (then 404, as a server without it).

``fault(prompt_ids, attempt) -> action`` (``attempt``: how many times this same prompt was asked
before) picks how a completion request is answered; requests run concurrently, so faults are
chosen by the prompt, not by the order of arrival. Actions:

- ``None``: the true answer
- ``("slow", seconds)``: the true answer after sleeping (cut short when the server closes)
- ``("status", code)``: that HTTP error with a vLLM-shaped JSON error body
- ``("garbage",)``: HTTP 200, ``application/json``, a body that is not JSON
- ``("short", n)``: the true answer with its last ``n`` positions dropped
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def _logprob_entry(logp_V: torch.Tensor, token: int, k: int, tokenizer) -> dict:
    """vLLM's dict for one position: the actual token first, then the top ``k`` (a token in both
    keeps its first place)."""
    def one(i: int) -> dict:
        rank = int((logp_V > logp_V[i]).sum()) + 1
        return {"logprob": max(float(logp_V[i]), -9999.0), "rank": rank, "decoded_token": tokenizer.decode([i])}

    entry = {str(token): one(token)}
    for i in logp_V.topk(k).indices.tolist() if k else []:
        entry[str(i)] = one(i)
    return entry


class LogprobServer:
    def __init__(self, model, tokenizer, name: str = "teacher", fault=None, tokenize: bool = True,
                 max_model_len: int = 2048):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.fault, self.tokenize, self.max_model_len = fault, tokenize, max_model_len
        self.requests: list[dict] = []  # {"path", "body", "headers" (lower-case names)}
        self.attempts: dict[tuple, int] = {}
        self.lock, self.forward_lock, self.stop = threading.Lock(), threading.Lock(), threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.root + "/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], k: int) -> tuple[list, int]:
        """The ``prompt_logprobs`` list of ``ids`` and the greedy next token."""
        with self.forward_lock:
            logits_TV = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        logp_TV = torch.log_softmax(logits_TV, -1)
        entries = [None] + [_logprob_entry(logp_TV[t - 1], ids[t], k, self.tokenizer) for t in range(1, len(ids))]
        return entries, int(logp_TV[-1].argmax())

    def completion(self, body: dict, drop: int = 0) -> tuple[int, dict]:
        ids, k = body.get("prompt"), body.get("prompt_logprobs")
        if not (isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids)):
            return 400, _error("this test server takes one prompt of token ids", 400)
        if len(ids) + int(body.get("max_tokens") or 16) > self.max_model_len:
            return 400, _error(f"prompt of {len(ids)} tokens + max_tokens exceeds {self.max_model_len}", 400)
        entries, nxt = self.prompt_logprobs(ids, int(k or 0))
        choice = {"index": 0, "text": self.tokenizer.decode([nxt]), "logprobs": None, "finish_reason": "length",
                  "stop_reason": None, "token_ids": None, "prompt_token_ids": None,
                  "prompt_logprobs": (entries[:len(entries) - drop] if k is not None else None)}
        return 200, {"id": "cmpl-test", "object": "text_completion", "created": int(time.time()),
                     "model": self.name, "choices": [choice],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}

    def tokenize_reply(self, body: dict) -> tuple[int, dict]:
        if not self.tokenize:
            return 404, {"detail": "Not Found"}
        ids = self.tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
        return 200, {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": None}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "headers": {k.lower(): v for k, v in self.headers.items()}})
                try:
                    self._send(*server.answer(self.path, body))
                except OSError:  # the client gave up (timeout) and closed the connection
                    pass

            def _send(self, code: int, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def answer(self, path: str, body: dict) -> tuple[int, dict | bytes]:
        """``(status, JSON object or raw bytes)`` for one request, faults applied."""
        if path == "/tokenize":
            return self.tokenize_reply(body)
        if path != "/v1/completions":
            return 404, {"detail": "Not Found"}
        if body.get("model") != self.name:
            return 404, _error(f"The model `{body.get('model')}` does not exist.", 404)
        key = tuple(body.get("prompt") or ())
        with self.lock:
            attempt = self.attempts.get(key, 0)
            self.attempts[key] = attempt + 1
        action = self.fault(list(key), attempt) if self.fault else None
        if action is None:
            return self.completion(body)
        if action[0] == "slow":
            if self.stop.wait(action[1]):  # closing: nobody waits for this answer
                return 503, _error("the server is closing", 503)
            return self.completion(body)
        if action[0] == "status":
            return action[1], _error("scripted failure", action[1])
        if action[0] == "garbage":
            return 200, b'{"id": "cmpl-test", "choices": [{"prompt_logprobs": [nul'
        if action[0] == "short":
            return self.completion(body, drop=action[1])
        raise ValueError(f"unknown fault action {action!r}")


def _error(message: str, code: int) -> dict:
    """vLLM's ErrorResponse body."""
    return {"error": {"message": message, "type": "BadRequestError" if code == 400 else "Error", "param": None,
                      "code": code}}
