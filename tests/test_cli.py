"""The command line itself: exit codes, messages without tracebacks, sweeps."""

import pytest
from conftest import ROOT, idx_overrides, make_class_folders, run_cli


def test_unknown_command_lists_the_valid_ones(tmp_path):
    p = run_cli("command=trian", f"paths.root={tmp_path}")
    assert p.returncode == 2
    assert "Unknown command 'trian'. Did you mean 'train'?" in p.stderr
    assert "download, train, test" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout


def test_unknown_override_key_suggests_the_closest(tmp_path):
    p = run_cli("train.lrr=0.1", f"paths.root={tmp_path}")
    assert p.returncode == 2
    assert "train.lrr" in p.stderr and "Did you mean 'train.lr'" in p.stderr
    assert "Traceback" not in p.stderr


def test_unknown_config_group_option(tmp_path):
    p = run_cli("data=fashion", f"paths.root={tmp_path}")
    assert p.returncode == 2
    assert "fashion_mnist" in p.stderr  # Hydra's list of the available options
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_a_folder_named_with_a_comma_or_brackets_gets_the_quoting_that_reads_it(tmp_path):
    """`data.root=.../set,v2` stopped with Hydra's "Ambiguous value" and its stack trace advice;
    `.../photos (1)` (a copy's name on Windows and macOS) with "mismatched input ' ('" alone."""
    for name in ("set,v2", "photos (1)"):
        folder = make_class_folders(tmp_path / name, per_class=4)
        p = run_cli("command=audit", "data=folder", f"data.root={folder}", f"paths.root={tmp_path}")
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert f'''quote it: "data.root='{folder}'"''' in p.stderr, p.stderr
        p = run_cli(
            "command=audit",
            "data=folder",
            f"data.root='{folder}'",
            f"paths.root={tmp_path}",
            "logger.enabled=false",
        )
        assert p.returncode == 0, p.stderr


@pytest.mark.slow
def test_bad_data_folder_exits_2_without_traceback(tmp_path):
    p = run_cli(
        "data=folder",
        f"data.root={tmp_path}/nope",
        f"paths.root={tmp_path}",
        "logger.enabled=false",
    )
    assert p.returncode == 2, p.stderr
    assert "does not exist" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_multirun_sweep_gives_each_run_its_folder_and_mlflow_run(tmp_path, idx_source):
    from mlflow.tracking import MlflowClient

    src, sums = idx_source
    p = run_cli(
        "-m",
        "train.lr=1e-3,3e-3",
        f"paths.root={tmp_path}",
        "train.epochs=1",
        "train.batch_size=32",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        *idx_overrides(src, sums),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Sweep: 1 of 2 trial(s) done in " in p.stdout and ", about " in p.stdout
    # a new project's store is made without MLflow's "Creating initial MLflow database tables"
    assert "database tables" not in p.stdout + p.stderr
    assert "Sweep: 2 of 2 trial(s) done in " in p.stdout
    ckpts = sorted(tmp_path.glob("multirun/*/*/*/checkpoints/best.ckpt"))
    assert [c.parts[-3] for c in ckpts] == ["0", "1"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("image_classifier")
    lrs = sorted(r.data.params["config/train/lr"] for r in client.search_runs([exp.experiment_id]))
    assert lrs == ["0.001", "0.003"]


def test_a_sweeps_size_is_its_trials_or_the_product_of_its_swept_values():
    from omegaconf import OmegaConf

    from image_classifier.sweeps import sweep_size

    def size(task, **sweeper):
        return sweep_size(
            OmegaConf.create({"hydra": {"sweeper": sweeper, "overrides": {"task": task}}})
        )

    assert size(["train.lr=1e-3,3e-3", "model=cnn,cnn4,cnn", "seed=1"]) == 6
    assert size(["seed=range(1,5)"]) == 4
    assert size(["seed=1"], params={"train.lr": "1e-3,2e-3"}) == 2
    assert size(["train.lr=interval(1e-4,1e-2)"]) is None
    assert size(["train.lr=interval(1e-4,1e-2)"], n_trials=12) == 12


def test_help_lists_the_commands(tmp_path):
    """`--help` was Hydra's "commands is powered by Hydra" and the config: no word of the
    commands."""
    p = run_cli("--help", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "== Commands (command=NAME) ==" in p.stdout
    for line in ("  train           train; best.ckpt", "  audit           duplicates, leaks"):
        assert line in p.stdout
    assert "powered by Hydra" not in p.stdout and "data: fashion_mnist, folder" in p.stdout


def test_a_model_trained_on_a_relative_data_root_tests_from_anywhere(tmp_path):
    """`data.root=images` was stored as written: `test` of that checkpoint from another folder
    said "Data folder 'images' does not exist"."""
    make_class_folders(tmp_path / "images", per_class=6, size=12)
    run = tmp_path / "run"
    common = ("logger.enabled=false", f"paths.root={tmp_path}")
    p = run_cli(
        "command=train",
        "data=folder",
        "data.root=images",
        "train.epochs=1",
        f"hydra.run.dir={run}",
        *common,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    p = run_cli(
        "command=test", f"test.checkpoint={run}", f"hydra.run.dir={tmp_path / 't'}", *common
    )
    assert p.returncode == 0 and "Tested" in p.stdout, p.stderr[-2000:]


def test_an_option_of_a_network_needs_the_network_named(tmp_path):
    p = run_cli("model.convs_per_stage=[1,2,2]", f"paths.root={tmp_path}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "The default model=auto picks the network from the data" in p.stderr
    assert "`model=cnn model.convs_per_stage=...`" in p.stderr


@pytest.mark.parametrize(
    "command, setting",
    [
        ("export-onnx", "export.output=afile/m.onnx"),
        ("infer", "infer.output=afile/rows.csv"),
        ("infer", "infer.sort_into=afile/sorted"),
        ("export-triton", "export.triton.output=afile/repo"),
    ],
)
def test_an_output_that_cannot_be_written_stops_the_command_before_any_work(
    tmp_path, command, setting
):
    """`infer.output=/proc/x.json` predicted every image, then ended in a FileNotFoundError
    traceback and lost the rows. Each output setting is now checked first, with no model."""
    (tmp_path / "afile").write_text("a file, not a folder")
    key, value = setting.split("=")
    p = run_cli(
        f"command={command}",
        f"{key}={tmp_path / value}",
        "infer.input=x.png",
        f"paths.root={tmp_path}",
    )
    assert p.returncode == 2, p.stderr
    in_the_way = f"cannot be written: a file is in the way ({tmp_path / 'afile'})"
    assert f"error: {key}='{tmp_path / value}' {in_the_way}" in p.stderr
    assert "Give a path in a folder you can write to." in p.stderr and "Traceback" not in p.stderr


def test_a_setting_of_another_group_option_says_which_to_name(tmp_path):
    """`data.root=PATH` without `data=folder` suggested paths.root, data.std or data.dir."""
    p = run_cli("data.root=/some/folder", f"paths.root={tmp_path}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "data.root is a setting of data=folder: name the option first, e.g. " in p.stderr
    assert "`data=folder data.root=...`" in p.stderr and "paths.root" not in p.stderr


def test_a_preprocessing_setting_a_model_command_does_not_read_is_named(tmp_path):
    """`command=test data.size=64` tested at the model's own size without a word."""
    p = run_cli("command=test", "data.size=64", "data.resize=crop", f"paths.root={tmp_path}")
    assert "note: data.size, data.resize not used: test reads images with the model's own" in (
        p.stderr
    )
    assert "not used" not in run_cli("command=test", f"paths.root={tmp_path}").stderr


@pytest.mark.parametrize(
    "value",
    [
        "/tmp/my photos",
        "/tmp/set,v2",
        "/tmp/photos (1)",
        "/tmp/café/狗",
        "/tmp/it's",
        "C:\\x\\",
        "/tmp/a#b;c&d!",
        "/tmp/$HOME,x",
        " lead",
        "models:/shapes-cnn@champion",
        "/a/b-1.ckpt",
    ],
)
def test_a_suggested_override_reads_back_through_the_shell_and_hydra(value):
    """What a message tells the user to paste: one shell word, which Hydra parses back to the
    value; a value Hydra takes as it is stays readable (no quotes)."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from image_classifier.errors import override

    word = override("data.root", value)
    (arg,) = shlex.split(word)
    assert OverridesParser.create().parse_override(arg).value() == value
    if value.startswith(("models:", "/a/")):
        assert word == f"data.root={value}"


@pytest.mark.slow
def test_the_test_command_infer_suggests_runs_as_pasted_on_a_folder_with_a_space_and_comma(
    tmp_path, trained
):
    """infer on a labelled folder names the command that tests the model on it; with the folder
    `my photos, 2` pasted bare it was three shell words and a Hydra sweep."""
    import shlex
    import shutil

    root, ckpt, images = trained
    folder = tmp_path / "my photos, 2"
    shutil.copytree(images, folder)
    p = run_cli("command=infer", f"infer.model={ckpt}", f"infer.input='{folder}'", cwd=root)
    assert p.returncode == 0, p.stderr
    suggested = p.stderr.split("the full report on them: ")[1].splitlines()[0]
    words = shlex.split(suggested)
    assert words[:4] == ["uv", "run", "python", "commands.py"], suggested
    p = run_cli(*words[4:], "logger.enabled=false", cwd=root)
    assert p.returncode == 0, p.stderr
    assert f"Tested {ckpt} on 24 my_photos__2 test images" in p.stdout, p.stdout


def test_a_full_disk_is_said_in_one_line_without_a_traceback(tmp_path, trained, exported):
    """A disk filling up while train wrote best.ckpt printed 350 lines: Lightning's traceback,
    then MLflow's, whose store could not mark the run failed on the same disk. The ENOSPC is
    found down the exception chain and said with the file and the ways out (exit 1: the
    machine's state, not bad usage). Here the disk is full when infer writes its rows."""
    from image_classifier.errors import write_refused

    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(
        "import errno, runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import image_classifier.inference.infer as infer\n"
        "def full(rows, output, classes):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', output)\n"
        "infer.write_rows = full\n"
        f"sys.argv[0] = {str(ROOT / 'commands.py')!r}\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    root, _, images = trained
    out = tmp_path / "rows.json"
    p = run_cli(
        "command=infer",
        f"infer.model={exported[0]}",
        f"infer.input={images}",
        f"infer.output={out}",
        f"paths.root={root}",
        script=wrapper,
    )
    assert p.returncode == 1, p.stderr
    assert f"error: No space left on the disk where infer wrote {out}: it stopped there." in (
        p.stderr
    )
    assert "(run folders: hydra.run.dir=DIR;" in p.stderr and "Traceback" not in p.stderr
    # Lightning's shape: the OSError is the context of the store's error raised while cleaning up
    try:
        try:
            raise OSError(28, "No space left on device", "/tmp/a", None, "/run/best.ckpt")
        except OSError:
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full")  # noqa: B904
    except RuntimeError as e:
        assert write_refused(e) == ("No space left on the disk", "/run/best.ckpt")
    store_full = RuntimeError("(sqlite3.OperationalError) database or disk is full")
    assert write_refused(store_full) == ("No space left on the disk", "")
    store_read_only = RuntimeError(
        "(sqlite3.OperationalError) attempt to write a readonly database"
    )
    assert write_refused(store_read_only) == ("The file system is read-only", "")
    assert write_refused(ValueError("bad")) is None


def test_a_run_folder_that_cannot_be_made_is_said_before_hydra_makes_it(tmp_path):
    """Hydra makes the run folder before any of the tool's code runs: a file in its way (or a
    read-only checkout) ended in Hydra's traceback, exit 1."""
    (tmp_path / "afile").write_text("in the way")
    p = run_cli("command=train", f"hydra.run.dir={tmp_path / 'afile' / 'run'}")
    assert p.returncode == 2, p.stderr
    assert f"error: hydra.run.dir='{tmp_path / 'afile' / 'run'}' cannot be written: a file is " in (
        p.stderr
    )
    assert "Traceback" not in p.stderr
    p = run_cli("-m", "command=train", f"paths.root={tmp_path / 'afile'}")  # the default, under it
    assert p.returncode == 2 and f"hydra.sweep.dir='{tmp_path / 'afile'}/multirun/'" in p.stderr


@pytest.mark.slow
def test_the_audit_is_handed_the_training_job(tmp_path):
    """audit.probabilities=trained from the command line: commands.py hands the audit the train
    command's function (the audit package does not import training)."""
    folder = make_class_folders(tmp_path / "images", per_class=8)
    p = run_cli(
        *("command=audit", "data=folder", f"data.root={folder}", "data.size=[16,16]"),
        *("audit.probabilities=trained", "audit.folds=2", "model=cnn", "train.epochs=2"),
        *(f"paths.root={tmp_path}", "logger.enabled=false", f"hydra.run.dir={tmp_path}/run"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "probabilities from the training job (cnn), fitted 2 times" in p.stdout
    assert (tmp_path / "run" / "audit" / "folds" / "1" / "train.log").exists()
