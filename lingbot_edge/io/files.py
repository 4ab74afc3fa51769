"""The project's files: every folder and file it writes goes through `write_folder` / `write_file`
(`write_text`, `write_json`), and every JSON file it reads through `read_json`.

A write is filled under a temporary name beside the target, then swapped in. Temporary names are
`.<target name>.lingbot-edge-<tmp|old>.<pid>.<random>[<suffix>]`: loaders refuse them (`refuse_temp_path`),
and the next write of the same target sweeps those whose process is gone and, if a killed two-rename swap
left the target missing, puts the previous folder back (`recover`). The optional suffix (e.g. ".mp4") is for
writers whose library picks the format by the file name. `check_output_folder` refuses an output folder the
tool did not write. Standard library only: cheap to import.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEMP_PATTERN = re.compile(r"\.(?P<target>.+)\.lingbot-edge-(?P<kind>tmp|old)\.(?P<pid>\d+)\.[0-9a-f]+(?:\.\w+)?")
AT_FDCWD = -100
RENAME_EXCHANGE = 2
# Tests set this to a function of the stage name (e.g. one that SIGKILLs the process) to interrupt a
# write between its steps: "written", "exchanged", "moved-aside", "renamed".
STAGE_HOOK: Callable[[str], None] | None = None


class OutputPathError(ValueError):
    """An output path the tool refuses to write (it would replace something it did not write)."""


def stage(name: str) -> None:
    """A named step of a write (or of a quantize run): where `STAGE_HOOK` may interrupt it."""
    if STAGE_HOOK is not None:
        STAGE_HOOK(name)


def temp_path(target: Path, kind: str = "tmp", suffix: str = "") -> Path:
    return target.parent / f".{target.name}.lingbot-edge-{kind}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"


def is_temp_path(path: str | Path) -> bool:
    return TEMP_PATTERN.fullmatch(Path(path).name) is not None


def refuse_temp_path(path: str | Path, error: type[Exception] = ValueError) -> None:
    """Loaders call this: a temporary folder of an unfinished or interrupted write is never a checkpoint."""
    if is_temp_path(path):
        raise error(f"{path}: a temporary folder of an unfinished or interrupted lingbot-edge write, not a "
                    "checkpoint (the next write of its target removes it)")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def recover(target: str | Path) -> None:
    """Repair what killed writes of `target` left: if `target` is missing and a previous version was moved
    aside (two-rename fallback), put it back; remove this tool's temp paths of `target` whose process is gone."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    stale = []
    for p in target.parent.iterdir():
        m = TEMP_PATTERN.fullmatch(p.name)
        if m and m["target"] == target.name and not _alive(int(m["pid"])):
            stale.append((p, m["kind"]))
    if not target.exists() and not target.is_symlink():
        moved = sorted((p for p, kind in stale if kind == "old"), key=lambda p: p.stat().st_mtime)
        if moved:
            os.rename(moved[-1], target)
            log.warning("%s: restored the previous version an interrupted write had moved aside", target)
            stale = [(p, k) for p, k in stale if p != moved[-1]]
    for p, _ in stale:
        log.info("removing %s, left by an interrupted write", p)
        _remove(p)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), str(b))


def _install(tmp: Path, target: Path) -> None:
    """Put the finished `tmp` at `target`; the previous `target` (if any) is removed only afterwards."""
    if not target.exists():
        os.rename(tmp, target)
        stage("renamed")
        return
    if exchange(tmp, target):  # no moment without a complete target
        stage("exchanged")
        _remove(tmp)  # now the previous version
        return
    old = temp_path(target, "old")  # fallback: two renames; `recover` repairs a kill between them
    os.rename(target, old)
    stage("moved-aside")
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    stage("renamed")
    _remove(old)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder(folder: str | Path, fill: Callable[[Path], None]) -> Path:
    """Write `folder` all or nothing: `fill(tmp)` writes the files into a temp folder beside it, which
    is synced and swapped in. Call `check_output_folder` first: this replaces what is there."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover(folder)
    tmp = temp_path(folder)
    tmp.mkdir()
    try:
        fill(tmp)
        for p in tmp.iterdir():  # libraries may create private (0600) files: give the modes the umask allows
            p.chmod(0o666 & ~_umask())
            _fsync(p)
        _fsync(tmp)
        stage("written")
        _install(tmp, folder)
        _fsync(folder.parent)
    except BaseException:
        if tmp.exists():
            _remove(tmp)
        raise
    return folder


def write_file(path: str | Path, fill: Callable[[Path], None], suffix: str = "") -> Path:
    """Write one file all or nothing: `fill(tmp)` writes a temp file beside it, synced and renamed over it.
    The one atomic file writer of the project. `suffix`: the temp file's name ends with it (".mp4", ".png"),
    for a `fill` whose library picks the format by the name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = temp_path(path, suffix=suffix)
    try:
        fill(tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """`write_file` of a text file."""
    return write_file(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, data: Any) -> Path:
    """`write_file` of `data` as indented JSON (and a final newline)."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path, what: str = "", *, error: type[Exception] = ValueError, name: str | None = None,
              obj: bool = True) -> Any:
    """The JSON in `path` (a JSON object unless `obj=False`). A file that is not UTF-8 JSON, or not an object,
    raises `error` naming the file (`name`, default the path) and `what` it should hold; a missing file raises
    FileNotFoundError (callers that must say more check `is_file()` first)."""
    path = Path(path)
    name = name or str(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{name}: not valid JSON ({e})" + (f"; expected {what}" if what else "")) from e
    if obj and not isinstance(data, dict):
        raise error(f"{name}: expected a JSON object" + (f" ({what})" if what else "")
                    + f", got {type(data).__name__}")
    return data


def check_output_folder(folder: str | Path, *, ours: Callable[[Path], bool], what: str, replace: bool = False,
                        inputs: Sequence[str | Path] = (), replace_hint: str = "pass --force to replace it") -> None:
    """Refuse an output folder unless it is absent or empty, or (with `replace`) `what` (`ours(folder)`);
    an output equal to, inside or around one of `inputs` is always refused. Nothing is changed by a refusal."""
    folder = Path(folder)
    resolved = folder.resolve()
    overlaps = []
    for src in inputs:
        s = Path(src).resolve()
        if resolved == s or s in resolved.parents or resolved in s.parents:
            overlaps.append(("is" if resolved == s else "is inside" if s in resolved.parents else "contains", src))
    if overlaps:
        relation, src = min(overlaps, key=lambda o: o[0] != "is")  # "is" names the input best
        raise OutputPathError(f"{folder}: the output {relation} the input {src}; choose an output folder outside it")
    if folder.is_symlink():
        raise OutputPathError(f"{folder}: is a symbolic link; give the real folder or an absent path")
    recover(folder)  # an interrupted earlier write: judge the folder it left in place
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OutputPathError(f"{folder}: exists and is not a folder (expected an absent or empty folder, or {what})")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    if not ours(folder):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputPathError(f"{folder}: not empty ({shown}) and not {what}; refusing to replace it (choose an "
                              "absent or empty folder)")
    if not replace:
        raise OutputPathError(f"{folder}: already holds {what}; {replace_hint}")
