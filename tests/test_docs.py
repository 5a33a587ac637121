"""The docs (issue 29): the README's shape, tables that match their JSON, the site's strict
build, and a newcomer's path through the getting-started page."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO_ROOT, TINY_OVERRIDES

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    first = [ln.split("#")[0].strip() for ln in blocks[0].strip().splitlines()]
    assert first == ["make demo", "make test"]
    # the two commands come before any other section
    assert text.index("make demo") < text.index("\n## ")


def test_every_docs_link_in_the_readme_exists():
    for target in re.findall(r"\]\((docs/[^)#]+|CHANGELOG\.md)(?:#[^)]*)?\)", README.read_text()):
        assert (REPO_ROOT / target).is_file(), target


def test_tables_match_their_json():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import tables
    finally:
        sys.path.pop(0)
    assert tables.main(["--check"]) == 0  # prints the tables that differ
    # and the check does catch a drifted figure
    page = DOCS / "evaluation.md"
    text = page.read_text()
    m = tables.MARKER.search(text)
    assert m is not None, "evaluation.md has no generated table"
    drifted = text[:m.start("body")] + m.group("body").replace("|", "| 9", 1) + text[m.end("body"):]
    _, changed = tables.render_page(drifted, page)
    assert changed == [m.group("name")]


def test_version_is_one_and_printed():
    from typer.testing import CliRunner

    from effusion import __version__
    from effusion.cli import app

    meta = re.search(r'^version = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert __version__ == meta
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"effusion {meta}"
    assert f"## [{meta}]" in (REPO_ROOT / "CHANGELOG.md").read_text()


def test_docs_build_strict(tmp_path):
    if shutil.which("mkdocs") is None and not (REPO_ROOT / ".venv/bin/mkdocs").exists():
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    mkdocs = str(REPO_ROOT / ".venv/bin/mkdocs") if (REPO_ROOT / ".venv/bin/mkdocs").exists() \
        else shutil.which("mkdocs")
    r = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "getting-started" / "index.html").is_file()


def _tour() -> list[list[str]]:
    page = (DOCS / "getting-started.md").read_text()
    block = re.search(r"<!-- tour -->\n```bash\n(.*?)```\n<!-- /tour -->", page, re.S).group(1)
    return [ln.split() for ln in block.strip().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_newcomer_can_follow_getting_started(tmp_path):
    """The page's commands, in order, each with small overrides; each writes what the page
    says it writes."""
    pytest.importorskip("onnxruntime", reason="the tour exports to ONNX: pip install 'effusion[onnx]'")
    pytest.importorskip("fastapi", reason="the tour serves: pip install 'effusion[serve]'")
    from typer.testing import CliRunner

    from effusion.cli import app

    tiny = [a for o in TINY_OVERRIDES + ["model.num_classes=-1", "train.cond_drop=0.3"]
            for a in ("--set", o)]
    short = ["--set", "train.max_steps=2", "--set", "train.warmup_steps=1", "--minutes", "0"]
    extra = {"train": tiny, "sample": ["--steps", "2"], "evaluate": ["--n", "20", "--bpd-n", "0"],
             "distill-guidance": short, "distill-steps": short, "export": []}
    runs = tmp_path / "runs"
    cmds = _tour()
    assert [c[0] for c in cmds] == ["effusion"] * len(cmds)
    for cmd in cmds:
        args = [a.replace("runs/", f"{runs}/", 1) for a in cmd[1:]]
        verb = args[1] if args[0] == "optimize" else args[0]
        if verb == "serve":
            port = _free_port()
            proc = subprocess.Popen([sys.executable, "-m", "effusion", *args, "--port", str(port)],
                                    cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                for _ in range(120):
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                            assert r.status == 200
                            break
                    except OSError:
                        time.sleep(0.5)
                else:
                    raise AssertionError(proc.stdout.read1().decode()[-2000:] if proc.stdout else "")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            continue
        res = CliRunner().invoke(app, args + extra[verb])
        assert res.exit_code == 0, (cmd, res.output[-2000:])
    assert (runs / "demo" / "config.yaml").is_file() and (runs / "demo" / "checkpoints").is_dir()
    assert (runs / "demo" / "grid.png").is_file()
    assert (runs / "demo" / "metrics.json").is_file()
    assert (runs / "demo-fast" / "model.onnx").is_file()
