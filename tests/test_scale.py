"""Scale-out on the engines people run, each for real on 127.0.0.1: training on two nodes as the
docs' torchrun recipe runs it (two `torchrun` launches, node ranks 0 and 1, gloo), and `-m`
sweeps whose trials run as submitit jobs (Optuna, two at a time) and as tasks on a Ray head the
test starts."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, idx_overrides, run_cli
from test_serve import free_port


@pytest.mark.slow
def test_torchrun_on_two_nodes_trains_one_run_on_disjoint_shards(tmp_path, idx_source):
    from mlflow.tracking import MlflowClient

    src, sums = idx_source
    data = [f"paths.root={tmp_path}", *idx_overrides(src, sums)]
    assert run_cli("command=download", *data, cwd=tmp_path).returncode == 0  # data in place once
    out = tmp_path / "outputs" / "two-nodes"  # the shared run folder both nodes write to
    overrides = [
        *data,
        f"paths.output_dir={out}",
        "train.epochs=1",
        "train.batch_size=16",
        "train.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "trainer.strategy=ddp",
        "trainer.enable_progress_bar=false",
    ]
    port = free_port()
    env = {**os.environ, "PROBE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(ROOT / "tests" / "torchrun_probe.py"),
                *overrides,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"node{rank}.err", "w"),  # noqa: SIM115 (closed with the process)
            text=True,
        )
        for rank in (0, 1)
    ]
    _wait_all(nodes, timeout=600)
    errs = [(tmp_path / f"node{rank}.err").read_text() for rank in (0, 1)]
    for node, err in zip(nodes, errs, strict=True):
        assert node.returncode == 0, err[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["node_rank"] for r in ranks] == [0, 1]
    a, b = (set(r["seen"]) for r in ranks)
    assert a and b and not a & b  # disjoint shards of the training split
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 80  # 160 train images, halved
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas identical

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("image_classifier").experiment_id])
    assert len(runs) == 1  # rank 0 logs; the other node does not open a run


def _wait_all(procs, timeout: float) -> None:
    """Wait for every process; when one fails (or time runs out) stop the others, which would
    otherwise wait for it forever in a collective."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _sweep_runs(root, sweep_line: str) -> list:
    from mlflow.tracking import MlflowClient

    sweep = sweep_line.split("Sweep ", 1)[1].split(":", 1)[0]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("image_classifier")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.sweep = '{sweep}'")


def _tiny_trials(root, idx_source) -> list[str]:
    """Every sweep trial here: one short epoch on the tiny IDX data, on the CPU."""
    src, sums = idx_source
    return [
        f"paths.root={root}",
        "train.epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        *idx_overrides(src, sums),
    ]


def _summary(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("Sweep ") and "; best: trial " in ln]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


@pytest.mark.slow
def test_optuna_sweep_in_parallel_on_submitit_local(tmp_path, idx_source):
    """Four Optuna trials, two at a time, each a real submitit job (a local process)."""
    p = run_cli(
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        "hydra/launcher=submitit_local",
        "hydra.launcher.cpus_per_task=1",
        *_tiny_trials(tmp_path, idx_source),
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    line = _summary(p.stdout)
    runs = _sweep_runs(tmp_path, line)
    assert sorted(r.data.tags["sweep.trial"] for r in runs) == ["0", "1", "2", "3"]
    best = max(runs, key=lambda r: r.data.metrics["best_score"])
    assert f"best: trial {best.data.tags['sweep.trial']} ({best.info.run_id})" in line
    sweep_dir = line.split("Sweep ", 1)[1].split(":", 1)[0]
    assert (
        len(list((tmp_path / sweep_dir).glob(".submitit/*/*_log.out"))) >= 4
        or len(list(Path(sweep_dir).glob(".submitit/*/*_log.out"))) >= 4
    )  # each trial ran as a submitit job


@pytest.mark.slow
def test_sweep_on_a_local_ray_head(tmp_path, idx_source):
    """A Ray head started here (`ray start --head`), the sweep's four trials as Ray tasks on it
    through hydra-ray-launcher (`hydra/launcher=ray_cluster`)."""
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run(
        [
            ray,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={tempfile.mkdtemp(prefix='ray-', dir='/tmp')}",  # AF_UNIX paths: short
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        p = run_cli(
            "-m",
            "train.lr=1e-3,2e-3,3e-3,5e-3",
            "hydra/launcher=ray_cluster",
            f"hydra.launcher.ray.init.address=127.0.0.1:{port}",
            *_tiny_trials(tmp_path, idx_source),
            timeout=600,
        )
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = _sweep_runs(tmp_path, _summary(p.stdout))
    assert len(runs) == 4
    assert {float(r.data.params["config/train/lr"]) for r in runs} == {1e-3, 2e-3, 3e-3, 5e-3}
