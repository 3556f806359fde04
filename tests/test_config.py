"""Config validated once, at load: every bad value exits 2 with its options and the closest match,
before any data, model or MLflow run is touched."""

from __future__ import annotations

import pytest
from conftest import CONFIG_DIR, run_cli

from image_classifier.config import _compose, problems


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.optimizer=adamx",
            "train.optimizer='adamx' is not one of adam, adamw, sgd, muon. "
            "Did you mean 'adam' or 'adamw'?",
        ),
        ("train.lr=-1", "train.lr=-1 must be a number > 0."),
        ("train.batch_size=0", "train.batch_size=0 must be an integer >= 1, or 'auto'."),
        ("train.frozen_stages=-1", "train.frozen_stages=-1 must be an integer >= 0, or 'auto'."),
        (
            "infer.output=x.xml",
            "infer.output='x.xml' must be a file name ending in .json, .csv or .parquet.",
        ),
        (
            "infer.output=x.parquet",
            "infer.output='x.parquet': Parquet is written by the Ray engine (infer.engine=ray)",
        ),
        (
            "infer.engine=ray infer.output=x.parquet infer.sort_into=review",
            "infer.sort_into needs the rows on this machine; with infer.output=*.parquet they "
            "stay on the cluster.",
        ),
        (
            "infer.engine=ray infer.output=x.parquet infer.min_confidence=0.9",
            "infer.min_confidence needs the rows on this machine; with infer.output=*.parquet "
            "they stay on the cluster.",
        ),
        ("infer.min_confidence=0", "infer.min_confidence=0 must be a number > 0 and <= 1."),
    ],
)
def test_bad_value_exits_2_before_any_work(tmp_path, override, message):
    proc = run_cli("command=train", *override.split(), f"paths.root={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no data, no run folder, no mlruns


def test_the_error_readme_quotes_is_the_one_a_user_gets():
    import re

    from image_classifier.config import compose_config
    from image_classifier.errors import UserError

    readme = (CONFIG_DIR.parent / "README.md").read_text()
    override, quoted = re.search(r"\(`(train\.optimizer=\w+)` → \"(.+?)\"\)", readme, re.S).groups()
    with pytest.raises(UserError) as e:
        compose_config(override)
    assert " ".join(quoted.split()) in str(e.value)


def test_every_value_of_a_sweep_is_checked(tmp_path):
    proc = run_cli("-m", "command=train", "train.scheduler=cosine,linear", cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.scheduler='linear' is not one of none, plateau, step, cosine, onecycle" in (
        proc.stderr
    )


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.augment.preset=randaug"], "Did you mean 'randaugment'"),
        (["train.scheduler=cosin"], "Did you mean 'cosine'"),
        (["train.warmup=0"], "train.warmup=0 must be a number > 0 and < 1."),
        (["train.monitor=val/loss"], "train.monitor='val/loss' is not one of val/acc"),
        (
            ["data.size=[28]"],
            "data.size=[28] must have 2 values (height, width), e.g. data.size=[128,128], or "
            "'auto'.",
        ),
        (
            ["data=folder", "data.split=[0.7,0.3]"],
            "data.split=[0.7, 0.3] must have 3 values (train, val, test shares), e.g. "
            "data.split=[0.8,0.1,0.1].",
        ),
        (["data.resize=fit"], "data.resize='fit' is not one of stretch, crop, pad."),
        (["data.download.sources=[local,ftp]"], "data.download.sources[1]='ftp' is not one of"),
        (["infer.device=gpu"], "infer.device='gpu' is not one of auto, cpu, cuda."),
        (["infer.sort_mode=move"], "infer.sort_mode='move' is not one of copy, symlink"),
        (["serve.port=70000"], "serve.port=70000 must be an integer >= 0 and <= 65535."),
        (
            ["export.output=model.pt"],
            "export.output='model.pt' must be a file name ending in .onnx",
        ),
        (["export.trt.precision=int8"], "export.trt.precision='int8' is not one of fp16, fp32."),
        (["export.triton.kind=GPU"], "export.triton.kind='GPU' is not one of KIND_AUTO"),
        (
            ["audit.features=clip"],
            "audit.features='clip' is not one of auto, cache, backbone, pixels.",
        ),
        (["audit.folds=1"], "audit.folds=1 must be an integer >= 2."),
        (["train.muon_lr_scale=0"], "train.muon_lr_scale=0 must be a number > 0."),
        (["train.muon_lr_scale=fast"], "train.muon_lr_scale='fast' must be a number > 0."),
        (["train.epochs=many"], "train.epochs='many' must be an integer >= 1, or 'auto'."),
        (["data=folder", "data.size=[0,64]"], "data.size[0]=0 must be an integer >= 1, or 'auto'."),
        (["audit.near_threshold=0"], "audit.near_threshold=0 must be a number > 0."),
        (["audit.near_candidates=0"], "audit.near_candidates=0 must be a number > 0."),
        (["audit.label_cut=-1"], "audit.label_cut=-1 must be a number > 0, or 'auto'."),
        (["audit.probabilities=model"], "audit.probabilities='model' is not one of features,"),
        (["train.epochs=1.5"], "train.epochs=1.5 must be an integer >= 1, or 'auto'."),
        (["train.time_budget=0"], "train.time_budget=0 must be a number > 0."),
        (["train.threads=true"], "train.threads=True must be an integer >= 1."),
        (["test.tta=flip"], "test.tta='flip' is not one of False, True, none, hflip, hflip+shift."),
        (["train.augment.hflip=alternate"], "train.augment.hflip='alternate' is not one of"),
        (["export.tta=shift"], "export.tta='shift' is not one of False, True, none, hflip,"),
    ],
)
def test_rules_name_the_value_and_the_options(overrides, expected):
    found = problems(_compose(overrides, CONFIG_DIR))
    assert any(expected in f for f in found), found


@pytest.mark.parametrize(
    "overrides",
    [[], ["data=folder"], ["experiment=fmnist_best_cpu"], ["experiment=fmnist_fast"]]
    + [["hparams_search=optuna"], ["test.tta=hflip+shift", "export.tta=true"]]
    + [[f"model={p.stem}"] for p in sorted((CONFIG_DIR / "model").glob("*.yaml"))],
)
def test_shipped_configs_are_valid(overrides):
    assert problems(_compose(overrides, CONFIG_DIR)) == []


def test_the_optuna_search_samples_rates_on_a_log_scale():
    """Optuna's own reading of the shipped search space: learning rate and weight decay on a log
    scale (uniformly, 93 % of trials drew a learning rate over 0.001), the rest uniform."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", ["hparams_search=optuna"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    dist = {o.key_or_group: create_optuna_distribution_from_override(o) for o in parsed}
    assert type(dist["train.lr"]).__name__ == "LogUniformDistribution"
    assert type(dist["train.weight_decay"]).__name__ == "LogUniformDistribution"
    assert type(dist["train.label_smoothing"]).__name__ == "UniformDistribution"


def test_a_recipe_carries_the_tta_its_figure_used_and_the_default_has_none():
    from image_classifier.config import compose_config

    fast = compose_config("experiment=fmnist_fast")
    assert fast.test.tta == fast.export.tta == "hflip+shift"
    assert compose_config("experiment=fmnist_fast", "test.tta=false").test.tta is False
    default = compose_config()
    assert default.test.tta is False and default.export.tta is False


@pytest.mark.parametrize(
    "overrides",
    [[], ["data=folder"], ["experiment=fmnist_fast"], ["hparams_search=optuna"]]
    + [[f"model={p.stem}"] for p in sorted((CONFIG_DIR / "model").glob("*.yaml"))],
)
def test_every_key_has_one_rule_or_names_where_it_is_checked(overrides):
    from omegaconf import OmegaConf

    from image_classifier.settings import CHECKED_ELSEWHERE, rule_table

    table = rule_table()

    def unruled(d, prefix=""):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if key in table or any(key.startswith(p) or key == p for p in CHECKED_ELSEWHERE):
                continue
            if isinstance(v, dict) and v:
                yield from unruled(v, f"{key}.")
            else:
                yield key

    cfg = OmegaConf.to_container(_compose(overrides, CONFIG_DIR), resolve=False)
    assert list(unruled(cfg)) == []


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.compile=maybe", "train.compile='maybe' is not one of True, False."),
        ("train.warmup=1", "train.warmup=1 must be a number > 0 and < 1."),
        ("data.download.timeout=0", "data.download.timeout=0 must be a number > 0."),
        ("data.mean=[a]", "data.mean[0]='a' must be a number"),
        (
            "paths.search=outputs",
            "paths.search='outputs' must be a list, e.g. paths.search=[outputs].",
        ),
        (
            "data.size=big",
            "data.size='big' must be an integer >= 1, or 2 values (height, width), e.g. "
            "data.size=[128,128], or 'auto'.",
        ),
        ("infer.model=[1]", "infer.model=[1] must be a non-empty string (a path or a name)."),
        # a model of one class, and one with two outputs named alike, trained without a word
        ("data.classes=[cat]", "data.classes=['cat'] must list at least 2 classes"),
        ("data.classes=[cat,dog,cat]", "data.classes=['cat', 'dog', 'cat'] names 'cat' twice"),
        ("+normalization.mine.mean=[x]", "normalization.mine.mean[0]='x' must be a number"),
    ],
)
def test_switches_paths_and_lists_are_checked_too(override, message):
    found = problems(_compose([override], CONFIG_DIR))
    assert any(message in f for f in found), found


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "+train.max_epochs=5",
            "+train.max_epochs: no setting has that name, so nothing would read it. Did you mean "
            "'train.epochs'",
        ),
        ("+trainer.max_epochs=5", "train sets Lightning's max_epochs itself; for the length of "),
        ("+trainer.gradient_clip_vall=1", "Did you mean 'trainer.gradient_clip_val'"),
        ("epochs=5", "Could not override 'epochs'. Did you mean 'train.epochs'?"),
        (  # no close name in its own section: that section's settings follow
            "register.checkpoint=x",
            "Did you mean 'test.checkpoint' or 'export.checkpoint' or 'calibrate.checkpoint'? "
            "register.* takes: model, name, alias, version, new_classes.",
        ),
    ],
)
def test_a_key_nothing_reads_is_refused_with_the_closest(tmp_path, override, message):
    """`+train.max_epochs=5` (as the old hint, "prefix with + to add a new key", suggested) was
    added and never read: the default schedule ran. A Trainer option, a network's own option and a
    new normalisation entry are read, so they pass."""
    proc = run_cli("command=train", override, f"paths.root={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "prefix with +" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_additions_something_reads_pass():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from image_classifier.config import _unread_additions

    given = [
        "+trainer.gradient_clip_algorithm=value",
        "model=timm",
        "+model.drop_rate=0.2",
        "+normalization.mine.mean=[0.5]",
        "++train.epochs=3",
    ]
    parsed = OverridesParser.create().parse_overrides(given)
    assert _unread_additions(parsed, given, CONFIG_DIR) == []


def test_a_list_that_hydra_cannot_read_gets_each_item_quoted_and_stays_a_list():
    """`data.classes=[chat noir,café]` was told to quote it whole, which makes it one string."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from image_classifier.config import check_command_line
    from image_classifier.errors import UserError

    with pytest.raises(UserError) as e:
        check_command_line(["command=train", "data.classes=[chat noir,café]"], CONFIG_DIR)
    fix = str(e.value).split("quote each: ")[1].rstrip(".")
    assert fix == "\"data.classes=[chat noir,'café']\""
    (word,) = shlex.split(fix)
    assert OverridesParser.create().parse_override(word).value() == ["chat noir", "café"]


def test_a_home_folder_written_with_a_tilde_gets_both_forms_that_work(tmp_path, monkeypatch):
    """`data.root=~/photos` (bash expands no ~ after `=` in such a word) stopped at Hydra's
    lexer; the message gives the quoted form and $HOME's, and each reads the folder."""
    import shlex

    from image_classifier.config import check_command_line, compose_config
    from image_classifier.data.layouts import data_folder
    from image_classifier.errors import UserError

    with pytest.raises(UserError) as e:
        check_command_line(["command=audit", "data=folder", "data.root=~/photos"], CONFIG_DIR)
    assert str(e.value).endswith(
        """quote it: "data.root='~/photos'", or data.root=$HOME/photos (the shell leaves ~ """
        "after = as it is)."
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    for word in ("\"data.root='~/photos'\"", "data.root=$HOME/photos"):
        (override,) = shlex.split(word.replace("$HOME", str(tmp_path)))
        root = compose_config("data=folder", override).data.root
        assert data_folder(root) == tmp_path / "photos"  # the folder the data is read from
