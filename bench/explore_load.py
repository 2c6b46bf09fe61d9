"""Latency of `mlsae explore` under 8 concurrent clients on 127.0.0.1 (bounded: a fixed number
of requests per client). Usage:

    python bench/explore_load.py RUN [--evolution DIR] [--latent-requests 25] [--prompt-requests 3]

RUN must hold an index (`mlsae index RUN ...`). Prints p50 / p95 / max latency per endpoint;
the first prompt request (model load) is made before timing starts.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import uvicorn

from mlsae.explore.server import create_app

PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "Mr. Speaker, the state of our Union is",
    "The river flows through the valley towards the",
    "In 1969 the first humans walked on the",
]


def fetch(base: str, path: str, params: dict) -> float:
    t0 = time.perf_counter()
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=600) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
        json.loads(r.read())
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--evolution")
    ap.add_argument("--latent-requests", type=int, default=25)
    ap.add_argument("--prompt-requests", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--gen", type=int, default=8, help="tokens generated per steered prompt")
    a = ap.parse_args()
    app = create_app(a.run, evolution=a.evolution)
    ex = app.state.explorer
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    s0 = ex.db.saes[0]
    warm = fetch(base, "/api/prompt", {"sae": 0, "text": PROMPTS[0], "latent": 0})
    print(f"first prompt (loads the model and SAEs): {warm:.1f} s")
    steer = {"steer": 2, "factor": 1, "units": "max"}
    alone = {
        "latent": [fetch(base, "/api/latent", {"sae": 0, "latent": j}) for j in range(10)],
        "prompt (no steering)": [
            fetch(base, "/api/prompt", {"sae": 0, "text": t}) for t in PROMPTS[1:]
        ],
        "prompt (steer, next token only)": [
            fetch(base, "/api/prompt", {"sae": 0, "text": t, **steer, "gen": 0})
            for t in PROMPTS[1:]
        ],
        f"prompt (steer, {a.gen} tokens generated)": [
            fetch(base, "/api/prompt", {"sae": 0, "text": t, **steer, "gen": a.gen})
            for t in PROMPTS[1:]
        ],
    }
    for k, v in alone.items():
        print(f"one client: {k} median {1e3 * np.median(v):.0f} ms over {len(v)} requests")
    base_ms = np.median(alone["prompt (no steering)"])
    for k in list(alone)[2:]:
        print(f"  ratio {k} / no steering: {np.median(alone[k]) / base_ms:.1f}x")
    rng = np.random.default_rng(0)
    jobs = []
    for c in range(a.clients):
        job = [
            ("latent", {"sae": 0, "latent": int(rng.integers(s0["d_sae"]))})
            for _ in range(a.latent_requests)
        ]
        job += [
            (
                "prompt",
                {
                    "sae": 0,
                    "text": PROMPTS[(c + i) % len(PROMPTS)] + f" {c}",
                    "latent": int(rng.integers(s0["d_sae"])),
                    "steer": c,
                    "factor": 1,
                    "units": "max",
                    "gen": a.gen,
                },
            )
            for i in range(a.prompt_requests)
        ]
        if ex.graph is not None:
            nodes = rng.integers(len(ex.graph), size=a.latent_requests // 5)
            job += [
                ("graph", {"layer": int(ex.graph.layer[v]), "feature": int(ex.graph.feature[v])})
                for v in nodes
            ]
        rng.shuffle(job)
        jobs.append(job)
    lat: dict[str, list[float]] = {}
    lock = threading.Lock()

    def client(job):
        for kind, params in job:
            dt = fetch(base, f"/api/{kind}", params)
            with lock:
                lat.setdefault(kind, []).append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.clients) as pool:
        list(pool.map(client, jobs))
    wall = time.perf_counter() - t0
    server.should_exit = True
    th.join(30)
    print(
        f"{a.clients} concurrent clients, {sum(map(len, lat.values()))} requests, no error, "
        f"{wall:.1f} s wall"
    )
    print(f"{'endpoint':>8} {'n':>5} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    for k, v in lat.items():
        ms = 1e3 * np.asarray(v)
        print(
            f"{k:>8} {len(v):>5} {np.percentile(ms, 50):>9.0f} {np.percentile(ms, 95):>9.0f} "
            f"{ms.max():>9.0f}"
        )


if __name__ == "__main__":
    main()
