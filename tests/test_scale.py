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
from conftest import ROOT, compose_cfg, idx_overrides, run_cli
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
            stdout=open(tmp_path / f"node{rank}.out", "w"),  # noqa: SIM115 (closed with it)
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
    said = (tmp_path / "node0.out").read_text()
    assert "1 epoch(s) of 5 step(s) in batches of 16" in said  # each node's shard: 80 images
    assert "sync_dist" not in errs[0]  # epoch values are reduced across the nodes, unwarned


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
    m = [r.data.metrics for r in runs]  # the best score, and of equal ones the lower val/loss
    best = runs[min(range(len(runs)), key=lambda i: (-m[i]["best_score"], m[i]["best_val_loss"]))]
    assert f"best: trial {best.data.tags['sweep.trial']} ({best.info.run_id})" in line
    sweep_dir = line.split("Sweep ", 1)[1].split(":", 1)[0]
    assert (
        len(list((tmp_path / sweep_dir).glob(".submitit/*/*_log.out"))) >= 4
        or len(list(Path(sweep_dir).glob(".submitit/*/*_log.out"))) >= 4
    )  # each trial ran as a submitit job


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1, as a user starts one (`ray start --head`); stopped at the end."""
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
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_sweep_on_a_local_ray_head(tmp_path, idx_source, ray_head):
    """The sweep's four trials as Ray tasks on a head started here, through hydra-ray-launcher
    (`hydra/launcher=ray_cluster`)."""
    p = run_cli(
        "-m",
        "train.lr=1e-3,2e-3,3e-3,5e-3",
        "hydra/launcher=ray_cluster",
        f"hydra.launcher.ray.init.address={ray_head}",
        *_tiny_trials(tmp_path, idx_source),
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    runs = _sweep_runs(tmp_path, _summary(p.stdout))
    assert len(runs) == 4
    assert {float(r.data.params["config/train/lr"]) for r in runs} == {1e-3, 2e-3, 3e-3, 5e-3}


@pytest.mark.slow
def test_ray_infer_gives_the_rows_of_infer_on_a_bad_folder(tmp_path, exported, ray_head):
    """Ray Data actor pools on the head: the same rows, bad files and their reasons included,
    as single-process infer, in CSV and in Parquet."""
    import pyarrow.parquet as pq
    from test_bad_files import make_bad_folder

    model, _ = exported
    expected = make_bad_folder(tmp_path / "data")
    common = ["command=infer", f"infer.model={model}", f"infer.input={tmp_path / 'data'}"]
    ray = ["infer.engine=ray", f"infer.address={ray_head}", "infer.batch_size=4"]
    local = run_cli(*common, f"infer.output={tmp_path / 'local.json'}")
    assert local.returncode == 0, local.stderr[-3000:]
    on_ray = run_cli(*common, *ray, f"infer.output={tmp_path / 'ray.json'}", timeout=600)
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    assert "Ray actor(s)" in on_ray.stderr
    rows = json.loads((tmp_path / "local.json").read_text())
    assert json.loads((tmp_path / "ray.json").read_text()) == rows
    hidden = {".DS_Store"}  # infer skips hidden files
    assert {Path(r["path"]).name for r in rows if r.get("error")} == set(expected) - hidden

    big = run_cli(*common, *ray, f"infer.output={tmp_path / 'rows.parquet'}", timeout=600)
    assert big.returncode == 0, big.stderr[-3000:]
    table = pq.read_table(tmp_path / "rows.parquet").sort_by("index").to_pylist()
    assert [json.loads(r["row"]) for r in table] == rows
    assert [r["error"] for r in table] == [r.get("error") for r in rows]


@pytest.mark.slow
def test_ray_infer_on_a_list_whose_first_file_is_missing_gives_its_row(
    tmp_path, exported, ray_head
):
    """A .txt list naming a file that exists nowhere: a row with its reason, as `infer` gives,
    not a cluster that cannot see the input."""
    model, _ = exported
    from conftest import make_class_folders

    images = make_class_folders(tmp_path / "images", per_class=2)
    good = sorted(p for p in images.rglob("*.png"))[:3]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([str(tmp_path / "gone.png"), *map(str, good)]) + "\n")
    common = ["command=infer", f"infer.model={model}", f"infer.input={listing}"]
    local = run_cli(*common, f"infer.output={tmp_path / 'local.json'}")
    on_ray = run_cli(
        *common,
        "infer.engine=ray",
        f"infer.address={ray_head}",
        f"infer.output={tmp_path / 'ray.json'}",
        timeout=600,
    )
    assert local.returncode == 0 and on_ray.returncode == 0, on_ray.stderr[-3000:]
    rows = json.loads((tmp_path / "ray.json").read_text())
    assert rows == json.loads((tmp_path / "local.json").read_text())
    assert rows[0]["error"] and not any(r.get("error") for r in rows[1:])


def test_ray_infer_refuses_a_model_that_is_not_onnx(tmp_path, trained):
    _, ckpt, images = trained
    p = run_cli("command=infer", f"infer.model={ckpt}", f"infer.input={images}", "infer.engine=ray")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "infer.engine=ray runs ONNX models" in p.stderr and "command=export-onnx" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_a_path_the_ray_workers_cannot_see_is_named_with_the_fix(tmp_path, ray_head):
    from image_classifier import cluster
    from image_classifier.errors import UserError
    from image_classifier.inference.ray_engine import check_visible

    here = tmp_path / "here.png"
    here.write_bytes(b"x")
    ray = cluster.connect(ray_head, "infer.address")
    try:
        check_visible(ray, [{"path": str(here)}], "infer.input")  # seen: no error
        gone = str(tmp_path / "only-on-the-driver.png")  # what a worker elsewhere would lack
        with pytest.raises(UserError) as e:
            check_visible(ray, [{"path": gone}], "infer.input")
    finally:
        ray.shutdown()
    msg = str(e.value)
    assert "cannot see" in msg and gone in msg
    assert "every node mounts them" in msg and "infer.engine=local" in msg


def test_an_unreachable_ray_address_exits_2_with_the_fix(tmp_path, exported):
    model, _ = exported
    port = free_port()  # nothing listens there
    (tmp_path / "a.png").touch()
    p = run_cli(
        "command=infer",
        f"infer.model={model}",
        f"infer.input={tmp_path}",
        "infer.engine=ray",
        f"infer.address=127.0.0.1:{port}",
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in p.stderr
    assert "ray start --head" in p.stderr and "Traceback" not in p.stderr

    sweep = run_cli(
        "-m",
        "train.lr=1e-3,2e-3",
        "hydra/launcher=ray_cluster",
        f"hydra.launcher.ray.init.address=127.0.0.1:{port}",
        f"paths.root={tmp_path}",
    )
    assert sweep.returncode == 2, sweep.stderr[-2000:]
    assert f"hydra.launcher.ray.init.address='127.0.0.1:{port}'" in sweep.stderr
    assert "Traceback" not in sweep.stderr


def test_a_launcher_whose_package_is_missing_exits_2_naming_it(tmp_path):
    p = run_cli("-m", "train.lr=1e-3,2e-3", "hydra/launcher=joblib", f"paths.root={tmp_path}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "hydra-joblib-launcher" in p.stderr and "uv add hydra-joblib-launcher" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_time_budget_on_several_nodes_exits_2(tmp_path):
    p = run_cli("command=train", "train.time_budget=60", "trainer.num_nodes=2")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "train.time_budget=60 cannot be used with trainer.num_nodes=2" in p.stderr
    assert "train.epochs" in p.stderr


def test_ray_addresses_that_name_no_cluster_get_the_fix(monkeypatch):
    from image_classifier.cluster import address_problem

    assert address_problem("local", "infer.address") is None  # started by the command itself
    assert "is not a Ray address (auto, HOST:PORT" in address_problem("head", "infer.address")
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # what `auto` reads first
    problem = address_problem("auto", "infer.address")
    assert "infer.address='auto': no Ray cluster answers at " in problem and str(port) in problem
    assert "ray start --head" in problem and "infer.address=local" in problem


def test_a_sweeps_best_trial_among_equal_scores_is_the_lower_val_loss(tmp_path):
    """A small validation split's accuracy ties often (two trials at 15 of 16): the sweep names
    the trial whose best epoch had the lower val/loss, not whichever MLflow lists first."""
    import mlflow

    from image_classifier import tracking

    cfg = compose_cfg(tmp_path)
    uri, _ = tracking.resolve_uri(cfg.logger, cfg.paths.root)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = tracking.experiment_id(cfg)
    trials = {"a": (0.9375, 0.45), "b": (0.9375, 0.30), "c": (0.875, 0.10), "d": (0.9375, None)}
    for name, (score, loss) in trials.items():
        run = client.create_run(exp, tags={"sweep": "/s", "sweep.trial": name})
        client.log_metric(run.info.run_id, "best_score", score)
        if loss is not None:  # a run without validation loss
            client.log_metric(run.info.run_id, "best_val_loss", loss)
    ranked = [r.data.tags["sweep.trial"] for r in tracking.sweep_runs(cfg, "/s")]
    assert ranked == ["b", "a", "d", "c"]


def test_a_sweep_says_which_trials_its_validation_split_cannot_tell_from_the_best(tmp_path):
    """On 16 validation images one image is 6 points of val/acc: a sweep's best of 15 of 16
    against 14 of 16 is not a finding, and the summary said nothing of it."""
    import mlflow

    from image_classifier import tracking
    from image_classifier.sweeps import _ties

    cfg = compose_cfg(tmp_path)
    uri, _ = tracking.resolve_uri(cfg.logger, cfg.paths.root)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = tracking.experiment_id(cfg)
    for name, score in {"a": 0.9375, "b": 0.875, "c": 0.5}.items():
        run = client.create_run(exp, tags={"sweep": "/s", "sweep.trial": name})
        for key, value in {"best_score": score, "val_images": 16}.items():
            client.log_metric(run.info.run_id, key, value)
    runs = tracking.sweep_runs(cfg, "/s")
    line = _ties(runs, "val/acc")
    assert line.startswith("  1 other trial(s) score within 0.2208 of the best")  # Wilson
    assert "on 16 validation images" in line and "data.split" in line
    assert _ties(runs, "val/loss") is None and _ties(runs[:1], "val/acc") is None
    # a perfect best on 12 images: two standard errors are 0 there, its interval is not
    for name, score in {"p": 1.0, "q": 10 / 12}.items():
        run = client.create_run(exp, tags={"sweep": "/t", "sweep.trial": name})
        for key, value in {"best_score": score, "val_images": 12}.items():
            client.log_metric(run.info.run_id, key, value)
    assert "1 other trial(s) score within 0.2425" in _ties(
        tracking.sweep_runs(cfg, "/t"), "val/acc"
    )


def test_ray_infer_gives_every_actor_a_block_and_large_inputs_blocks_of_several_batches():
    """180 images at batch 32 made one block: the second actor sat idle and Ray warned."""
    from image_classifier.inference.ray_engine import _blocks

    assert _blocks(180, 32, 2) == 2 and _blocks(3, 32, 2) == 2 and _blocks(1, 32, 4) == 1
    assert _blocks(60_000, 32, 2) == 29  # 64 batches a block (2,048 images): not Ray's 200
    assert _blocks(2_000, 32, 2) == 8  # 4 blocks an actor
