"""`effusion serve`: the batcher, the API through an in-process client, a real uvicorn
server (client disconnects), and the page in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="httpx (the test client) is not installed")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from effusion.config import ConfigError  # noqa: E402
from effusion.runs import load_run  # noqa: E402
from effusion.sampling import generate, generate_seeded  # noqa: E402
from effusion.serve import Batcher, QueueFull, ServeSettings, check_address, create_app  # noqa: E402

FAST = {"steps": 2}  # requests in these tests sample 2 steps: the API is under test, not quality


@pytest.fixture(scope="module")
def digits(digits_run):
    return load_run(digits_run, device="cpu")


def client(run, **settings) -> TestClient:
    return TestClient(create_app(run, ServeSettings(**settings)))


def png(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    m = re.search(pat, text)
    return float(m.group(1)) if m else 0.0


# --------------------------------------------------------------------------- the batcher

class FakeModel:
    """run_batch stand-in: records calls; image i is filled with its seed (mod 256)."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[tuple] = []
        self.gate = gate
        self.stopped = 0

    def __call__(self, key, seeds, labels, should_stop):
        self.calls.append((key, list(seeds)))
        if self.gate is not None:
            while not self.gate.wait(0.01):
                if should_stop():
                    self.stopped += 1
                    raise RuntimeError("stopped")
        return np.stack([np.full((1, 2, 2), s % 256, dtype=np.uint8) for s in seeds])


def run_async(coro):
    return asyncio.run(coro)


def test_batcher_merges_requests_in_window_and_splits_large_ones():
    async def main():
        model = FakeModel()
        b = Batcher(model, max_batch=4, window_ms=50, max_queue=64)
        b.start()
        jobs = [b.submit("k", [10 * i + j for j in range(n)], None) for i, n in enumerate([1, 2, 1])]
        big = b.submit("k", list(range(100, 110)), None)  # 10 images, max batch 4
        out = [await j.future for j in jobs]
        out_big = await big.future
        await b.stop()
        return model, out, out_big, jobs, big

    model, out, out_big, jobs, big = run_async(main())
    sizes = [len(s) for _, s in model.calls]
    assert sizes == [4, 4, 4, 2]  # 1+2+1 merged, then the big one spread, in arrival order
    assert model.calls[0][1] == [0, 10, 11, 20]
    assert [o[:, 0, 0, 0].tolist() for o in out] == [[0], [10, 11], [20]]
    assert out_big[:, 0, 0, 0].tolist() == list(range(100, 110))
    assert big.batch_sizes == [4, 4, 2] and jobs[0].batch_sizes == [4]


def test_batcher_groups_by_settings_and_refuses_a_full_queue_at_once():
    async def main():
        gate = threading.Event()
        model = FakeModel(gate)
        b = Batcher(model, max_batch=8, window_ms=0, max_queue=5)
        b.start()
        first = b.submit("a", [1, 2], None)
        while not model.calls:  # the first batch is running (not waiting) now
            await asyncio.sleep(0.005)
        waiting = [b.submit("b", [3, 4], None), b.submit("a", [5, 6, 7], None)]
        assert b.waiting == 5
        t0 = time.perf_counter()
        with pytest.raises(QueueFull) as e:
            b.submit("a", [8], None)
        refused_in = time.perf_counter() - t0
        gate.set()
        await first.future
        for j in waiting:
            await j.future
        await b.stop()
        return model, e.value, refused_in

    model, err, refused_in = run_async(main())
    assert refused_in < 0.05 and err.retry_after >= 1
    assert [(k, s) for k, s in model.calls] == [("a", [1, 2]), ("b", [3, 4]), ("a", [5, 6, 7])]


def test_batcher_cancel_drops_waiting_work_and_stops_an_abandoned_batch():
    async def main():
        gate = threading.Event()
        model = FakeModel(gate)
        b = Batcher(model, max_batch=2, window_ms=0, max_queue=16)
        b.start()
        running = b.submit("k", [1, 2], None)
        while not model.calls:
            await asyncio.sleep(0.005)
        queued = b.submit("k", [3, 4, 5], None)
        assert b.cancel(queued) == 3 and b.waiting == 0
        b.cancel(running)  # every request in the running batch has left: it stops
        for _ in range(200):
            if model.stopped:
                break
            await asyncio.sleep(0.01)
        await b.stop()
        return model, running, queued

    model, running, queued = run_async(main())
    assert model.stopped == 1 and len(model.calls) == 1
    assert queued.future.cancelled() and running.future.cancelled()


# --------------------------------------------------------------------------- the API

def test_generate_formats_shapes_and_seeds(digits):
    with client(digits) as c:
        r = c.post("/v1/generate", json={"n": 3, "class": 7, "seed": 40, "format": "png", **FAST})
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["shape"] == [3, 1, 28, 28] and j["seeds"] == [40, 41, 42] and j["classes"] == [7] * 3
        assert j["sampler"] == "dpmpp_2m" and j["steps"] == 2 and j["guidance"] == 1.5
        ims = np.stack([png(b) for b in j["images"]])
        assert ims.shape == (3, 28, 28) and ims.dtype == np.uint8
        assert set(j["timings_ms"]) == {"queue", "sample", "total"}

        r = c.post("/v1/generate", json={"n": 3, "class": 7, "seed": 40, "format": "npy", **FAST})
        arr = np.load(io.BytesIO(base64.b64decode(r.json()["npy"])))
        np.testing.assert_array_equal(arr, ims)  # the same images, whatever the format

        r = c.post("/v1/generate", json={"n": 3, "class": 7, "seed": 40, "format": "grid", **FAST})
        g = png(r.json()["grid"])
        lay = r.json()["grid_layout"]
        assert lay == {"nrow": 2, "pad": 2} and g.shape == (2 + 2 * 30, 2 + 2 * 30)
        np.testing.assert_array_equal(g[2:30, 32:60], ims[1])

        # Image i of a request is the image of seed + i asked for alone (reproducible by seed),
        # and the same as the Python API with those seeds.
        r = c.post("/v1/generate", json={"n": 1, "class": 7, "seed": 42, "format": "npy", **FAST})
        one = np.load(io.BytesIO(base64.b64decode(r.json()["npy"])))
        np.testing.assert_array_equal(one[0], ims[2])
    api = generate_seeded(digits, [40, 41, 42], steps=2, cond=torch.tensor([7, 7, 7]))
    np.testing.assert_array_equal(api[:, 0].numpy(), ims)
    # Alone, a request equals `effusion sample` with its seed (one generator for one image).
    np.testing.assert_array_equal(
        generate(digits, 1, seed=42, steps=2, cond=torch.tensor([7]))[0, 0].numpy(), ims[2])


def test_any_class_is_picked_by_seed_and_info_describes_the_run(digits):
    with client(digits, max_n=8) as c:
        j = c.post("/v1/generate", json={"n": 4, "seed": 8, "class": "any", **FAST}).json()
        assert j["classes"] == [8, 9, 0, 1]
        j2 = c.post("/v1/generate", json={"n": 2, "seed": 8, "classes": [3, 5], **FAST}).json()
        assert j2["classes"] == [3, 5]
        info = c.get("/v1/info").json()
    assert info["classes"] == 10 and info["image"] == {"channels": 1, "height": 28, "width": 28}
    assert info["sampler"]["default"] == "dpmpp_2m" and info["sampler"]["steps"] == 25
    assert info["guidance"]["default"] == 1.5 and info["limits"]["max_n"] == 8
    assert info["step"] == 1152 and "token" not in info["limits"]


def test_concurrent_requests_are_batched_and_each_depends_only_on_its_seed(digits):
    """Eight clients at once share sampler calls; each image equals the one its seed gives
    alone. Exact equality is what this CPU gives (its kernels compute each row alike at
    any batch size); a GPU may differ in the last bit, hence the 1-level allowance."""
    def ask(c, seed, cls, out):
        r = c.post("/v1/generate", json={"n": 1 + seed % 2, "class": cls, "seed": seed,
                                         "format": "npy", **FAST})
        out[seed] = r.json()

    with client(digits, batch_window_ms=300) as c:
        out: dict[int, dict] = {}
        threads = [threading.Thread(target=ask, args=(c, s, s % 10, out)) for s in range(100, 108)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alone = {s: c.post("/v1/generate", json={"n": 1 + s % 2, "class": s % 10, "seed": s,
                                                  "format": "npy", **FAST}).json()
                 for s in range(100, 108)}
        metrics = c.get("/metrics").text
    assert max(max(j["batch_sizes"]) for j in out.values()) > 2  # they did share calls
    for s in out:
        a = np.load(io.BytesIO(base64.b64decode(out[s]["npy"]))).astype(int)
        b = np.load(io.BytesIO(base64.b64decode(alone[s]["npy"]))).astype(int)
        assert np.abs(a - b).max() <= 1, s
    assert metric(metrics, "effusion_batch_size_count") < 8 + 8  # fewer calls than requests


def test_a_request_larger_than_a_batch_is_split_and_unchanged(digits):
    with client(digits, max_batch=3, max_n=7) as c:
        split = c.post("/v1/generate", json={"n": 7, "seed": 3, "format": "npy", **FAST}).json()
    with client(digits, max_batch=64) as c:
        whole = c.post("/v1/generate", json={"n": 7, "seed": 3, "format": "npy", **FAST}).json()
    assert split["batch_sizes"] == [3, 3, 1] and whole["batch_sizes"] == [7]
    a, b = (np.load(io.BytesIO(base64.b64decode(j["npy"]))).astype(int) for j in (split, whole))
    assert np.abs(a - b).max() <= 1


BAD = [
    ({"n": 0}, "n", "between 1 and 16"),
    ({"n": 17}, "n", "between 1 and 16"),
    ({"n": 2.5}, "n", "integer"),
    ({"n": "4"}, "n", "integer"),
    ({"steps": 0}, "steps", "between 1 and 1000"),
    ({"steps": 1001}, "steps", "between 1 and 1000"),
    ({"class": 10}, "class", "between 0 and 9"),
    ({"class": -1}, "class", "between 0 and 9"),
    ({"classes": [1, 12]}, "classes", "between 0 and 9"),
    ({"class": 1, "classes": [1]}, "classes", "not both"),
    ({"sampler": "euler"}, "sampler", "ddim, ddpm, dpmpp_2m"),
    ({"guidance": -0.5}, "guidance", "between 0 and 20"),
    ({"guidance": 21}, "guidance", "between 0 and 20"),
    ({"guidance": "high"}, "guidance", "between 0 and 20"),
    ({"seed": -1}, "seed", "between 0 and"),
    ({"format": "jpeg"}, "format", "png, grid or npy"),
    ({"path": "/etc/passwd"}, "path", "unknown field"),
    ({"run": "/tmp/other-run"}, "run", "unknown field"),
]


@pytest.mark.parametrize("body,field,words", BAD, ids=[f"{b}" for b, _, _ in BAD])
def test_invalid_input_is_422_naming_the_field_and_range(digits, body, field, words):
    with client(digits, max_n=16, warmup=False) as c:
        r = c.post("/v1/generate", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and words in r.json()["error"]


@pytest.mark.parametrize("raw,words", [
    (b'{"n": 4', "not valid JSON"), (b"[1, 2]", "JSON object"), (b"\xff\xfe", "not valid JSON"),
    (b'{"n": 1, "pad": "' + b"x" * 5000 + b'"}', "limit is 4096"),
])
def test_malformed_or_oversized_body_is_422(digits, raw, words):
    with client(digits, max_body_bytes=4096, warmup=False) as c:
        r = c.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["field"] == "body" and words in r.json()["error"]
        # chunked, without a Content-Length: refused while streaming
        r = c.post("/v1/generate", content=iter([b'{"n": 1, "pad": "', b"x" * 5000, b'"}']))
        assert r.status_code == 422 and "over the limit" in r.json()["error"]


def test_guidance_and_classes_on_runs_that_cannot_take_them(tmp_path, make_cfg):
    from effusion.recipes import train

    train(make_cfg(), tmp_path / "uncond", progress=False)
    train(make_cfg("model.num_classes=10", "train.cond_drop=0"), tmp_path / "nodrop", progress=False)
    with client(load_run(tmp_path / "uncond", device="cpu"), warmup=False) as c:
        for body, field in [({"guidance": 2}, "guidance"), ({"class": 3}, "class")]:
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 422 and r.json()["field"] == field
            assert "unconditional" in r.json()["error"]
        j = c.post("/v1/generate", json={"n": 2, "seed": 1}).json()
        assert j["shape"] == [2, 1, 16, 16] and j["classes"] is None and j["guidance"] is None
    with client(load_run(tmp_path / "nodrop", device="cpu"), warmup=False) as c:
        r = c.post("/v1/generate", json={"guidance": 3})
        assert r.status_code == 422 and "cond_drop=0" in r.json()["error"]
        assert c.post("/v1/generate", json={"guidance": 1}).status_code == 200
        assert c.get("/v1/info").json()["guidance"]["default"] == 1.0


def test_token_guards_every_endpoint_but_health_and_page(digits):
    token = "s3cret-token"
    with client(digits, token=token, warmup=False) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/healthz").json()["auth"] is True
        assert c.get("/").status_code == 200
        for method, path in [("get", "/v1/info"), ("post", "/v1/generate"), ("get", "/metrics"),
                             ("get", "/openapi.json")]:
            for headers in [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": token}]:
                r = getattr(c, method)(path, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
        ok = {"Authorization": f"Bearer {token}"}
        assert c.get("/v1/info", headers=ok).status_code == 200
        assert c.post("/v1/generate", json=FAST, headers=ok).status_code == 200
        assert metric(c.get("/metrics", headers=ok).text, "effusion_requests_total",
                      path="auth", status="401") == 12


def test_binding_beyond_loopback_needs_a_token():
    check_address("127.0.0.1", None, False)
    check_address("localhost", None, False)
    check_address("::1", None, False)
    check_address("0.0.0.0", "a-long-token", False)
    check_address("0.0.0.0", None, True)
    for host in ("0.0.0.0", "192.168.1.5", "myhost.example"):
        with pytest.raises(ConfigError, match="--token"):
            check_address(host, None, False)
    with pytest.raises(ConfigError, match="contradict"):
        check_address("0.0.0.0", "a-long-token", True)
    with pytest.raises(ConfigError, match="at least 8"):
        ServeSettings(token="short").check()
    with pytest.raises(ConfigError, match="--max-n"):
        ServeSettings(max_n=300, max_queue=256).check()


def test_cli_refuses_an_open_address_without_a_token(digits_run):
    from typer.testing import CliRunner

    from effusion.cli import app

    r = CliRunner().invoke(app, ["serve", "--run", str(digits_run), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--token" in r.output


def test_full_queue_answers_503_with_retry_after_and_metrics_move(digits):
    with client(digits, max_queue=4, max_n=4, max_batch=4, batch_window_ms=0) as c:
        results: dict[str, object] = {}

        def ask(name, body):
            results[name] = c.post("/v1/generate", json=body)

        slow = threading.Thread(target=ask, args=("running", {"n": 4, "steps": 150, "seed": 1}))
        slow.start()
        for _ in range(500):
            if c.get("/healthz").json()["running"]:
                break
            time.sleep(0.01)
        waiting = threading.Thread(target=ask, args=("waiting", {"n": 4, "seed": 9, **FAST}))
        waiting.start()
        for _ in range(500):
            if c.get("/healthz").json()["queue"] == 4:
                break
            time.sleep(0.01)
        t0 = time.perf_counter()
        full = c.post("/v1/generate", json={"n": 1, **FAST})
        refused_in = time.perf_counter() - t0
        slow.join()
        waiting.join()
        text = c.get("/metrics").text
    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
    assert refused_in < 1.0  # at once, not after the running batch
    assert results["running"].status_code == 200 and results["waiting"].status_code == 200
    assert metric(text, "effusion_requests_total", path="/v1/generate", status="503") == 1
    assert metric(text, "effusion_requests_total", path="/v1/generate", status="200") == 2
    assert metric(text, "effusion_images_total") == 8
    assert metric(text, "effusion_batch_size_count") == 2
    assert metric(text, "effusion_queue_images") == 0


# --------------------------------------------------------------------------- a real server

class LiveServer:
    """uvicorn in a thread on a free port (what `effusion serve` runs)."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("uvicorn did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def test_a_client_that_disconnects_leaves_no_work_running(digits):
    import httpx

    app = create_app(digits, ServeSettings(batch_window_ms=0))
    with LiveServer(app) as srv:
        body = json.dumps({"n": 2, "steps": 1000, "sampler": "ddim", "seed": 0}).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            for _ in range(500):
                if httpx.get(srv.url + "/healthz").json()["running"]:
                    break
                time.sleep(0.01)
        t0 = time.perf_counter()  # the socket is closed: the batch must stop within a step or two
        for _ in range(1000):
            text = httpx.get(srv.url + "/metrics").text
            if metric(text, "effusion_stopped_batches_total"):
                break
            time.sleep(0.01)
        stopped_in = time.perf_counter() - t0
        health = httpx.get(srv.url + "/healthz").json()
        ok = httpx.post(srv.url + "/v1/generate", json=FAST, timeout=60)
    assert metric(text, "effusion_client_disconnects_total") == 1
    assert metric(text, "effusion_stopped_batches_total") == 1
    assert stopped_in < 5 and health["running"] == 0  # 1,000 steps would take minutes
    assert ok.status_code == 200  # and the server goes on


# --------------------------------------------------------------------------- the page

def _chromium() -> str | None:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_in_headless_chromium_generates_sevens(digits, feature_classifier, tmp_path):
    """Open the page, pick class 7, Generate, wait for the grid, check its pixel size and
    that the feature classifier calls most digits a 7; save a screenshot (the docs', when
    EFFUSION_SCREENSHOT names where)."""
    import os

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                   "(pip install playwright; its browser download is not needed)")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium: install Debian's package (apt-get install chromium); "
                    "`make test` tries to when it runs as root")
    clf = feature_classifier
    app = create_app(digits, ServeSettings())
    shot = Path(os.environ.get("EFFUSION_SCREENSHOT") or tmp_path / "serve-page.png")
    with LiveServer(app) as srv, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 820})
            page.goto(srv.url + "/")
            page.wait_for_selector("#class option[value='7']", state="attached")
            page.select_option("#class", "7")
            page.fill("#seed", "2024")
            page.fill("#n", "16")
            page.click("#go")
            page.wait_for_function("document.getElementById('grid').dataset.seed === '2024'",
                                   timeout=120_000)
            size = page.evaluate("[document.getElementById('grid').naturalWidth,"
                                 " document.getElementById('grid').naturalHeight]")
            src = page.get_attribute("#grid", "src")
            status = page.inner_text("#status")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert size == [4 * 30 + 2, 4 * 30 + 2]  # 16 digits of 28 px, 4 x 4 with 2-px gaps
    assert "seed 2024" in status and "ms" in status
    grid = png(src.split(",", 1)[1])
    cells = torch.stack([torch.from_numpy(grid[2 + 30 * r:30 + 30 * r, 2 + 30 * c:30 + 30 * c].copy())
                         for r in range(4) for c in range(4)])[:, None]
    pred = clf.predict(cells)[1].argmax(1)
    assert (pred == 7).float().mean() >= 0.75, pred.tolist()
    assert shot.stat().st_size > 5000


def test_a_failing_batch_answers_500_and_the_server_goes_on(digits):
    import dataclasses

    class Exploding(torch.nn.Module):
        """The run's network, failing on batches of 3 images (6 rows with guidance)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t, c=None, **kw):
            if x.shape[0] == 6:
                raise RuntimeError("boom")
            return self.inner(x, t, c, **kw)

    run = dataclasses.replace(digits, model=Exploding(digits.model))
    with client(run, warmup=False) as c:
        bad = c.post("/v1/generate", json={"n": 3, **FAST})
        good = c.post("/v1/generate", json={"n": 2, **FAST})
        health = c.get("/healthz")
        text = c.get("/metrics").text
    assert bad.status_code == 500 and "RuntimeError: boom" in bad.json()["error"]
    assert good.status_code == 200 and health.json()["status"] == "ok"
    assert metric(text, "effusion_requests_total", path="/v1/generate", status="500") == 1
