"""A stand-in for vLLM's OpenAI server (enough of it for the front's tests): `FakeVllm` in a
thread, or `python tests/fake_vllm.py --port N` as a process (what `--vllm-python` starts, given
a Python that runs this file for `-m vllm.entrypoints.openai.api_server`)."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLY = [7, 8, 9, 10]  # the stand-in's tokens, one per chunk


class FakeVllm:
    """A stand-in vLLM: records every request body; `mode` says how it answers."""

    def __init__(self, port: int | None = None) -> None:
        self.mode = "ok"
        self.bodies: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status, data):
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._json(200, {"data": [{"id": "m", "max_model_len": 256}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                if fake.mode == "hang":
                    time.sleep(3)
                    return
                if fake.mode == "fail":
                    return self._json(500, {"error": {"message": "engine core died", "code": 500}})
                if fake.mode == "refuse":
                    return self._json(400, {"error": {"message": "prompt too long", "code": 400}})
                if not body.get("stream"):  # classification: the label tokens' log-probabilities
                    wanted = body["logprob_token_ids"]
                    top = {f"token_id:{t}": -0.5 - t / 100 for t in wanted}
                    choice = {"index": 0, "logprobs": {"top_logprobs": [top]}, "token_ids": [wanted[0]]}
                    return self._json(200, {"choices": [choice]})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                n = body.get("n", 1)
                for j, token in enumerate(REPLY[: body["max_tokens"]]):
                    for i in range(n):
                        last = j == min(len(REPLY), body["max_tokens"]) - 1
                        choice = {
                            "index": i,
                            "token_ids": [token + i],
                            "finish_reason": "length" if last else None,
                            "logprobs": {
                                "token_logprobs": [-0.25],
                                "top_logprobs": [{f"token_id:{token + i}": -0.25, "token_id:3": -2.0}],
                            },
                        }
                        self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                        self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")

        self.port = port or _free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":  # as a process: serve until killed, on --port
    args = sys.argv[1:]
    fake = FakeVllm(int(args[args.index("--port") + 1]))
    print("fake vLLM on", fake.url, "given", " ".join(args), flush=True)
    fake.thread.join()
