"""Data-parallel training (torchrun, gloo on CPU): N processes take the step one process
takes on the same global batch; resume, multi-node rendezvous and the agreements."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from effusion.config import ConfigError
from effusion.runs import read_metrics
from effusion.train.distributed import Dist, check_batch

from conftest import REPO_ROOT, TINY_OVERRIDES

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this torch build has no torch.distributed")

COMMON = [o for o in TINY_OVERRIDES if not o.startswith("model.num_classes")] + [
    "model.num_classes=-1", "train.checkpoint_every=3", "train.keep_checkpoints=3",
    "train.max_steps=6", "data.translate=2"]  # class-conditional, with label dropout and augmentation


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO_ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def effusion(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m effusion ARGS` as a user types it, in a clean environment."""
    r = subprocess.run([sys.executable, "-m", "effusion", *args], env=_env(), text=True,
                       capture_output=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def train_cmd(run: Path, *extra: str, nproc: int = 1) -> list[str]:
    sets = [x for kv in COMMON + list(extra) for x in ("--set", kv)]
    return ["train", "--quiet", "--run", str(run), "--nproc", str(nproc), *sets]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"step-{step:07d}"
    return {f"{f}/{k}": v for f in ("model", "ema")
            for k, v in load_file(str(ckpt / f"{f}.safetensors")).items()}


def assert_same(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_end_with_the_weights_of_one(tmp_path, accum):
    one, two = tmp_path / "one", tmp_path / "two"
    effusion(*train_cmd(one, f"train.grad_accum={accum}"))
    r = effusion(*train_cmd(two, f"train.grad_accum={accum}", nproc=2))
    assert "data-parallel: 2 processes (gloo), global batch train.batch_size=8 = 2 x 4 per rank" in r.stdout
    assert r.stdout.count("trained 6 steps") == 1  # rank 0 reports, once
    assert_same(weights(one, 6), weights(two, 6))
    la = [m["loss"] for m in read_metrics(one) if "loss" in m]
    lb = [m["loss"] for m in read_metrics(two) if "loss" in m]
    assert lb == pytest.approx(la, abs=1e-5)  # the logged loss is the global batch's
    assert (two / "samples" / "step-0000006.png").is_file()  # rank 0's artifacts


def test_bucketed_two_processes_end_with_the_weights_of_one(tmp_path):
    """Mixed aspect ratios, one bucket per global batch; the epoch's batches here are
    8, 10, 8, 8, 11, 9 images: the odd ones split 5 + 6 and 4 + 5 over the ranks."""
    bucketed = ["data.source=shapes:60:2", "data.image_size=16", "data.channels=3",
                "data.aspect_ratios=[0.5,1,2]", "data.buckets=[[16,16],[16,24],[24,16]]",
                "data.limit=0", "train.checkpoint_every=6"]
    one, two = tmp_path / "one", tmp_path / "two"
    effusion(*train_cmd(one, *bucketed))
    r = effusion(*train_cmd(two, *bucketed, nproc=2))
    assert "buckets 16x16: " in r.stdout
    assert_same(weights(one, 6), weights(two, 6))


def test_fsdp_two_processes_end_with_the_weights_of_one_and_resume_anywhere(tmp_path):
    """FSDP2 (sharded weights, gradients, moments; grad_accum=2 syncs on the last micro-
    batch only) takes the step one process takes; its checkpoints are gathered into the
    one-process layout, so FSDP, DDP and a single process all resume them."""
    one, two = tmp_path / "one", tmp_path / "two"
    effusion(*train_cmd(one, "train.grad_accum=2"))
    r = effusion(*train_cmd(two, "train.grad_accum=2", "train.parallel=fsdp", nproc=2))
    assert "FSDP2: weights, gradients and optimizer moments sharded over 2 ranks" in r.stdout
    assert_same(weights(one, 6), weights(two, 6))
    assert (two / "samples" / "step-0000006.png").is_file()  # the gathered EMA, sampled
    for how, extra in (("fsdp", ["train.parallel=fsdp"]), ("single", [])):
        b = tmp_path / how  # killed after the step-3 checkpoint, resumed this way
        shutil.copytree(two, b)
        shutil.rmtree(b / "checkpoints" / "step-0000006")
        r = effusion(*train_cmd(b, "train.grad_accum=2", *extra, nproc=2 if extra else 1))
        assert "resuming" in r.stdout
        assert_same(weights(two, 6), weights(b, 6))


def test_a_killed_two_process_run_resumes_identically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    effusion(*train_cmd(a, nproc=2))
    shutil.copytree(a, b)  # b is a "killed" right after its step-3 checkpoint
    shutil.rmtree(b / "checkpoints" / "step-0000006")
    r = effusion(*train_cmd(b, nproc=2))  # the same command resumes
    assert "resuming" in r.stdout
    assert_same(weights(a, 6), weights(b, 6), atol=1e-6)
    assert [m["step"] for m in read_metrics(b) if "loss" in m] == list(range(1, 7))


def test_two_nodes_rendezvous_on_localhost(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "effusion", *train_cmd(run), "--nnodes", "2",
           "--rdzv-endpoint", f"127.0.0.1:{port}"]
    procs = [subprocess.Popen(cmd, env=_env(), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "data-parallel: 2 processes" in "".join(outs)
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == list(range(1, 7))


def test_a_time_budget_stops_every_rank_at_the_same_step(tmp_path):
    run = tmp_path / "run"
    effusion(*train_cmd(run, "train.max_steps=100000", "train.max_minutes=0.05",
                        "train.budget_min_steps=0", "train.checkpoint_every=1000", nproc=2))
    planned = [m["budget_steps"] for m in read_metrics(run) if "budget_steps" in m]
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    # both ranks left the loop together (else the job would hang or fail): on rank 0's
    # plan if the run got that far, else at rank 0's clock
    assert steps == list(range(1, steps[-1] + 1))
    if planned:
        assert steps[-1] <= planned[0]


def test_what_data_parallel_training_refuses(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="must divide evenly over the 3 processes"):
        check_batch(Dist(0, 3, 0), 8)
    from effusion.config import load_config

    with pytest.raises(ConfigError, match="fsdp with train.compile is not supported"):
        load_config(None, ["train.parallel=fsdp", "train.compile=true"])
    with pytest.raises(ConfigError, match="fsdp with train.posthoc_ema is not supported"):
        load_config(None, ["train.parallel=fsdp", "train.posthoc_ema=[0.05]"])
    check_batch(Dist(0, 2, 0), 8)
    assert Dist(1, 2, 1).shard(8) == slice(4, 8)
    # a recipe that is not data-parallel says so before joining any process group
    from effusion.recipes import classifier_config, train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="trains in one process"):
        train(classifier_config(["train.epochs=1"]), tmp_path / "clf", progress=False)
    r = effusion("train", "--nproc", "2", "--nnodes", "2", "--run", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and "--rdzv-endpoint" in r.stdout + r.stderr
