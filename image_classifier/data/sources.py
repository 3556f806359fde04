"""`command=download`: fetch a packaged dataset (Fashion-MNIST by default) into data/, verified.

Sources are tried in order and every result is checked against the SHA-256 of the decompressed
files, so the bytes under data/ (and hence the DVC hash in data.dvc) are the same from any source:
  local    a verified copy already under data/
  dvc      `dvc pull` from the configured DVC remote
  system   the Debian/Ubuntu package's files (/usr/share/datasets/fashion-mnist)
  apt      `apt-get download <package>` + unpack (no install rights needed)
  upstream the dataset's own URLs (needs internet)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from image_classifier.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class DownloadResult:
    directory: Path
    source: str
    attempts: list[tuple[str, str]]  # (source, why it failed) before the one that worked


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(directory: Path, files: dict[str, str]) -> str | None:
    """None when every file is present with its checksum, else why not."""
    for name, digest in files.items():
        p = directory / name
        if not p.exists():
            return f"{p} is missing"
        actual = sha256_file(p)
        if actual != digest:
            return f"{p} has SHA-256 {actual[:12]}..., expected {digest[:12]}..."
    return None


def _install_from(src_dir: Path, dest: Path, files: dict[str, str]) -> str | None:
    """Copy (gunzipping `name.gz` when only that exists) into a temp folder, verify, then move."""
    missing = [
        n for n in files if not (src_dir / n).exists() and not (src_dir / f"{n}.gz").exists()
    ]
    if missing:
        return f"{src_dir} lacks {', '.join(missing)}"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        tmp = Path(tmp)
        for name in files:
            if (src_dir / name).exists():
                shutil.copyfile(src_dir / name, tmp / name)
            else:
                try:
                    with (
                        gzip.open(src_dir / f"{name}.gz", "rb") as fi,
                        open(tmp / name, "wb") as fo,
                    ):
                        shutil.copyfileobj(fi, fo, 1 << 20)
                except (OSError, EOFError) as e:
                    return f"{src_dir / name}.gz is not a valid gzip file ({e})"
        why = verify(tmp, files)
        if why:
            return f"checksum mismatch: {why}"
        for name in files:  # atomic per file: a half-copied file never sits under its final name
            os.replace(tmp / name, dest / name)
    return None


def _try_dvc(project_root: Path, dest: Path, files: dict[str, str]) -> str | None:
    dvc_file = project_root / "data.dvc"
    if not dvc_file.exists() or not (project_root / ".dvc").is_dir():
        return f"no DVC tracking here ({dvc_file} or .dvc/ missing)"
    dvc = shutil.which("dvc") or str(Path(os.sys.executable).parent / "dvc")
    try:
        proc = subprocess.run(
            [dvc, "pull", "--quiet", str(dvc_file)],
            cwd=project_root,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`dvc pull` could not run ({e})"
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        return "`dvc pull` failed: " + (msg[-1] if msg else f"exit {proc.returncode}")
    why = verify(dest, files)
    return f"`dvc pull` succeeded but {why}" if why else None


def _try_apt(package: str, dest: Path, files: dict[str, str], system_dir: str) -> str | None:
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        return "apt-get/dpkg-deb not available on this system"
    with tempfile.TemporaryDirectory(prefix="apt-download-") as tmp:

        def download():
            return subprocess.run(
                ["apt-get", "download", package],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=300,
            )

        try:
            proc = download()
            if proc.returncode != 0 and os.geteuid() == 0:
                # a fresh machine often has no package lists yet
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
                proc = download()
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"`apt-get download {package}` could not run ({e})"
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return f"`apt-get download {package}` failed: " + (lines[-1] if lines else "no output")
        debs = list(Path(tmp).glob("*.deb"))
        if not debs:
            return f"`apt-get download {package}` produced no .deb file"
        unpacked = Path(tmp) / "root"
        proc = subprocess.run(
            ["dpkg-deb", "-x", str(debs[0]), str(unpacked)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            return f"`dpkg-deb -x` failed: {proc.stderr.strip()}"
        return _install_from(unpacked / system_dir.lstrip("/"), dest, files)


def _try_upstream(urls: list[str], dest: Path, files: dict[str, str], timeout: float) -> str | None:
    if not urls:
        return "no upstream URLs configured"
    errors = []
    for base in urls:
        with tempfile.TemporaryDirectory(prefix="upstream-") as tmp:
            try:
                for name in files:
                    url = f"{base.rstrip('/')}/{name}.gz"
                    with (
                        urllib.request.urlopen(url, timeout=timeout) as r,
                        open(Path(tmp) / f"{name}.gz", "wb") as f,
                    ):
                        shutil.copyfileobj(r, f, 1 << 20)
            except OSError as e:
                errors.append(f"{base}: {getattr(e, 'reason', e)}")
                continue
            why = _install_from(Path(tmp), dest, files)
            if why is None:
                return None
            errors.append(f"{base}: {why}")
    return "; ".join(errors)


def _from_system(src, project_root: Path, dest: Path, files: dict) -> str | None:
    if not Path(src.system_dir).is_dir():
        return f"{src.system_dir} does not exist (package {src.apt_package} not installed)"
    return _install_from(Path(src.system_dir), dest, files)


# data.download.sources: name -> fetch(download config, project root, dest, files) -> why not | None
SOURCES = {
    "local": lambda src, root, dest, files: verify(dest, files),
    "dvc": lambda src, root, dest, files: _try_dvc(root, dest, files),
    "system": _from_system,
    "apt": lambda src, root, dest, files: _try_apt(src.apt_package, dest, files, src.system_dir),
    "upstream": lambda src, root, dest, files: _try_upstream(
        list(src.urls), dest, files, float(src.timeout)
    ),
}


def download(dcfg, project_root: Path) -> DownloadResult:
    """Run the configured sources in order until one yields verified files."""
    dest = Path(dcfg.dir)
    files = dict(dcfg.files)
    src = dcfg.download
    attempts: list[tuple[str, str]] = []
    for source in src.sources:
        if source not in SOURCES:
            raise UserError(
                f"Unknown download source {source!r} in data.download.sources; valid: "
                f"{', '.join(SOURCES)}."
            )
        why = SOURCES[source](src, project_root, dest, files)
        if why is None:
            if source != "local":
                log.info("Fetched %s from %s into %s", dcfg.name, source, dest)
            return DownloadResult(dest, source, attempts)
        log.debug("download source %s: %s", source, why)
        attempts.append((source, why))

    tried = "\n".join(f"  - {s}: {why}" for s, why in attempts)
    raise UserError(
        f"Could not get dataset {dcfg.name!r}; every source failed:\n{tried}\n"
        f"Fix: install the Debian/Ubuntu package (`sudo apt-get update && sudo apt-get install "
        f"{src.apt_package}`), or `dvc pull` from a remote that holds it, or copy the files "
        f"{sorted(files)} into {dest}/, then run `uv run python commands.py command=download` "
        "again."
    )


def track_with_dvc(project_root: Path, target: str = "data") -> str:
    """`dvc add data` so data.dvc records exactly what is there; returns what happened."""
    root = Path(project_root)
    if not (root / ".dvc").is_dir():
        return "not tracked by DVC (no .dvc/ in the project root)"
    dvc = shutil.which("dvc") or str(Path(os.sys.executable).parent / "dvc")
    try:
        proc = subprocess.run(
            [dvc, "add", "--quiet", target], cwd=root, capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`dvc add {target}` could not run ({e})"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return f"`dvc add {target}` failed: {lines[-1] if lines else proc.returncode}"
    return f"tracked by DVC in {target}.dvc (`dvc push` sends it to the default remote)"


def run_download(cfg) -> dict:
    """`command=download`."""
    if cfg.data.kind != "idx":
        raise UserError(
            f"data={cfg.data.name} reads images from data.root; there is nothing to download. "
            "Run command=train (or the default data=fashion_mnist with command=download)."
        )
    root = Path(cfg.paths.root)
    result = download(cfg.data, root)
    d = cfg.data.download
    if not d.get("track", True):
        dvc = "not re-tracked (data.download.track=false; data.dvc stays as it is)"
    elif Path(cfg.data.dir).resolve().is_relative_to((root / "data").resolve()):
        dvc = track_with_dvc(root)
    else:
        dvc = "outside data/: not tracked by DVC"
    if d.get("record"):  # a small, deterministic stand-in for the data in a dvc.yaml pipeline
        record = Path(d.record)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(
            json.dumps({"name": cfg.data.name, "files": dict(cfg.data.files)}, indent=2) + "\n"
        )
    print(
        "\n".join(
            [
                f"{cfg.data.name}: {len(cfg.data.files)} files verified in {result.directory} "
                f"(source: {result.source})",
                *[f"  skipped source {s}: {why}" for s, why in result.attempts if s != "local"],
                f"  {dvc}",
            ]
        )
    )
    return {"directory": str(result.directory), "source": result.source, "dvc": dvc}
