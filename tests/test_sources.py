import gzip

import pytest
from conftest import idx_overrides

from image_classifier.data.sources import download, run_download, verify
from image_classifier.errors import UserError


def test_download_from_system_package_files(make_cfg, idx_source, tmp_path):
    src, sums = idx_source
    cfg = make_cfg(*idx_overrides(src, sums))
    result = download(cfg.data, tmp_path)
    assert result.source == "system"
    assert verify(result.directory, sums) is None
    assert result.attempts[0][0] == "local"
    # a second run finds the verified local copy and fetches nothing
    assert download(cfg.data, tmp_path).source == "local"


def test_checksum_mismatch_is_rejected_and_leaves_no_file(make_cfg, idx_source, tmp_path):
    src, sums = idx_source
    name = "train-labels-idx1-ubyte"
    (src / f"{name}.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\1\7"))
    cfg = make_cfg(*idx_overrides(src, sums))
    with pytest.raises(UserError) as e:
        download(cfg.data, tmp_path)
    msg = str(e.value)
    assert "every source failed" in msg
    assert "local:" in msg and "system: checksum mismatch" in msg
    assert "sudo apt-get update && sudo apt-get install dataset-fashion-mnist" in msg
    assert not (tmp_path / "data" / "fashion_mnist" / name).exists()


def test_every_source_failing_names_each_and_the_fix(make_cfg, tmp_path):
    cfg = make_cfg(
        f"data.download.system_dir={tmp_path}/nowhere",
        "data.download.sources=[local,dvc,system,upstream]",
        "data.download.urls=[http://127.0.0.1:9]",  # discard port: refused at once
        "data.download.timeout=2",
    )
    with pytest.raises(UserError) as e:
        download(cfg.data, tmp_path)
    msg = str(e.value)
    for source in ("local", "dvc", "system", "upstream"):
        assert f"  - {source}: " in msg
    assert "command=download" in msg


def test_unknown_source(make_cfg, tmp_path):
    cfg = make_cfg("data.download.sources=[local,ftp]", f"data.download.system_dir={tmp_path}")
    with pytest.raises(UserError, match="Unknown download source 'ftp'"):
        download(cfg.data, tmp_path)


def test_download_command_on_folder_data_explains(make_cfg, folder_data):
    cfg = make_cfg("data=folder", f"data.root={folder_data}")
    with pytest.raises(UserError, match="nothing to download"):
        run_download(cfg)


def test_data_classes_on_a_packaged_data_set_says_it_names_every_label(make_cfg, idx_source):
    """`data.classes=[Trouser,Bag]` on Fashion-MNIST said only "lists 2 names but labels reach
    9": on class folders it chooses classes, here it names every label."""
    from image_classifier.data.splits import load_splits

    src, sums = idx_source
    cfg = make_cfg(*idx_overrides(src, sums), "data.classes=[Trouser,Bag]")
    with pytest.raises(UserError, match=r"lists 2 names, but fashion_mnist's labels run 0 to 9: "):
        load_splits(cfg.data, project_root=cfg.paths.root)
