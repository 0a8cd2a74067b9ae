"""A scripted OpenAI-compatible judge on 127.0.0.1 that follows fixed rules, for testing the RLAIF loop.

Comparisons: the shorter option wins (equal lengths: A). A prompt containing FLIP is always answered A (pure
position bias), GARBAGE gets an answer that is not a letter, DOWN a 500, BUSY two 429s before it is answered,
SLOW an answer after `slow` seconds. Critique and revision requests get fixed texts. With `logprobs` the
winning letter has probability 0.8; with `refuse_logprobs` a request for them is a 400, as ayar serve's.
`stall_after`: after that many comparisons every request hangs (to kill a client mid-way).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubJudge:
    def __init__(self, logprobs: bool = True, refuse_logprobs: bool = False):
        self.logprobs, self.refuse_logprobs = logprobs, refuse_logprobs
        self.slow = 5.0
        self.stall_after: int | None = None
        self.requests = Counter()  # kind -> count
        self.busy = Counter()  # prompt -> 429s sent
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    status, payload = 404, {"error": {"message": f"no route {self.path}"}}
                else:
                    status, payload = stub.answer(body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def answer(self, body: dict) -> tuple[int, dict]:
        prompt = body["messages"][-1]["content"]
        compare = "\nOptions:\n(A) " in prompt
        with self.lock:
            self.requests["compare" if compare else "text"] += 1
            stalled = compare and self.stall_after is not None and self.requests["compare"] > self.stall_after
        if stalled:
            time.sleep(3600)
        if "DOWN" in prompt:
            return 500, {"error": {"message": "down"}}
        if "BUSY" in prompt:
            with self.lock:
                self.busy[prompt] += 1
                if self.busy[prompt] <= 2:
                    return 429, {"error": {"message": "slow down"}}
        if "SLOW" in prompt:
            time.sleep(self.slow)
        if compare and body.get("logprobs") and self.refuse_logprobs:
            return 400, {"error": {"message": "logprobs are not supported by this server", "param": "logprobs"}}
        if not compare:
            text = "REVISED: a kind and careful answer." if "Revision request:" in prompt else "It could be kinder."
            return 200, _reply(text)
        if "GARBAGE" in prompt:
            return 200, _reply("Both are fine, I cannot choose.")
        a, b = options(prompt)
        letter = "A" if "FLIP" in prompt or len(a) <= len(b) else "B"
        logprobs = None
        if body.get("logprobs") and self.logprobs:
            other = "B" if letter == "A" else "A"
            top = [{"token": letter, "logprob": math.log(0.8)}, {"token": other, "logprob": math.log(0.2)}]
            logprobs = {"content": [{"token": letter, "logprob": math.log(0.8), "top_logprobs": top}]}
        return 200, _reply(letter, logprobs)


def options(prompt: str) -> tuple[str, str]:
    """The two answers of a comparison prompt (rlaif/prompts.py COMPARE)."""
    rest = prompt.split("\nOptions:\n(A) ", 1)[1]
    a, rest = rest.rsplit("\n(B) ", 1)
    b = rest.rsplit("\n\nAnswer with one letter", 1)[0]
    return a, b


def _reply(text: str, logprobs=None) -> dict:
    return {
        "id": "stub",
        "object": "chat.completion",
        "model": "stub-judge",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": logprobs,
            }
        ],
    }
