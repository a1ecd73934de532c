"""Content-addressed files of a bundle: `<dir>/<sha256>.<ext>`, verified on every load."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from planc.errors import BundleError, PlancError
from planc.manifest import is_planc_manifest

_CHUNK = 8 * 1024 * 1024


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def store_file(tmp_file: Path, directory: Path, ext: str) -> tuple[str, Path]:
    """Move a written file to `directory/<sha256>.<ext>`; returns (sha256, final path)."""
    digest = file_sha256(tmp_file)
    final = directory / f"{digest}.{ext}"
    if final.exists():
        tmp_file.unlink()
    else:
        os.chmod(tmp_file, 0o644)
        os.replace(tmp_file, final)
    return digest, final


def verify_file(path: Path, expected: str) -> None:
    """Refuse a file whose bytes do not hash to `expected`."""
    if not path.is_file():
        raise BundleError(f"{path}: missing from the bundle")
    actual = file_sha256(path)
    if actual != expected:
        raise BundleError(f"{path}: content does not match its recorded sha256 ({actual[:12]}… != {expected[:12]}…); "
                          "the bundle was modified or corrupted")


def check_output_dir(out: Path) -> Path:
    """Refuse an output path that is not ours to replace: only a planc bundle or an empty directory."""
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise PlancError(f"--out {out} exists and is not a directory; refusing to replace it")
        if any(out.iterdir()) and not is_planc_manifest(out / "manifest.json"):
            raise PlancError(f"--out {out} exists and is not a planc bundle (no manifest.json); refusing to replace it")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PlancError(f"--out {out}: {parent} is a file, not a directory")
            break
    return out


@contextmanager
def staging_dir(out: Path, replace_check: bool = True) -> Iterator[Path]:
    """A temporary directory beside `out` that becomes `out` only if the body succeeds.

    A failure (or Ctrl-C) removes it; an existing `out` is replaced only after the new one is
    complete, so readers never see a half-written bundle.
    """
    out = check_output_dir(out) if replace_check else Path(out).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise PlancError(f"--out {out}: cannot create the bundle there: {exc.strerror}") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be shared
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "bundle")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
