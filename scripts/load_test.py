"""A bounded load test of ``hypersd serve`` on the loopback: latency and throughput of its
``/generate`` and ``/scribble`` endpoints, alone and under many concurrent clients.

For each endpoint, two phases, each a fixed number of requests through ``gradio_client``:
  1 client    ``--solo`` requests one after another: the latency a visitor sees;
  N clients   ``--clients`` clients, each its own connection, started together, each sending
              ``--requests`` requests one after another: the queue under load.
Each request is timed from submit to its images downloaded; the server's own generation time
(the page's latency line) is recorded beside it. Prompts rotate over a few emoji, seeds differ.
The test stops by itself: no request is sent after ``--deadline`` seconds, none waits more than
``--timeout``; it targets only loopback addresses. Without ``--url`` it starts ``hypersd serve``
on a free loopback port and ends that server when done.

Writes ``--out``.md and .json (default benchmarks/serve-load) with the command that made them.

  .venv/bin/python scripts/load_test.py                      # 50 clients x 4 requests per endpoint
  .venv/bin/python scripts/load_test.py --clients 5 --requests 2 --solo 5 --out /tmp/load
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image, ImageDraw

PROMPTS = ["rocket", "red apple", "ghost", "grinning face", "soccer ball", "japan flag"]
SERVER_MS = re.compile(r"\*\*(\d+) ms\*\*")


@dataclass
class Phase:
    """One phase's requests: each one's latency in seconds (None: failed) and the server's ms."""

    endpoint: str
    clients: int
    latencies: list = field(default_factory=list)
    server_ms: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    not_sent: int = 0
    seconds: float = 0.0
    images: int = 0

    def summary(self) -> dict:
        ok = sorted(x for x in self.latencies if x is not None)
        pct = lambda q: 1000 * ok[min(len(ok) - 1, int(q * len(ok)))] if ok else None  # noqa: E731
        return {"endpoint": self.endpoint, "clients": self.clients, "requests": len(self.latencies),
                "errors": len(self.errors), "not_sent": self.not_sent, "p50_ms": pct(0.5), "p95_ms": pct(0.95),
                "max_ms": 1000 * ok[-1] if ok else None,
                "images_per_s": self.images / self.seconds if self.seconds else 0,
                "server_p50_ms": statistics.median(self.server_ms) if self.server_ms else None,
                "first_errors": sorted(set(self.errors))[:3]}


def check_loopback(url: str) -> str:
    """``url`` if its host is a loopback address, else exit: this test sends traffic nowhere else."""
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        sys.exit(f"load_test: {url} is not on the loopback (127.0.0.0/8, ::1, localhost): refused")
    return url


def start_server(args, log: Path) -> tuple[subprocess.Popen, str]:
    """``hypersd serve`` on a free loopback port (its output in ``log``), once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "hypersd.cli", "serve", "--port", str(port), *shlex.split(args.serve_args)]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + args.startup
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"load_test: the server stopped (exit {proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(1)
    proc.terminate()
    sys.exit(f"load_test: the server did not answer within {args.startup} s")


def drawing(folder: Path) -> str:
    """A V in dark strokes on white, as the page's sketchpad sends it."""
    image = Image.new("RGB", (256, 256), "white")
    ImageDraw.Draw(image).line([(64, 48), (128, 200), (192, 48)], fill="black", width=12)
    path = folder / "v.png"
    image.save(path)
    return str(path)


def request_args(endpoint: str, i: int, sketch: str) -> tuple[tuple, dict]:
    from gradio_client import handle_file
    prompt = PROMPTS[i % len(PROMPTS)]
    if endpoint == "generate":
        return (prompt,), {"seed": i, "api_name": "/generate"}
    editor = {"background": None, "layers": [], "composite": handle_file(sketch)}
    return (prompt, editor), {"seed": i, "api_name": "/scribble"}


def run_client(client, endpoint: str, first: int, count: int, phase: Phase, args, stop: float, lock) -> None:
    """``count`` requests one after another, each recorded in ``phase``."""
    for i in range(first, first + count):
        if time.monotonic() > stop:
            with lock:
                phase.not_sent += first + count - i
            return
        call, kwargs = request_args(endpoint, i, args.sketch)
        start = time.perf_counter()
        try:
            result = client.submit(*call, **kwargs).result(timeout=args.timeout)
            took, error = time.perf_counter() - start, None
        except Exception as e:  # noqa: BLE001 - every failure is counted and named
            took, error, result = None, f"{type(e).__name__}: {str(e)[:120]}", None
        with lock:
            phase.latencies.append(took)
            if error:
                phase.errors.append(error)
            else:
                phase.images += len(result[0]) if endpoint == "generate" else 1
                found = SERVER_MS.search(result[-1] or "")
                if found:
                    phase.server_ms.append(int(found.group(1)))


def run_phase(url: str, endpoint: str, clients: int, requests: int, args) -> Phase:
    from gradio_client import Client
    phase, lock = Phase(endpoint, clients), threading.Lock()
    with ThreadPoolExecutor(clients) as pool:
        connections = list(pool.map(lambda _: Client(url, verbose=False), range(clients)))
    stop = time.monotonic() + args.deadline
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for c, client in enumerate(connections):
            pool.submit(run_client, client, endpoint, c * requests, requests, phase, args, stop, lock)
    phase.seconds = time.perf_counter() - start
    for client in connections:
        client.close()
    return phase


def report(rows: list[dict], args, url: str) -> None:
    command = "python " + " ".join(shlex.quote(a) for a in ["scripts/load_test.py", *sys.argv[1:]])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine, "url": url,
                                                    "rows": rows}, indent=1) + "\n")
    head = ("| endpoint | clients | requests | errors | p50 ms | p95 ms | max ms | images/s | server p50 ms |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v: "-" if v is None else f"{v:.0f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"| /{r['endpoint']} | {r['clients']} | {r['requests']} | {r['errors'] + r['not_sent']} | "
             f"{fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['max_ms'])} | {r['images_per_s']:.1f} | "
             f"{fmt(r['server_p50_ms'])} |" for r in rows]
    errors = [f"- /{r['endpoint']}, {r['clients']} clients: {e}" for r in rows for e in r["first_errors"]]
    out.with_suffix(".md").write_text(
        f"Load test of `hypersd serve` ({machine}), made by\n\n    {command}\n\n"
        "Latency: submit to images downloaded, through gradio_client; server: the generation alone.\n\n"
        f"{head}\n" + "\n".join(lines) + "\n" + ("\nErrors:\n" + "\n".join(errors) + "\n" if errors else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server on the loopback (default: start one)")
    parser.add_argument("--serve-args", default="", help="more `hypersd serve` flags for the started server, "
                        "e.g. \"--controlnet runs/controlnet/controlnet\"")
    parser.add_argument("--endpoints", default="generate,scribble")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=4, help="requests per client in the concurrent phase")
    parser.add_argument("--solo", type=int, default=20, help="requests of the one-client phase")
    parser.add_argument("--timeout", type=float, default=120, help="seconds one request may wait")
    parser.add_argument("--deadline", type=float, default=600, help="seconds after which a phase sends no more")
    parser.add_argument("--startup", type=float, default=300, help="seconds the started server may take")
    parser.add_argument("--out", default="benchmarks/serve-load")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "serve.log"
        proc, url = (None, check_loopback(args.url)) if args.url else start_server(args, log)
        try:
            args.sketch = drawing(Path(folder))
            rows = []
            for endpoint in args.endpoints.split(","):
                for clients, requests in ((1, args.solo), (args.clients, args.requests)):
                    rows.append(run_phase(url, endpoint, clients, requests, args).summary())
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            if proc is not None:  # the server this test started, and only it
                proc.terminate()
                proc.wait(timeout=30)
    report(rows, args, url)
    print(f"wrote {args.out}.md and .json")
    return 1 if any(r["errors"] or r["not_sent"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
