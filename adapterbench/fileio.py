"""File I/O every wing shares: atomic writes that follow the umask (a file is complete or
absent), JSON, safetensors, sha256 of a file, output folders staged and moved into place."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from adapterbench.errors import UserError


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temp file in the same folder, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _disk_error(e, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())   # mkstemp makes 0600: files a colleague reads follow the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _disk_error(e, path) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_error(e: OSError, path: Path) -> Exception:
    """A write the file system refuses is one line naming the path and the way out; the previous
    version of the file is untouched. Anything else stays the error it is."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space and rerun"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "fix the permissions (or write elsewhere) and rerun"
    elif e.errno in (errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP):
        fix = "choose another path"
    else:
        return e
    return UserError(f"cannot write {path} ({os.strerror(e.errno)}): {fix}; files written before are intact")


# a file system's refusals, and what the user can do about each
_REFUSALS = {errno.ENOENT: "check the path", errno.EISDIR: "it is a folder where a file belongs: give a file path",
             errno.ENOTDIR: "a file stands where a folder belongs: give another path",
             errno.EACCES: "fix its permissions or use another path", errno.EPERM: "fix its permissions or use another path",
             errno.EROFS: "the file system is read-only: write elsewhere", errno.ENOSPC: "free space and rerun",
             errno.EDQUOT: "free space (quota) and rerun", errno.ENAMETOOLONG: "use a shorter name",
             errno.ELOOP: "a loop of links: fix the link", errno.EEXIST: "something of that name is in the way",
             errno.EBUSY: "it is in use (a mount point, the current folder): give another path"}


def refusal(e: OSError) -> str | None:
    """One line for an OSError the file system raised about a named path (any command, reading or
    writing what a user named), or a full or read-only disk under a library's write that named no
    file; None for any other error, which stays a traceback."""
    if e.errno not in _REFUSALS:
        return None
    if e.filename:
        return f"{e.filename}: {os.strerror(e.errno)}: {_REFUSALS[e.errno]}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return f"a write failed ({os.strerror(e.errno)}): {_REFUSALS[e.errno]} (--debug shows which file)"
    return None


@contextlib.contextmanager
def naming(path: Path):
    """An OSError a library raises without a file name (optuna's journal writes) names `path`."""
    try:
        yield
    except OSError as e:
        if not e.filename:
            e.filename = str(path)
        raise


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, read in 1 MiB blocks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: is this a run folder?") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}): the file is corrupted") from None


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save
    blob = save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, blob)


def load_tensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not Path(path).is_file():
        raise UserError(f"weights file {path} is missing: the run did not finish or the folder was changed")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"weights file {path} is corrupted ({str(e)[:100]}): rerun the stage") from None


def prepare_out(out: Path, force: bool = False, create: bool = True) -> Path:
    """An output folder for export/import/merge: created if absent; a folder that already holds
    files is refused (one line naming it) unless `force`, which replaces only the files written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise UserError(f"{out} is not empty ({shown}...): choose a new --out, or pass --force to overwrite "
                        f"the files this command writes there (others are kept)")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def staged(fn):
    """Decorator for commands that write an output folder (`out` and `force` arguments): the
    folder is written as a hidden temporary sibling and moved into place only when the command
    completes, so a failure (a bad file, a full disk) leaves no folder that looks finished and
    the rerun the error recommends is not refused. A non-empty `out` is refused unless `force`."""
    import functools
    import inspect
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        out = prepare_out(Path(bound.arguments["out"]), bound.arguments.get("force", False), create=False)
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        bound.arguments["out"] = tmp
        try:
            fn(*bound.args, **bound.kwargs)
            if not out.exists():
                os.rename(tmp, out)          # complete: into place in one step
                return out
            move_into(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out
    return wrapper


def slug(text: str) -> str:
    base = Path(text.rstrip("/")).name or text
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "model"


def is_main_process() -> bool:
    """False in the non-zero ranks of `accelerate launch` / `torchrun`: they train, rank 0 writes."""
    return int(os.environ.get("RANK", "0")) == 0




CHECKPOINT_NAME = re.compile(r"step-\d+-e\d+")
TEMP_NAME = re.compile(r"\..+\.(tmp|partial-\d+)$|\..+\.[A-Za-z0-9_]{8}\.tmp$")


def checkpoint_entry(name: str) -> bool:
    """An entry adapterbench writes in a run's checkpoint folder: a step-N-eM checkpoint,
    latest.json, or a temporary file of an interrupted write."""
    return bool(CHECKPOINT_NAME.fullmatch(name) or name == "latest.json" or TEMP_NAME.match(name))


def remove_ours(path: Path, ours) -> list[str]:
    """Delete under `path` only the entries `ours(name)` says adapterbench wrote, never following
    a symbolic link (a link is removed as a link, its target left alone). Returns the names of
    the entries left because they are not ours."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return []
    left = []
    for item in path.iterdir():
        if not ours(item.name):
            left.append(item.name)
        elif item.is_symlink() or not item.is_dir():
            item.unlink(missing_ok=True)
        else:
            shutil.rmtree(item, ignore_errors=True)
    return left


def remove_checkpoints(root: Path, keep: str | None = None) -> None:
    """A run's checkpoint folder: its step-N-eM checkpoints (but `keep`) and latest.json, nothing
    else. When `root` is a link (a scratch disk), the checkpoints in its target go, the link stays
    until nothing else is in the way; other files in the target are never touched."""
    root = Path(root)
    target = root.resolve() if root.is_symlink() else root
    if not target.is_dir():
        return
    remove_ours(target, lambda n: checkpoint_entry(n) and n != keep and (keep is None or n != "latest.json"))
    if keep is None:
        if root.is_symlink():
            root.unlink()
        elif not any(root.iterdir()):
            root.rmdir()


def move_into(src: Path, dst: Path) -> None:
    """Move what `src` holds into the folder `dst`, file by file: a file of the same name is
    replaced, a folder is merged (what else it holds is kept), and a link in the way is replaced
    as a link, never written through."""
    for item in Path(src).iterdir():
        there = Path(dst) / item.name
        if item.is_dir() and there.is_dir() and not there.is_symlink():
            move_into(item, there)
            continue
        if there.is_symlink() or there.is_file():
            there.unlink()
        elif there.is_dir():
            raise UserError(f"{there} is a folder where this command writes a file: move it out of {dst} and rerun")
        os.replace(item, there)


def plain_name(name, where: str) -> str:
    """A name that becomes a file or folder name (an adapter's, a source's) as read from a file
    or the command line: one path component of printable characters, never '.', '..', a path or
    empty, so nothing is written outside the folder it belongs in. Else one line naming `where`."""
    ok = (isinstance(name, str) and 0 < len(name) <= 120 and name.isprintable() and name not in (".", "..")
          and "/" not in name and "\\" not in name and "\0" not in name)
    if not ok:
        raise UserError(f"{where}: {name!r} is not a plain name (one folder name, no '/', '..' or control "
                        f"characters, at most 120 characters): the file was not written by the tool it names; "
                        f"mend it or re-save it")
    return name


def writable_inside(root: Path, *parts: str) -> Path:
    """root/parts..., for a command to write into a folder it did not just make (a received run
    folder): refused in one line when any step from `root` down is a link, so a write never
    lands outside the folder."""
    path = Path(root)
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise UserError(f"{path} is a link (to {path.resolve()}): adapterbench writes into a run folder only, "
                            f"never through a link; remove the link and rerun")
    return path
