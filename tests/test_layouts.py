import shutil
from pathlib import Path

import pytest
from conftest import make_class_folders

from image_classifier.data.layouts import ManifestOptions, discover
from image_classifier.errors import UserError


def test_class_folders_split_is_stratified_and_deterministic(folder_data):
    a = discover(folder_data, split=(0.6, 0.2, 0.2), seed=3)
    b = discover(folder_data, split=(0.6, 0.2, 0.2), seed=3)
    c = discover(folder_data, split=(0.6, 0.2, 0.2), seed=4)
    assert a.classes == ["cat", "dog", "fox"]
    assert a.layout == "class folders"
    assert a.splits == b.splits
    assert a.splits != c.splits
    assert (
        a.counts("train") == [6, 6, 6]
        and a.counts("val") == [2, 2, 2]
        and a.counts("test") == [2, 2, 2]
    )
    everything = [p for s in a.splits.values() for p, _ in s]
    assert len(everything) == len(set(everything)) == 30


def test_classes_named_by_numbers_are_in_numeric_order(tmp_path):
    """Folders 1 to 12 (months, ratings) were ordered 1, 10, 11, 12, 2, ...: the confusion matrix
    and the probability columns read out of order. Names that are not all numbers sort as text."""
    make_class_folders(tmp_path / "n", classes=("10", "2", "1"), per_class=3)
    assert discover(tmp_path / "n").classes == ["1", "2", "10"]
    (tmp_path / "n" / "10").rename(tmp_path / "n" / "10b")
    assert discover(tmp_path / "n").classes == ["1", "10b", "2"]


def test_a_class_of_one_image_is_trained_on_not_tested(tmp_path):
    """The floor of the cumulative cuts put a class's only image in test: train had none."""
    make_class_folders(tmp_path / "d", per_class=5)
    for extra in list((tmp_path / "d" / "fox").iterdir())[1:]:
        extra.unlink()
    s = discover(tmp_path / "d")
    assert s.counts("train")[2] == 1 and s.counts("val")[2] == s.counts("test")[2] == 0


def test_split_folders_inside_the_class_folders_are_named(tmp_path, caplog):
    """ROOT/<class>/train|test/ was merged and re-split without a word."""
    for split in ("train", "test"):
        make_class_folders(tmp_path / "tmp" / split, per_class=3)
        for c in ("cat", "dog"):
            shutil.copytree(tmp_path / "tmp" / split / c, tmp_path / "d" / c / split)
    s = discover(tmp_path / "d")
    assert s.layout == "class folders" and sum(len(v) for v in s.splits.values()) == 12
    assert f"{tmp_path / 'd'}/<class>/ holds test/train folders" in caplog.text
    assert f"arrange {tmp_path / 'd'}/<split>/<class>/" in caplog.text


def test_images_behind_a_symlinked_folder_are_read_once_and_a_link_loop_ends(tmp_path):
    """`cat/batch1 -> /data/cats`: Path.rglob (Python < 3.13) does not follow a symlinked
    folder, and the class read as "no images"."""
    from image_classifier.inference.infer import collect_inputs

    make_class_folders(tmp_path / "store", per_class=4)
    for c in ("cat", "dog"):
        (tmp_path / "d" / c).mkdir(parents=True)
        (tmp_path / "d" / c / "batch1").symlink_to(tmp_path / "store" / c)
    (tmp_path / "d" / "cat" / "loop").symlink_to(tmp_path / "d" / "cat")  # a link loop
    s = discover(tmp_path / "d")
    assert s.classes == ["cat", "dog"] and not s.skipped
    assert sum(len(v) for v in s.splits.values()) == 8  # 4 each, the loop read once
    assert len(collect_inputs(str(tmp_path / "d"))) == 8


@pytest.mark.parametrize(
    "name, how",
    [("photos.zip", "unzip {} -d FOLDER"), ("photos.tar.gz", "mkdir FOLDER && tar xf {} -C")],
)
def test_an_archive_as_data_root_says_to_unpack_it(tmp_path, name, how):
    (tmp_path / name).write_bytes(b"PK\x03\x04")
    with pytest.raises(
        UserError, match=r"is a file, not a folder\. It is an archive: unpack it"
    ) as e:
        discover(tmp_path / name)
    assert how.format(tmp_path / name) in str(e.value)  # its own tool: tar is not unzipped


@pytest.mark.parametrize(
    "name, fix",
    [
        ("labels.xlsx", "It is a spreadsheet: save it as CSV beside the images (Excel: File >"),
        ("labels.tsv", "A manifest is read from a .csv (columns apart by , ; or a tab): rename"),
    ],
)
def test_a_spreadsheet_or_tsv_as_data_root_says_how_to_make_it_a_manifest(tmp_path, name, fix):
    """data.root=labels.xlsx said only "is a file, not a folder"."""
    (tmp_path / name).write_bytes(b"PK\x03\x04" if name.endswith("x") else b"file\tlabel\n")
    with pytest.raises(UserError) as e:
        discover(tmp_path / name)
    assert (
        str(e.value)
        == f"data.root={str(tmp_path / name)!r} is a file, not a folder. "
        + (str(e.value).split("folder. ", 1)[1])
    )
    assert fix in str(e.value)


def test_presplit_folders(tmp_path):
    for split in ("train", "validation", "test"):
        make_class_folders(tmp_path / "d" / split, per_class=3)
    s = discover(tmp_path / "d")
    assert s.layout.startswith("pre-split")
    assert {k: len(v) for k, v in s.splits.items()} == {"train": 9, "val": 9, "test": 9}
    assert all("/validation/" in p for p, _ in s.splits["val"])


def test_presplit_without_val_carves_it_from_train(tmp_path):
    make_class_folders(tmp_path / "d" / "train", per_class=10)
    make_class_folders(tmp_path / "d" / "test", per_class=2)
    s = discover(tmp_path / "d", split=(0.8, 0.2, 0.0))
    assert len(s.splits["test"]) == 6 and len(s.splits["val"]) == 6 and len(s.splits["train"]) == 24


def test_csv_manifest(tmp_path):
    make_class_folders(tmp_path / "imgs", per_class=4)
    rows = (
        ["filename,category"]
        + [f"imgs/{c}/{i:03d}.png,{c}" for c in ("cat", "dog", "fox") for i in range(4)]
        + ["imgs/missing.png,cat"]
    )
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    s = discover(tmp_path, split=(0.5, 0.25, 0.25))
    assert s.layout == "csv manifest labels.csv"
    assert s.classes == ["cat", "dog", "fox"]
    assert sum(len(v) for v in s.splits.values()) == 12
    assert any("missing.png" in p for p in s.skipped)


@pytest.mark.parametrize(
    "header", ["file_name,label", "File Name,Class Name", "image-path;Label", "IMAGE_ID,class_name"]
)
def test_column_names_are_matched_without_case_spaces_or_underscores(tmp_path, header):
    """Hugging Face's imagefolder metadata.csv names its column file_name: the manifest stopped
    with "Cannot tell which column holds the image file" though `filename` was known."""
    make_class_folders(tmp_path / "imgs", per_class=4)
    sep = ";" if ";" in header else ","
    rows = [f"imgs/{c}/{i:03d}.png{sep}{c}" for c in ("cat", "dog") for i in range(4)]
    (tmp_path / "metadata.csv").write_text("\n".join([header, *rows]))
    s = discover(tmp_path, split=(0.5, 0.25, 0.25))
    assert s.classes == ["cat", "dog"] and sum(len(v) for v in s.splits.values()) == 8


def test_a_file_listed_twice_is_used_once_or_stops_on_two_answers(tmp_path, caplog):
    """A manifest merged from two exports listed files twice: the repeats were trained on twice
    and could land in train and test at once (a leak), and a second, different label was kept as
    if both were right."""
    make_class_folders(tmp_path / "imgs", per_class=4)
    rows = ["file,label"] + [f"imgs/{c}/{i:03d}.png,{c}" for c in ("cat", "dog") for i in range(4)]
    (tmp_path / "labels.csv").write_text("\n".join([*rows, "./imgs/cat/001.png,cat"]))
    s = discover(tmp_path, split=(0.5, 0.25, 0.25))
    listed = [p for v in s.splits.values() for p, _ in v]
    assert len(listed) == len(set(listed)) == 8
    assert "labels.csv lists 1 file(s) again with the same label (row 10 repeats row 3)" in (
        caplog.text
    )
    (tmp_path / "labels.csv").write_text("\n".join([*rows, "imgs/cat/001.png,dog"]))
    with pytest.raises(
        UserError,
        match=r"Rows 3 and 10 of labels.csv both list "
        r"'imgs/cat/001.png', with label 'cat' and 'dog'. Keep the right row",
    ):
        discover(tmp_path)
    split_rows = ["file,label,split", "imgs/cat/000.png,cat,train", "imgs/cat/000.png,cat,test"]
    (tmp_path / "labels.csv").write_text("\n".join(split_rows))
    with pytest.raises(UserError, match="with split 'train' and 'test'. Keep the right row"):
        discover(tmp_path)


def test_a_manifest_of_urls_says_to_download_them(tmp_path):
    """A labelling tool's export lists URLs: they were skipped as "no such file" under a mangled
    name (`root/https:/host/a.jpg`), and a manifest of URLs only ended in "no images"."""
    make_class_folders(tmp_path / "imgs", per_class=4)
    rows = ["image,label"] + [f"imgs/{c}/{i:03d}.png,{c}" for c in ("cat", "dog") for i in range(4)]
    (tmp_path / "labels.csv").write_text("\n".join([*rows, "https://host/a.jpg,cat"]))
    s = discover(tmp_path, split=(0.5, 0.25, 0.25))
    assert sum(len(v) for v in s.splits.values()) == 8
    assert s.skipped == {
        "https://host/a.jpg": "a URL, not a file: download the images first and list their "
        "local paths (this tool reads local files)"
    }
    (tmp_path / "labels.csv").write_text("image,label\ns3://bucket/a.jpg,cat\ngs://b/c.png,dog\n")
    with pytest.raises(UserError, match=r"lists URLs, not files \(row 2: 's3://bucket/a.jpg'\)"):
        discover(tmp_path)


def test_csv_manifest_with_unknown_columns(tmp_path):
    (tmp_path / "m.csv").write_text("a,b\nx.png,cat\n")
    with pytest.raises(UserError, match=r"Cannot tell which column .* Set data.csv_file_column"):
        discover(tmp_path)


def test_stray_and_broken_files_are_skipped_and_counted(folder_data):
    # what a Mac or a Windows drive adds is passed over without a word, at any depth
    (folder_data / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder_data / "cat" / "._000.png").write_bytes(b"\0\5\26\7" + bytes(100))
    (folder_data / "dog" / "__MACOSX").mkdir()
    (folder_data / "dog" / "__MACOSX" / "._x.png").write_bytes(bytes(10))
    (folder_data / "dog" / "notes.txt").write_text("to do")
    (folder_data / "fox" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    data = (folder_data / "cat" / "000.png").read_bytes()
    (folder_data / "cat" / "half.png").write_bytes(data[: len(data) // 2])
    (folder_data / "README.md").write_text("my dataset")
    s = discover(folder_data)
    assert len(s.skipped) == 4 and not any("._" in p or "DS_Store" in p for p in s.skipped)
    assert sum(len(v) for v in s.splits.values()) == 30
    with pytest.raises(UserError, match=r"4 file\(s\) .*data.strict=true"):
        discover(folder_data, strict=True)


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        discover(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with pytest.raises(UserError, match="is empty"):
        discover(tmp_path)


def test_class_folder_without_images(folder_data):
    (folder_data / "empty_class").mkdir()
    (folder_data / "empty_class" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=r"Class folder .*empty_class.* has no images"):
        discover(folder_data)


def test_dicom_and_camera_raw_files_are_named_for_what_they_are(folder_data):
    """A class folder of DICOM scans said only "has no images (3 other file(s))"; a camera's
    raw files beside its JPEGs were "not an image file name". Each reason now says what the file
    is and the fix."""
    (folder_data / "scans").mkdir()
    for i in range(3):
        (folder_data / "scans" / f"img{i}.dcm").write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(UserError) as e:
        discover(folder_data)
    assert str(e.value) == (
        f"Class folder {str(folder_data / 'scans')!r} has no images (3 other file(s); img0.dcm: "
        "not an image file name (a DICOM file: convert it to PNG; 16-bit greys keep their bit "
        "depth, docs/data.md)). Add images to it or remove the folder."
    )
    shutil.rmtree(folder_data / "scans")
    (folder_data / "cat" / "IMG_1.CR2").write_bytes(b"II*\0")
    (folder_data / "cat" / "notes.txt").write_text("x")
    skipped = discover(folder_data).skipped
    assert skipped[str(folder_data / "cat" / "IMG_1.CR2")] == (
        "not an image file name (a camera raw file: export it as JPEG or PNG)"
    )
    assert skipped[str(folder_data / "cat" / "notes.txt")] == "not an image file name"


def test_single_class(folder_data):
    shutil.rmtree(folder_data / "dog")
    shutil.rmtree(folder_data / "fox")
    with pytest.raises(UserError, match="Only one class"):
        discover(folder_data)


def test_classes_a_split_lacks_and_classes_too_thin_to_learn_are_named(tmp_path):
    from image_classifier.data.splits import class_gaps

    make_class_folders(tmp_path / "d" / "train", per_class=8)
    make_class_folders(tmp_path / "d" / "test", per_class=2)
    shutil.rmtree(tmp_path / "d" / "test" / "fox")
    for f in sorted((tmp_path / "d" / "train" / "dog").iterdir())[3:]:
        f.unlink()  # dog: 3 training images, fewer once val is carved out
    s = discover(tmp_path / "d", split=(0.8, 0.2, 0.0))
    lines = class_gaps(s)
    assert lines[0] == "The test split has no images of fox: test reports no recall for them."
    assert lines[1].startswith("Classes with fewer than 5 training images: dog (2). Too few")
    assert class_gaps(discover(make_class_folders(tmp_path / "ok", per_class=8))) == []


def test_a_hundred_thin_classes_are_named_ten_and_counted(tmp_path):
    """A folder of 100 species of 6 photos each: the warning listed all 100 names on one line."""
    from image_classifier.data.splits import class_gaps

    names = tuple(f"species_{k:03d}" for k in range(100))
    s = discover(make_class_folders(tmp_path / "many", classes=names, per_class=6, size=8))
    thin = next(line for line in class_gaps(s) if line.startswith("Classes with fewer"))
    assert "species_009 (4) (and 90 more). Too few" in thin and "species_010" not in thin


def test_csv_manifest_saved_by_excel_with_semicolons_and_absolute_paths(tmp_path):
    """Excel in many locales saves `;`-separated CSV with a byte-order mark; it was read as one
    column named 'image;class' and refused."""
    make_class_folders(tmp_path / "imgs", per_class=4)
    rows = ["image;class"] + [
        f"{tmp_path if i % 2 else 'imgs'}/{'imgs/' if i % 2 else ''}{c}/{i:03d}.png;{c}"
        for c in ("cat", "dog", "fox")
        for i in range(4)
    ]
    (tmp_path / "labels.csv").write_text("\n".join(rows), encoding="utf-8-sig")
    s = discover(tmp_path, split=(0.5, 0.25, 0.25))
    assert s.classes == ["cat", "dog", "fox"] and not s.skipped
    assert sum(len(v) for v in s.splits.values()) == 12


def test_csv_split_column_with_an_unknown_split_is_refused(tmp_path):
    """A typo in the split column ('tset') put those rows in train without a word."""
    make_class_folders(tmp_path / "imgs", per_class=2)
    rows = ["file,label,split"] + [
        f"imgs/{c}/{i:03d}.png,{c},{'tset' if (c, i) == ('dog', 1) else ''}"
        for c in ("cat", "dog", "fox")
        for i in range(2)
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows))
    with pytest.raises(UserError, match=r"Row 5 of m.csv names split 'tset'. Did you mean 'test'"):
        discover(tmp_path)


def test_a_lone_train_folder_is_pre_split_with_val_and_test_carved_out(tmp_path):
    """ROOT/train/<class>/ alone was read as one class named 'train' and refused."""
    make_class_folders(tmp_path / "d" / "train", per_class=10)
    s = discover(tmp_path / "d")
    assert s.layout == "pre-split folders (train)" and s.classes == ["cat", "dog", "fox"]
    assert [len(s.splits[k]) for k in ("train", "val", "test")] == [24, 3, 3]


def test_data_classes_fixes_the_order_and_chooses_the_classes(folder_data, tmp_path):
    """data.classes on class folders ended in a KeyError traceback for a folder it did not list;
    then in "Class 'fox' is not one of data.classes". It chooses: the others are left out."""
    s = discover(folder_data, manifest=ManifestOptions(classes=["fox", "dog", "cat", "owl"]))
    assert s.classes == ["fox", "dog", "cat", "owl"] and s.counts("train")[3] == 0
    s = discover(folder_data, manifest=ManifestOptions(classes=["dog", "cat"]))
    assert s.classes == ["dog", "cat"] and s.left_out == {"fox": 10}
    assert sum(len(v) for v in s.splits.values()) == 20
    # a listed name that no image has, beside left-out classes: a misspelling, refused
    with pytest.raises(
        UserError,
        match=r"data.classes lists dgo, which no image has \(class folders under .*\); "
        r"the data's other classes are dog, fox\. Did you mean 'dog'\? Fix the name",
    ):
        discover(folder_data, manifest=ManifestOptions(classes=["cat", "dgo"]))
    # a CSV manifest's rows of unlisted labels, the same way
    rows = ["file,label"] + [
        f"images/{c}/{i:03d}.png,{c}" for c in ("cat", "dog", "fox") for i in range(10)
    ]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    s = discover(tmp_path, manifest=ManifestOptions(classes=["cat", "fox"]))
    assert s.classes == ["cat", "fox"] and s.left_out == {"dog": 10}


def test_a_zero_ratio_leaves_its_split_empty_when_asked(folder_data):
    """data.split=[0,0,1]: every image in test, for testing a model on a whole folder; train
    refuses it itself (training/checks.check_splits)."""
    s = discover(folder_data, split=(0, 0, 1))
    assert not s.splits["train"] and not s.splits["val"] and len(s.splits["test"]) == 30
    one_each = make_class_folders(folder_data.parent / "one", per_class=1)
    with pytest.raises(
        UserError, match="The val split is empty"
    ):  # asked for, none fit: train takes the one
        discover(one_each, split=(0.01, 0.99, 0))


def test_csv_manifest_written_on_windows_with_backslashes(tmp_path):
    """`imgs\\cat\\000.png` named no file here: every row was skipped as missing."""
    make_class_folders(tmp_path / "imgs", per_class=4)
    rows = ["file,label"] + [
        f"imgs\\{c}\\{i:03d}.png,{c}" for c in ("cat", "dog", "fox") for i in range(4)
    ]
    (tmp_path / "labels.csv").write_text("\r\n".join(rows))
    s = discover(tmp_path, split=(0.5, 0.25, 0.25))
    assert not s.skipped and sum(len(v) for v in s.splits.values()) == 12


def test_the_folder_unzipping_a_macos_archive_adds_is_not_a_class(folder_data):
    """`__MACOSX/<class>/._x.png` beside the class folders stopped the command: "Class folder
    '__MACOSX' has no images"."""
    (folder_data / "__MACOSX" / "cat").mkdir(parents=True)
    (folder_data / "__MACOSX" / "cat" / "._000.png").write_bytes(b"\0\5\26\7")
    s = discover(folder_data)
    assert s.classes == ["cat", "dog", "fox"] and not s.skipped


@pytest.mark.parametrize(
    ("root", "name"),
    [("/photos/flowers", "flowers"), ("/photos/Café crème", "Cafe_creme"), ("/x/花", "folder")],
)
def test_a_folder_is_called_by_its_own_name_in_ascii(root, name):
    """Runs, registered models and served models of a folder: <its name>-<model>, not all
    folder-cnn; in ASCII, as a URL path and a Triton model name take it."""
    from omegaconf import OmegaConf

    from image_classifier.data.splits import data_name

    assert data_name(OmegaConf.create({"name": "folder", "root": root})) == name
    assert data_name(OmegaConf.create({"name": "mine", "root": root})) == "mine"  # given: kept


def test_classes_that_differ_only_in_case_are_named(tmp_path, caplog):
    """'Cat' and 'cat' (two exports spelling one label two ways) trained as two classes without a
    word."""
    make_class_folders(tmp_path / "d", classes=("cat", "Cat", "dog"), per_class=4)
    s = discover(tmp_path / "d")
    assert s.classes == ["Cat", "cat", "dog"]
    assert "Classes 'Cat' and 'cat' (class folders) differ only in case or spaces" in caplog.text


def test_a_kaggle_folder_of_several_csvs_and_extensionless_ids(tmp_path):
    """train.csv, test.csv and sample_submission.csv beside images/: "several CSV manifests; keep
    one" left no way to choose but moving files, and ids listed without .png were 'no such file'."""
    make_class_folders(tmp_path / "k" / "images", per_class=4)
    ids = [f"images/{c}/{i:03d}" for c in ("cat", "dog", "fox") for i in range(4)]
    (tmp_path / "k" / "train.csv").write_text(
        "\n".join(["id,label"] + [f"{x},{x.split('/')[1]}" for x in ids])
    )
    for name in ("test.csv", "sample_submission.csv"):
        (tmp_path / "k" / name).write_text("id\n" + "\n".join(ids))
    with pytest.raises(
        UserError,
        match=r"several CSV manifests .* Name the one to read: "
        r"data.root=.*k/train.csv",
    ):
        discover(tmp_path / "k")
    s = discover(tmp_path / "k" / "train.csv", split=(0.5, 0.25, 0.25))
    assert s.layout == "csv manifest train.csv" and s.classes == ["cat", "dog", "fox"]
    assert not s.skipped and sum(len(v) for v in s.splits.values()) == 12
    assert all(p.endswith(".png") for v in s.splits.values() for p, _ in v)
    from image_classifier.data.profile import profile_folder

    make_class_folders(tmp_path / "k" / "images" / "unlabelled", classes=("x",), per_class=3)
    assert profile_folder(tmp_path / "k").images == 15  # the folder: every image under it
    assert profile_folder(tmp_path / "k" / "train.csv").images == 12  # the manifest's own
    # a file column of another name, given as data.csv_file_column: data.size=auto's profile
    # stopped with "Cannot tell which column" though the manifest itself was read with it
    rows = (tmp_path / "k" / "train.csv").read_text().replace("id,", "photo,", 1)
    (tmp_path / "k" / "train.csv").write_text(rows)
    assert profile_folder(tmp_path / "k" / "train.csv", file_column="photo").images == 12
    # a row repeated is one image, as the scan reads it (the chosen: line counted it twice)
    with (tmp_path / "k" / "train.csv").open("a") as f:
        f.write(f"\n{ids[0]},cat")
    assert profile_folder(tmp_path / "k" / "train.csv", file_column="photo").images == 12
    with pytest.raises(UserError, match=r"Set data.csv_file_column=<column>"):
        profile_folder(tmp_path / "k" / "train.csv")
    # a folder holding only a manifest whose images lie elsewhere: its images are profiled (the
    # profile saw none, and model=auto chose the CNN at 28 px for colour photos)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "labels.csv").write_text(rows.replace("images/", "../k/images/"))
    assert profile_folder(tmp_path / "m", file_column="photo").images == 12


def test_a_csv_that_is_not_a_manifest_beside_class_folders_is_passed_over(tmp_path):
    """credits.csv (author, license) beside the class folders stopped training with "cannot tell
    which column holds the image file: set data.csv_file_column"."""
    make_class_folders(tmp_path / "d", per_class=4)
    (tmp_path / "d" / "credits.csv").write_text("author,license\nme,CC-BY\n")
    s = discover(tmp_path / "d")
    assert s.layout == "class folders" and s.classes == ["cat", "dog", "fox"]
    assert (
        "a CSV with no file column (file, filename"
        in s.skipped[str(tmp_path / "d" / "credits.csv")]
    )
    (tmp_path / "d" / "labels.csv").write_text(
        "file,label\n"
        + "\n".join(f"cat/{i:03d}.png,cat" for i in range(4))
        + "\n"
        + "\n".join(f"dog/{i:03d}.png,dog" for i in range(4))
    )
    assert discover(tmp_path / "d").layout == "csv manifest labels.csv"  # a manifest still wins
    # Hugging Face's metadata.csv names the files, not their classes: the folders do
    (tmp_path / "d" / "labels.csv").unlink()
    (tmp_path / "d" / "metadata.csv").write_text("file_name,text\ncat/000.png,a grey cat\n")
    s = discover(tmp_path / "d")
    skipped = s.skipped[str(tmp_path / "d" / "metadata.csv")]
    assert s.layout == "class folders" and "a metadata.csv with no label column" in skipped
    # any other CSV that names files is the manifest: its label column, if unknown, is asked for
    (tmp_path / "d" / "metadata.csv").rename(tmp_path / "d" / "train.csv")
    with pytest.raises(UserError, match="Set data.csv_label_column"):
        discover(tmp_path / "d")


@pytest.mark.parametrize(
    "inner, match",
    [
        (  # a folder holding only test/ read as one class called 'test'
            "test",
            r"holds split folders \(test\) but no train/.*data.root=.*/d/test data.split=\[0,0,1\]",
        ),
        (  # an archive unpacked into a folder of its own name: "only one class ('flowers')"
            "flowers",
            r"Only one class \('flowers'\).* It holds one folder, whose subfolders \(cat, dog, "
            r"fox\) look like the data: data.root=.*/d/flowers$",
        ),
    ],
)
def test_a_folder_of_one_folder_says_where_to_point(tmp_path, inner, match):
    make_class_folders(tmp_path / "d" / inner, per_class=2)
    with pytest.raises(UserError, match=match):
        discover(tmp_path / "d")


def test_files_added_later_move_no_training_image_into_test(tmp_path):
    """The seeded shuffle re-drew every split when a folder grew: 20 images added to a
    1,000-image folder put 59 of its training images into the 100 of test."""
    root = make_class_folders(tmp_path / "d", per_class=40)
    before = discover(root)
    make_class_folders(tmp_path / "more", classes=("cat", "dog"), per_class=5, seed=3)
    for p in (tmp_path / "more").rglob("*.png"):
        shutil.copy(p, root / p.parent.name / f"new{p.name}")
    after = discover(root)
    names = {s: {p for p, _ in v} for s, v in after.splits.items()}
    assert not {p for p, _ in before.splits["train"]} & (names["val"] | names["test"])
    assert not {p for p, _ in before.splits["val"]} & names["test"]
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "d")  # moving the data keeps it
    assert [Path(p).relative_to(moved) for p, _ in discover(moved).splits["test"]] == [
        Path(p).relative_to(root) for p, _ in after.splits["test"]
    ]


def _small_classes(per_class: dict[str, int]) -> tuple[list, list[str]]:
    names = sorted(per_class)
    pairs = [(f"/r/{c}/{i}.png", k) for k, c in enumerate(names) for i in range(per_class[c])]
    return pairs, names


@pytest.mark.parametrize(
    "order, val, test", [("balanced", (135, 165), (135, 165)), ("hash", 100, 200)]
)
def test_many_small_classes_get_their_val_and_test_shares(order, val, test):
    """Each class's cuts were rounded down: 100 classes of 15 images gave val 100 and test 200
    images for [0.8, 0.1, 0.1]. Rounded from a per-class offset they get about 150 each; `hash`
    keeps the old cuts for the checkpoints trained with them."""
    from image_classifier.data.identity import split_items

    pairs, names = _small_classes({f"c{k:03d}": 15 for k in range(100)})
    got = split_items(pairs, None, (0.8, 0.1, 0.1), 42, False, "/r", (order, names))
    sizes = {s: len(v) for s, v in got.items()}
    assert sizes["train"] == 1200
    if order == "hash":
        assert (sizes["val"], sizes["test"]) == (val, test)
    else:
        assert val[0] <= sizes["val"] <= val[1] and test[0] <= sizes["test"] <= test[1]
    for k in range(100):  # stratified: every class 12 / 1-2 / 1-2
        assert sum(y == k for _, y in got["train"]) == 12


def test_an_image_added_to_one_class_leaves_the_others_split_as_they_were():
    """The offset is the class's own (a hash of its name), so one class growing cannot move
    another class's images, and its own move forward only: none from train to test."""
    from image_classifier.data.identity import split_items

    sizes = {f"c{k}": 10 + k for k in range(12)}
    pairs, names = _small_classes(sizes)
    rule, grown = ("balanced", names), names.index("c5")
    before = split_items(pairs, None, (0.8, 0.1, 0.1), 1, False, "/r", rule)
    for extra in range(1, 4):
        sizes["c5"] += 1
        pairs, _ = _small_classes(sizes)
        after = split_items(pairs, None, (0.8, 0.1, 0.1), 1, False, "/r", rule)
        others = {s: [x for x in v if x[1] != grown] for s, v in after.items()}
        assert others == {s: [x for x in v if x[1] != grown] for s, v in before.items()}, extra
        where = {p: s for s, v in after.items() for p, _ in v}
        assert all(where[p] != "test" for p, _ in before["train"])
        assert all(where[p] != "train" for p, _ in before["test"])
        before = after


def test_a_checkpoint_from_before_the_hash_order_is_split_as_it_was(tmp_path):
    """A stored data config without data.split_order (a checkpoint trained before it) is split by
    the seeded shuffle it was trained beside, so `test` still tests its own test split."""
    import numpy as np
    from conftest import compose_cfg
    from omegaconf import open_dict

    from image_classifier.data.images import Preprocessing
    from image_classifier.data.sources import sha256_file
    from image_classifier.data.splits import load_splits

    root = make_class_folders(tmp_path / "d", classes=("cat", "dog"), per_class=5)
    old = discover(root, split=(0.6, 0.2, 0.2), seed=0, split_order="shuffle")
    rng, names = np.random.default_rng(0), sorted(p.name for p in (root / "cat").iterdir())
    order = [names[i] for i in rng.permutation(5)]  # the old code, by hand: cat first
    assert [Path(p).name for p, y in old.splits["train"] if y == 0] == order[:3]
    assert [Path(p).name for p, y in old.splits["test"] if y == 0] == order[4:]
    cfg = compose_cfg(
        tmp_path,
        "data=folder",
        f"data.root={root}",
        "data.split=[0.6,0.2,0.2]",
        "data.seed=0",
        "data.cache=none",
    )
    with open_dict(cfg):
        del cfg.data["split_order"]
    pre = Preprocessing(size=(16, 16), channels=1, mean=(0.5,), std=(0.5,))
    _, info = load_splits(cfg.data, pre, build_cache=False)
    assert info.split_sizes == {"train": 6, "val": 2, "test": 2}
    want = sorted(sha256_file(p)[:16] for p, _ in old.splits["test"])
    assert sorted(info.digests["test"]) == want
    hashed = discover(root, split=(0.6, 0.2, 0.2), seed=0)
    assert sorted(sha256_file(p)[:16] for p, _ in hashed.splits["test"]) != want  # they differ


def test_a_dev_folder_is_validation_and_an_unknown_one_is_named(tmp_path):
    """train/, dev/, test/ (an NLP or speech corpus's names): dev/ was passed over without a
    word and validation carved out of train."""
    for split in ("train", "dev", "test"):
        make_class_folders(tmp_path / "d" / split, per_class=2)
    s = discover(tmp_path / "d")
    assert s.layout == "pre-split folders (test, train, val)" and len(s.splits["val"]) == 6
    (tmp_path / "d" / "dev").rename(tmp_path / "d" / "extra")
    s = discover(tmp_path / "d")
    assert s.skipped[str(tmp_path / "d" / "extra")] == (
        "a folder beside the split folders, not read: rename it train, val or test"
    )


def test_unlabelled_test_images_beside_train_say_what_to_do(tmp_path):
    """Kaggle's layout, train/<class>/ beside a test/ of unlabelled images, stopped with "test
    has no class subfolders" and no way forward."""
    make_class_folders(tmp_path / "d" / "train", per_class=4)
    (tmp_path / "d" / "test").mkdir()
    shutil.copy(tmp_path / "d" / "train" / "cat" / "000.png", tmp_path / "d" / "test" / "a.png")
    with pytest.raises(
        UserError,
        match=r"Its images have no labels: to train on the rest, data.root=.*/d/train \(val and "
        r"test carved out of it\); to predict them, command=infer infer.input=.*/d/test\.",
    ):
        discover(tmp_path / "d")
    assert discover(tmp_path / "d" / "train").layout == "class folders"


def test_a_folder_of_unlabelled_images_says_how_to_label_or_predict_them(tmp_path):
    """Images straight in data.root, no class folders: the message said what was expected, not
    how to get there from here."""
    make_class_folders(tmp_path / "src", per_class=3)
    (tmp_path / "flat").mkdir()
    for p in (tmp_path / "src").rglob("*.png"):
        shutil.copy(p, tmp_path / "flat" / f"{p.parent.name}_{p.name}")
    with pytest.raises(
        UserError,
        match=r"has no class subfolders: .* It holds 9 image\(s\) directly, without labels: put "
        r"each in a folder named after its class, or name them in a CSV manifest .*; to predict "
        r"them, command=infer infer.input=.*/flat\.",
    ):
        discover(tmp_path / "flat")


def test_a_manifest_written_on_a_case_blind_disk_finds_its_files(tmp_path):
    """A manifest made on Windows or macOS lists cat/000.PNG for cat/000.png: on Linux every such
    row was 'no such file'."""
    make_class_folders(tmp_path / "imgs", per_class=4)
    rows = ["file,label"] + [f"imgs/{c}/{i:03d}.PNG,{c}" for c in ("cat", "dog") for i in range(4)]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    s = discover(tmp_path, split=(0.5, 0.25, 0.25))
    assert not s.skipped and sum(len(v) for v in s.splits.values()) == 8
    assert all(p.endswith(".png") for v in s.splits.values() for p, _ in v)


def test_two_folders_for_one_split_stop_and_name_both(tmp_path):
    """val/ beside dev/: one of them was read as the validation split, the other passed over
    without a word."""
    for split in ("train", "val", "dev"):
        make_class_folders(tmp_path / "d" / split, per_class=2)
    with pytest.raises(UserError, match=r"two folders for the val split: 'dev' and 'val'\. Merge"):
        discover(tmp_path / "d")


def _flatten(src: Path, dest: Path, name) -> Path:
    """The images of class folders `src` in one folder, each named by `name(class, i)`."""
    dest.mkdir(parents=True)
    for d in sorted(src.iterdir()):
        for i, p in enumerate(sorted(d.iterdir())):
            shutil.copy(p, dest / name(d.name, i))
    return dest


def test_labels_in_file_names_read_by_data_label_pattern(tmp_path):
    """Kaggle's cat.12.png and the Oxford pets' great_pyrenees_7.png: the pattern's first group is
    the label, at any depth; a name it gives no label to is skipped with that reason."""
    from image_classifier.data.named_files import LABEL_THEN_NUMBER

    src = make_class_folders(tmp_path / "src", ("cat", "great_pyrenees"), per_class=10)
    flat = _flatten(src, tmp_path / "flat", lambda c, i: f"{c}{'.' if c == 'cat' else '_'}{i}.png")
    (flat / "more").mkdir()
    shutil.move(flat / "cat.9.png", flat / "more" / "cat.9.png")
    shutil.copy(flat / "cat.0.png", flat / "cover.png")  # no number: no label
    s = discover(
        flat, split=(0.6, 0.2, 0.2), manifest=ManifestOptions(label_pattern=LABEL_THEN_NUMBER)
    )
    assert s.classes == ["cat", "great_pyrenees"]
    assert s.layout == rf"labels in file names ({LABEL_THEN_NUMBER})"
    assert sum(s.counts(split)[0] for split in s.splits) == 10  # more/cat.9.png too
    assert list(s.skipped) == [str(flat / "cover.png")]
    assert "does not give a label by data.label_pattern" in s.skipped[str(flat / "cover.png")]
    whole = discover(flat, manifest=ManifestOptions(label_pattern=r"^[a-z]+"))  # no group
    assert whole.classes == ["cat", "cover", "great"]


def test_a_flat_folder_of_labelled_names_is_told_the_pattern_and_a_bad_one_why(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from image_classifier.data.named_files import LABEL_THEN_NUMBER, TYPED

    src = make_class_folders(tmp_path / "src", ("cat", "dog"), per_class=4)
    flat = _flatten(src, tmp_path / "flat", lambda c, i: f"{c}.{i}.png")
    with pytest.raises(UserError, match=r"has no class subfolders") as e:
        discover(flat)
    assert str(e.value).endswith(
        f" Their names look like a label and a number (cat 4, dog 4): {TYPED} labels them by name "
        "(docs/data.md)."
    )
    # the suggestion, as a shell hands it to Hydra, is the pattern itself
    override = OverridesParser.create().parse_override(TYPED.strip("'"))
    assert override.value() == LABEL_THEN_NUMBER
    camera = _flatten(
        src, tmp_path / "camera", lambda c, i: f"IMG_{(c == 'dog') * 100 + i:04d}.png"
    )
    with pytest.raises(UserError) as e:
        discover(camera)
    assert "look like a label" not in str(e.value)  # IMG_0000.png ... IMG_0103.png: one "label"
    with pytest.raises(UserError, match=r"'\^\(\.\+\?\)\[' is not a regular expression"):
        discover(flat, manifest=ManifestOptions(label_pattern="^(.+?)["))
    with pytest.raises(
        UserError, match=r"gives no label from the names of the 8 image\(s\) under "
    ):
        discover(flat, manifest=ManifestOptions(label_pattern=r"^x(\d)"))


def test_class_folders_holding_their_images_in_subfolders_say_which_are_the_classes(
    tmp_path, caplog
):
    """animals/cat, animals/dog, vehicles/bus, vehicles/car trained as 2 classes without a word;
    the subfolders may be the classes meant. A class folder with its images in one subfolder, or
    beside its subfolders, is a class as it stands and says nothing."""
    import logging

    root = tmp_path / "d"
    for top, leaves in (("animals", ("cat", "dog")), ("vehicles", ("bus", "car", "tram"))):
        for leaf in leaves:
            make_class_folders(root / top, classes=(leaf,), per_class=4)
    make_class_folders(root / "plants" / "2024", classes=("fern",), per_class=4)
    with caplog.at_level(logging.INFO):
        assert discover(root).classes == ["animals", "plants", "vehicles"]
    assert (
        f"The classes are the folders directly in {root}; 2 of them hold their images in "
        "subfolders (animals: cat, dog; vehicles: bus, car, tram), read as part of their class. "
        "For the subfolders as classes, move them up into that folder"
    ) in caplog.text
    caplog.clear()
    make_class_folders(tmp_path / "flat", per_class=4)
    make_class_folders(tmp_path / "flat" / "cat", classes=("older",), per_class=2)
    with caplog.at_level(logging.INFO):
        discover(tmp_path / "flat")
    assert "subfolders" not in caplog.text
    caplog.clear()  # pre-split: said once, of train/, not once a split folder
    for split in ("train", "val", "test"):
        for top, leaves in (("animals", ("cat", "dog")), ("vehicles", ("bus", "car"))):
            for leaf in leaves:
                make_class_folders(tmp_path / "split" / split / top, classes=(leaf,), per_class=2)
    with caplog.at_level(logging.INFO):
        discover(tmp_path / "split")
    assert caplog.text.count("The classes are the folders directly in") == 1
    assert f"directly in {tmp_path / 'split' / 'train'};" in caplog.text


@pytest.mark.parametrize("encoding", ["cp1252", "utf-16"])
def test_a_manifest_excel_saved_in_windows_1252_or_utf_16_is_read(tmp_path, caplog, encoding):
    """Excel's "CSV (Comma delimited)" on a Western Windows writes Windows-1252: a label "café"
    stopped every command with a UnicodeDecodeError traceback. It is read so, with a warning
    naming the file and the fix; UTF-16 with its byte-order mark is read as such, silently."""
    make_class_folders(tmp_path / "imgs", classes=("cat", "dog"), per_class=4)
    rows = ["file;label"] + [
        f"imgs/{c}/{i:03d}.png;{'café' if c == 'cat' else 'thé'}"
        for c in ("cat", "dog")
        for i in range(4)
    ]
    (tmp_path / "labels.csv").write_bytes("\r\n".join(rows).encode(encoding))
    s = discover(tmp_path, split=(0.5, 0.25, 0.25))
    assert s.classes == ["café", "thé"] and not s.skipped
    warned = "is not UTF-8 (byte 0xe9 at 32): read as Windows-1252" in caplog.text
    assert warned == (encoding == "cp1252")
    if warned:
        assert 'If names in it read wrong, save it as "CSV UTF-8".' in caplog.text


def test_split_folders_inside_class_folders_get_their_warning_not_the_subfolder_note(
    tmp_path, caplog
):
    """cat/train, cat/test: _warn_splits_inside's warning names them; the note on class folders
    holding their images in subfolders does not repeat it."""
    import logging

    for c in ("cat", "dog"):
        for split in ("train", "test"):
            make_class_folders(tmp_path / "d" / c, classes=(split,), per_class=3)
    with caplog.at_level(logging.INFO):
        discover(tmp_path / "d")
    assert "holds test/train folders" in caplog.text and "The classes are" not in caplog.text


@pytest.mark.parametrize("prefix", ["C:\\Users\\ann\\data\\", "/home/ann/data/"])
def test_a_manifest_of_another_machines_absolute_paths_finds_its_files_beside_it(
    tmp_path, caplog, prefix
):
    """A CSV written on a colleague's Windows machine (C:\\Users\\ann\\data\\imgs\\cat\\000.png),
    copied here with its images: every row was "no such file" and the command stopped with "No
    readable images found". Each path is read as the longest end of it found beside the CSV."""
    make_class_folders(tmp_path / "imgs", classes=("cat", "dog"), per_class=4)
    sep = "\\" if prefix.startswith("C:") else "/"
    rows = ["file,label"] + [
        f"{prefix}imgs{sep}{c}{sep}{i:03d}.png,{c}" for c in ("cat", "dog") for i in range(4)
    ]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    s = discover(tmp_path, split=(0.5, 0.25, 0.25))
    assert s.classes == ["cat", "dog"] and not s.skipped
    assert all(p.startswith(str(tmp_path / "imgs")) for v in s.splits.values() for p, _ in v)
    assert f"A list or manifest in {tmp_path} names its files by another machine's paths" in (
        caplog.text
    )
    assert "read as the longest end of its path found in that folder (imgs/cat/000.png)" in (
        caplog.text
    )


def _split_of_each_file(root, *overrides):
    """{file name: split} as load_splits leaves them (log lines in caplog)."""
    from conftest import compose_cfg

    from image_classifier.data.images import Preprocessing
    from image_classifier.data.splits import load_splits

    cfg = compose_cfg(
        root.parent, "data=folder", f"data.root={root}", "data.cache=none", *overrides
    )
    pre = Preprocessing(size=(16, 16), channels=1, mean=(0.5,), std=(0.5,))
    datasets, info = load_splits(cfg.data, pre, build_cache=False)
    where = {str(Path(p).relative_to(root)): s for s, ds in datasets.items() for p, _ in ds.items}
    return where, info


def test_exact_copies_drawn_into_two_splits_are_kept_in_one(tmp_path, caplog):
    """A folder holding the same image under two names had the two cut into train and test by
    their names' order: test then measured what training saw. Drawn splits now keep every copy
    in the first split that holds one (train, then val)."""
    root = make_class_folders(tmp_path / "d", classes=("cat", "dog"), per_class=30)
    for i in range(8):  # a copy of 8 cats, under another name
        shutil.copy(root / "cat" / f"{i:03d}.png", root / "cat" / f"copy_{i}.png")
    caplog.set_level("INFO")
    where, info = _split_of_each_file(root)
    pairs = [(where[f"cat/{i:03d}.png"], where[f"cat/copy_{i}.png"]) for i in range(8)]
    assert all(a == b for a, b in pairs), pairs
    assert "moved into it, so that no copy tests what training saw" in caplog.text
    assert sum(info.split_sizes.values()) == 68  # nothing lost


def test_exact_copies_across_the_datas_own_split_folders_stay_with_a_warning(tmp_path, caplog):
    root = tmp_path / "p"
    make_class_folders(root / "train", classes=("cat", "dog"), per_class=8)
    make_class_folders(root / "test", classes=("cat", "dog"), per_class=3, seed=1)
    shutil.copy(root / "train" / "dog" / "000.png", root / "test" / "dog" / "again.png")
    where, _ = _split_of_each_file(root)
    assert where["test/dog/again.png"] == "test"  # the data's own split: kept
    said = "1 test image(s) have the same content as an image of an earlier split and stay"
    assert f"{said} (a split the data gives" in caplog.text


def test_copies_that_would_leave_val_empty_stay_in_it_with_a_warning(tmp_path, caplog):
    """An image a class, each also under a second name, cut half and half: every val image is a
    copy of a train one, and moving them emptied val (training then said data.split gave val
    none). They stay, and the warning says why."""
    root = make_class_folders(tmp_path / "d", classes=("cat", "dog"), per_class=1)
    for p in list(root.glob("*/*.png")):
        shutil.copy(p, p.with_name(f"copy_{p.name}"))
    where, info = _split_of_each_file(root, "data.split=[0.5,0.5,0]")
    assert info.split_sizes["val"] > 0
    assert "or val, which would be left empty" in caplog.text
