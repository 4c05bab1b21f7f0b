"""Load and abandonment figures for docs/reliability.md: fire requests at an in-process `qwenlink serve` server.

Fires `--requests` requests from `--concurrency` client threads (a mix of /v1/completions and /v1/chat/completions,
one in five streaming, one in ten abandoned by closing the socket right after sending), counts the outcomes by status
(an exception such as a connection reset counts under its name), samples the process's resident memory every
half second, and checks /health afterwards. The model is the random `test-tiny` preset: the figures are about the
server's plumbing, not the model.

    .venv/bin/python benchmarks/bench_server_load.py --requests 1500 --concurrency 80
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from qwenlink.inference.engine import Engine  # noqa: E402
from qwenlink.inference.server import ServerLimits, make_server, serve_in_thread  # noqa: E402
from qwenlink.models.presets import get_preset  # noqa: E402
from qwenlink.models.qwen2 import build_model  # noqa: E402
from qwenlink.tokenizer import Tokenizer  # noqa: E402


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_request(port: int, i: int) -> str:
    chat = i % 2 == 0
    body: dict = {"max_tokens": 8, "temperature": 0 if i % 3 else 0.7, "stream": i % 5 == 0}
    if chat:
        body["messages"] = [{"role": "user", "content": f"request {i}"}]
    else:
        body["prompt"] = f"request {i}"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if i % 10 == 7:  # abandoned: send and leave
        raw = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
        return "abandoned"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return str(response.status)
    except Exception as exc:  # noqa: BLE001 - what the run exists to count
        return type(exc).__name__
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=80)
    parser.add_argument("--max-concurrent", type=int, default=64)
    args = parser.parse_args()
    from common import fixture_dir

    tok = Tokenizer.from_dir(fixture_dir("megatron-core-tiny-qwen2", "hf"))
    engine = Engine(build_model(get_preset("test-tiny"), seed=0).eval(), max_batch=8, max_length=256)
    server = make_server(engine, tok, "load", port=0,
                         limits=ServerLimits(max_tokens=16, max_prompt_tokens=200, max_concurrent=args.max_concurrent))
    serve_in_thread(server)
    port = server.server_address[1]
    outcomes: collections.Counter = collections.Counter()
    memory: list[tuple[float, float]] = []
    lock = threading.Lock()
    counter = iter(range(args.requests))
    start = time.monotonic()
    done = threading.Event()

    def sampler() -> None:
        while not done.is_set():
            memory.append((time.monotonic() - start, rss_mib()))
            time.sleep(0.5)

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            result = one_request(port, i)
            with lock:
                outcomes[result] += 1

    threading.Thread(target=sampler, daemon=True).start()
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 30
    while server.state.worker.load and time.monotonic() < deadline:
        time.sleep(0.1)
    done.set()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    elapsed = time.monotonic() - start
    print(json.dumps({"requests": args.requests, "concurrency": args.concurrency,
                      "max_concurrent": args.max_concurrent, "seconds": round(elapsed, 1),
                      "outcomes": dict(sorted(outcomes.items())), "health_after": health,
                      "rss_mib": [[round(t, 1), round(m, 1)] for t, m in memory[:: max(1, len(memory) // 12)]]
                      + [[round(memory[-1][0], 1), round(memory[-1][1], 1)]]}, indent=1))
    server.shutdown()
    server.state.worker.stop()


if __name__ == "__main__":
    main()
