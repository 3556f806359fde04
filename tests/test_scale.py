"""Training on two nodes as the docs' torchrun recipe runs it: two `torchrun` launches on
127.0.0.1 (node ranks 0 and 1, one process each, gloo), one training run between them."""

import json
import os
import subprocess
import sys

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
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, results, strict=True):
        assert node.returncode == 0, err[-3000:]

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
