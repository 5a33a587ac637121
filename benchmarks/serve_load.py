"""Load test of `effusion serve`: dynamic batching against `--max-batch 1` and against the
sampler itself, cold start, the on-disk compile cache, and the queue limit under a flood.

    python benchmarks/serve_load.py [--run RUN ...] [--clients 1,8,32,64] [--requests 3]
                                    [--cold-start RUN [--exported RUN] [--compile]]
                                    [--json benchmarks/results/serve_load.json]

Without --run it serves the digits run the tests use (tests/data/serve-digits: the default
recipe at width 16, 1,152 steps), rebuilt into a temporary directory. For each run:

1. In-process: `generate_seeded` (what the server calls) at batch 1, 8 and 32, in a fresh
   process; images/s.
2. The server (`effusion serve`, its own process, 127.0.0.1) with dynamic batching, then
   with `--max-batch 1`: for each client count, every client sends `--requests` requests of
   one image one after another. p50/p95/p99 latency, images/s, the batch-size histogram
   (from /metrics), errors by status. Cold start: process start to the first image.
3. A flood: 256 clients asking for 8 images each against `--max-queue 64`: the 503s,
   the largest queue seen on /metrics, and the server's peak RSS (VmHWM) before and after.

Targets (issue 16), at 32 clients x 1 image, no 5xx but the intended 503s: dynamic batching
>= 90% of the in-process images/s at batch 32, and >= 2x `--max-batch 1`.

`--cold-start RUN`: process start to first image of RUN in eager PyTorch, of
`--exported` (its ONNX / OpenVINO graph on disk), and with `--compile` on an empty kernel
cache and again on the cache the first start filled (TORCHINDUCTOR_CACHE_DIR).

The load generator (asyncio + httpx) shares the 2 cores with the server; it sleeps on
sockets almost all the time, but its share is part of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

INPROC = r"""
import json, sys, time, torch
from effusion.runs import load_run
from effusion.sampling import generate_seeded
run = load_run(sys.argv[1])
K = run.num_classes
out = {}
generate_seeded(run, [0], steps=2)  # warm-up, as the server does
for b, calls in ((1, 8), (8, 3), (32, 2)):
    generate_seeded(run, list(range(b)))  # first call at this size: allocations
    best = 0.0
    for rep in range(3):  # best of 3: batch 1 on 2 shared cores varied up to 3x between runs
        t0 = time.perf_counter()
        for c in range(calls):
            generate_seeded(run, list(range(c * b, (c + 1) * b)))
        best = max(best, b * calls / (time.perf_counter() - t0))
    out[b] = best
print(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digits_run(tmp: Path) -> Path:
    """tests/data/serve-digits as a run directory (as the tests' fixture builds it)."""
    import torch
    from safetensors.torch import load_file

    from effusion.runs.files import save_checkpoint

    src, run = ROOT / "tests" / "data" / "serve-digits", tmp / "serve-digits"
    run.mkdir()
    shutil.copy(src / "config.yaml", run / "config.yaml")
    w = {k: v.float() for k, v in load_file(str(src / "ema-fp16.safetensors")).items()}
    save_checkpoint(run, 1152, model=w, ema=w, optimizer={"state": {}, "param_groups": []},
                    rng={"cpu": torch.get_rng_state()}, state={"fixture": True}, keep=1)
    return run


def inprocess(run: Path) -> dict[int, float]:
    p = subprocess.run([sys.executable, "-c", INPROC, str(run)], capture_output=True, text=True,
                       check=True)
    return {int(k): v for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items()}


class Server:
    def __init__(self, run: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "effusion", "serve", "--run", str(run), "--port",
               str(self.port), "--threads", str(os.cpu_count() or 2), *args]
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, **(env or {})})
        import httpx

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).json()["status"] == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.05)
        self.ready_s = time.perf_counter() - self.t0
        r = httpx.post(self.url + "/v1/generate", json={"n": 1, "seed": 0}, timeout=900)
        r.raise_for_status()
        self.first_image_s = time.perf_counter() - self.t0

    def metrics(self) -> str:
        import httpx

        return httpx.get(self.url + "/metrics", timeout=30).text

    def peak_rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def batch_histogram(before: str, after: str) -> dict[str, int]:
    def buckets(text: str) -> dict[str, float]:
        return {m.group(1): float(m.group(2)) for m in
                re.finditer(r'effusion_batch_size_bucket\{le="([^"]+)"\} ([0-9.e+]+)', text)}

    b, a = buckets(before), buckets(after)
    out, prev_a, prev_b = {}, 0.0, 0.0
    for le in a:
        n = (a[le] - prev_a) - (b.get(le, 0.0) - prev_b)
        prev_a, prev_b = a[le], b.get(le, 0.0)
        if n:
            out[f"<={le}" if le != "+Inf" else ">256"] = int(n)
    return out


class Conn:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: the load generator shares
    the 2 cores with the server, so it should cost as little as possible (httpx costs
    several ms of CPU per request)."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def post(self, path: str, obj: dict) -> tuple[int, bytes]:
        body = json.dumps(obj).encode()
        request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                   f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        for attempt in (0, 1):  # a keep-alive connection the server closed while idle: reopen
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                self.writer.write(request)
                await self.writer.drain()
                first = await self.reader.readline()
            except ConnectionError:
                first = b""
            if first:
                break
            await self.close()
        else:
            raise ConnectionError("the server closed the connection twice")
        status = int(first.split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            if k.lower() == "content-length":
                length = int(v)
            elif k.lower() == "connection" and v.strip().lower() == "close":
                close = True
        data = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def load(port: int, clients: int, requests: int, n: int = 1) -> dict:
    """`clients` connections, each sending `requests` requests one after another, after one
    unmeasured round (the first call at a new batch size builds its kernels; the in-process
    figures leave that call out too)."""
    lat, status = [], {}
    conns = [Conn(port) for _ in range(clients)]

    async def client(i: int, rounds: int, measured: bool) -> None:
        for r in range(rounds):
            t0 = time.perf_counter()
            code, _ = await conns[i].post("/v1/generate", {"n": n, "seed": 1000 * i + r * n,
                                                           "format": "npy"})
            if measured:
                status[code] = status.get(code, 0) + 1
                if code == 200:
                    lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(client(i, 1, False) for i in range(clients)))
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i, requests, True) for i in range(clients)))
    wall = time.perf_counter() - t0
    for c in conns:
        await c.close()
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {"clients": clients, "requests_each": requests, "images": len(lat) * n,
            "seconds": round(wall, 2), "images_per_s": round(len(lat) * n / wall, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p95_ms": round(1000 * q[94], 1) if lat else None,
            "p99_ms": round(1000 * q[98], 1) if lat else None,
            "status": {str(k): v for k, v in sorted(status.items())}}


async def flood(port: int, clients: int, n: int) -> dict:
    """Every client at once, one request of `n` images each: how many images the server
    took on (at most --max-queue waiting + --max-batch running) and how fast it said no."""
    status: dict[int, int] = {}
    refused_ms: list[float] = []

    async def one(i: int) -> None:
        c = Conn(port)
        t = time.perf_counter()
        code, _ = await c.post("/v1/generate", {"n": n, "seed": i * n, "format": "npy"})
        await c.close()
        status[code] = status.get(code, 0) + 1
        if code == 503:
            refused_ms.append(1000 * (time.perf_counter() - t))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    return {"clients": clients, "n_each": n, "seconds": round(time.perf_counter() - t0, 2),
            "status": {str(k): v for k, v in sorted(status.items())},
            "images_accepted": status.get(200, 0) * n,
            "refused_p50_ms": round(statistics.median(refused_ms), 1) if refused_ms else None,
            "refused_max_ms": round(max(refused_ms), 1) if refused_ms else None}


def measure_run(run: Path, clients: list[int], requests: int, extra: list[str] = ()) -> dict:
    print(f"== {run}", flush=True)
    row: dict = {"run": str(run), "in_process_images_per_s": inprocess(run)}
    print("in-process images/s:", row["in_process_images_per_s"], flush=True)
    for mode, args in (("dynamic", ["--max-batch", "64"]), ("max_batch_1", ["--max-batch", "1"])):
        srv = Server(run, *args, *extra)
        try:
            row.setdefault("cold_start", {})[mode] = {"ready_s": round(srv.ready_s, 2),
                                                      "first_image_s": round(srv.first_image_s, 2)}
            levels = []
            for c in clients:
                before = srv.metrics()
                res = asyncio.run(load(srv.port, c, requests))
                res["batch_sizes"] = batch_histogram(before, srv.metrics())
                levels.append(res)
                print(mode, json.dumps(res), flush=True)
            row[mode] = levels
            row.setdefault("peak_rss_mb", {})[mode] = round(srv.peak_rss_mb(), 1)
        finally:
            srv.close()
    srv = Server(run, "--max-batch", "64", "--max-queue", "64")
    try:
        rss_before = srv.peak_rss_mb()
        res = asyncio.run(flood(srv.port, 256, 8))
        res.update(max_queue=64, peak_rss_mb_before=round(rss_before, 1),
                   peak_rss_mb_after=round(srv.peak_rss_mb(), 1))
        row["flood"] = res
        print("flood", json.dumps(res), flush=True)
    finally:
        srv.close()
    at32 = {m: next((lv for lv in row[m] if lv["clients"] == 32), None) for m in ("dynamic", "max_batch_1")}
    if at32["dynamic"] and at32["max_batch_1"]:
        d, one = at32["dynamic"], at32["max_batch_1"]
        fives = sum(v for k, v in d["status"].items() if k.startswith("5"))
        row["targets_at_32"] = {
            "dynamic_vs_inprocess_b32": round(d["images_per_s"] / row["in_process_images_per_s"][32], 3),
            "dynamic_vs_max_batch_1": round(d["images_per_s"] / one["images_per_s"], 2),
            "5xx": fives,
            "met": bool(d["images_per_s"] >= 0.9 * row["in_process_images_per_s"][32]
                        and d["images_per_s"] >= 2 * one["images_per_s"] and fives == 0)}
    return row


def cold_start_row(run: Path, exported: Path | None, compile_: bool) -> dict:
    """Process start -> first image for the run in eager PyTorch, its exported graph (ONNX
    Runtime / OpenVINO: a compiled model kept on disk), and with --compile on an empty
    kernel cache and then on the cache the first start filled. The server's warm-up call
    compiles before it reports ready, so ready_s holds the compile."""
    out: dict = {}
    variants = [("eager", run, [], {})]
    if exported is not None:
        variants.append(("exported", exported, [], {}))
    cache = Path(tempfile.mkdtemp(prefix="inductor-"))
    if compile_:
        env = {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
        variants += [("compile_empty_cache", run, ["--compile"], env),
                     ("compile_warm_cache", run, ["--compile"], env)]
    for name, rd, args, env in variants:
        srv = Server(rd, *args, env=env)
        try:
            out[name] = {"run": str(rd), "ready_s": round(srv.ready_s, 2),
                         "first_image_s": round(srv.first_image_s, 2)}
            print("cold start", name, json.dumps(out[name]), flush=True)
        finally:
            srv.close()
    shutil.rmtree(cache, ignore_errors=True)
    if compile_:
        c0, c1 = out["compile_empty_cache"]["first_image_s"], out["compile_warm_cache"]["first_image_s"]
        out["kernel_cache_saves"] = round(1 - c1 / c0, 3)
    return out


def markdown(result: dict) -> str:
    lines = []
    for row in result["runs"]:
        ip = row["in_process_images_per_s"]
        lines += [f"### {row['run']}",
                  f"in-process sampler: {ip[1]:.2f} / {ip[8]:.2f} / {ip[32]:.2f} images/s at batch 1 / 8 / 32",
                  "", "| server | clients | images/s | p50 ms | p95 ms | p99 ms | batch sizes | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for mode in ("dynamic", "max_batch_1"):
            for lv in row[mode]:
                lines.append(f"| {mode} | {lv['clients']} | {lv['images_per_s']} | {lv['p50_ms']} | "
                             f"{lv['p95_ms']} | {lv['p99_ms']} | {lv['batch_sizes']} | {lv['status']} |")
        lines += ["", f"cold start (process start -> first image): {row['cold_start']}",
                  f"peak RSS MB: {row['peak_rss_mb']}; flood: {row['flood']}",
                  f"targets at 32 clients: {row.get('targets_at_32')}", ""]
    if result.get("cold_start"):
        lines.append(f"cold start: {result['cold_start']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", default=[], help="run dirs (default: the tests' digits run)")
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=3, help="requests per client per level")
    ap.add_argument("--cold-start", metavar="RUN", nargs="?", const="first",
                    help="the cold-start row for RUN (default: the first run)")
    ap.add_argument("--exported", help="an exported run dir of that run, for the cold-start row")
    ap.add_argument("--compile", action="store_true", help="add --compile to the cold-start row")
    ap.add_argument("--server-args", default="", help="more `effusion serve` flags for the load "
                    "levels, e.g. '--compile'")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    a = ap.parse_args()
    from effusion.precision import hardware

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    runs = [Path(r) for r in a.run] or [digits_run(tmp)]
    clients = [int(c) for c in a.clients.split(",")]
    result = {"machine": hardware(), "command": " ".join(sys.argv), "runs": []}
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in runs:  # written after each part, so a run cut short keeps what it measured
        result["runs"].append(measure_run(r, clients, a.requests, a.server_args.split()))
        out.write_text(json.dumps(result, indent=1))
    if a.cold_start:
        cold = runs[0] if a.cold_start == "first" else Path(a.cold_start)
        result["cold_start"] = cold_start_row(cold, Path(a.exported) if a.exported else None,
                                              a.compile)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"wrote {a.json}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
