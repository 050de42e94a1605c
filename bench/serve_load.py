"""Load and outage run of the APR server on CPU, against a tiny model.

    python bench/serve_load.py --model runs/demo/.../sft/model [--clients 32] [--seconds 60]

Topology as in the pod: `apr engine serve` (the engine, standing in for SGLang) and
`apr serve --engine sglang` (the APR server) as two processes on loopback. Phase 1: N clients
send solves for S seconds; prints throughput, p50/p99 latency, status codes and the APR
server's resident memory before and after. Phase 2 (--outage): under the same load the
engine is killed, left down, and restarted; prints the answers per phase (503s while down,
200s after) and how long the server took to recover.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import time
from collections import Counter

import httpx

from apr.ports import free_port
from apr.summary import percentile


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "apr.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_up(url: str, path: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}{path} did not come up")


async def load(url: str, clients: int, seconds: float, log: list) -> None:
    rng = random.Random(0)
    stop = time.time() + seconds

    async def client(k: int) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            while time.time() < stop:
                nums = [rng.randint(1, 99) for _ in range(4)]
                started = time.perf_counter()
                try:
                    status = (await http.post(url + "/v1/solve", json={
                        "nums": nums, "target": rng.randint(10, 100)})).status_code
                except httpx.HTTPError:
                    status = 0
                log.append((time.time(), status, time.perf_counter() - started))

    await asyncio.gather(*(client(k) for k in range(clients)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=256, help="thread context window")
    parser.add_argument("--outage", action="store_true", help="also run the outage phase")
    args = parser.parse_args()

    engine_port, server_port = free_port(), free_port()
    engine_url, url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{server_port}"
    engine_cmd = ["engine", "serve", "--model", args.model, "--port", str(engine_port)]
    engine = start(engine_cmd)
    server = start(["serve", "--engine", "sglang", "--engine-url", engine_url, "--host",
                    "127.0.0.1", "--port", str(server_port), "--max-tokens", str(args.max_tokens)])
    try:
        wait_up(engine_url, "/health")
        wait_up(url, "/readyz")
        before = rss_mib(server.pid)
        log: list = []
        started = time.time()
        asyncio.run(load(url, args.clients, args.seconds, log))
        wall = time.time() - started
        after = rss_mib(server.pid)
        ok = [seconds for _, status, seconds in log if status == 200]
        print(f"load: {args.clients} clients, {wall:.0f} s, {len(log)} requests, "
              f"statuses {dict(Counter(s for _, s, _ in log))}")
        print(f"throughput {len(ok) / wall:.2f} solves/s, p50 {percentile(ok, 0.5):.3f} s, "
              f"p99 {percentile(ok, 0.99):.3f} s, server RSS {before:.0f} MiB before, "
              f"{after:.0f} MiB after")
        if args.outage:
            log = []
            phases = {}

            async def outage() -> None:
                nonlocal engine
                task = asyncio.create_task(load(url, args.clients, 3 * args.seconds / 2, log))
                await asyncio.sleep(args.seconds / 2)
                phases["down"] = time.time()
                engine.kill()
                engine.wait()
                await asyncio.sleep(args.seconds / 2)
                phases["restart"] = time.time()
                engine = start(engine_cmd)
                await task

            asyncio.run(outage())
            first_ok = min((t for t, s, _ in log if s == 200 and t > phases["restart"]),
                           default=float("nan"))
            for name, lo, hi in (("before", 0, phases["down"]),
                                 ("down", phases["down"], phases["restart"]),
                                 ("after restart", phases["restart"], float("inf"))):
                counts = Counter(s for t, s, _ in log if lo <= t < hi)
                print(f"outage {name}: {dict(counts)}")
            print(f"first 200 after the engine restart: {first_ok - phases['restart']:.1f} s "
                  "(includes the engine's own start-up)")
    finally:
        for proc in (server, engine):
            proc.terminate()
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()
