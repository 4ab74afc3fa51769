"""Load / save the DiT in upstream's `transformer/` folder layout.

    transformer/config.json                                   (diffusers-style config)
    transformer/diffusion_pytorch_model.safetensors           (single file), or
    transformer/diffusion_pytorch_model.safetensors.index.json + shards

The model is built on the meta device and each tensor is read from safetensors straight into
the target dtype and device, one at a time: a full fp32 (or even full bf16 CPU) copy of the
model never exists.
"""

from __future__ import annotations

import contextlib
import copy
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

import torch
from torch import nn

from lingbot_edge.core.config import ModelConfig
from lingbot_edge.core.model import WanVATransformer

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
QUANTIZED_MANIFEST = "quantization.json"  # lingbot_edge.io.quantized: its manifest and payload names
QUANTIZED_WEIGHT_SUFFIX = ".weight_qdata"


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int | None = 0) -> WanVATransformer:
    """A randomly initialised model (tests, the tiny demo, full-size memory/speed runs).

    Built on the meta device; every parameter is then drawn in fp32 into one reused scratch buffer, in
    the constructor's RNG order, and copied into its own tensor in `dtype` on `device`: the same values
    as `WanVATransformer(cfg).to(dtype)`, with a peak of the model in `dtype` plus one fp32 layer."""
    model = build_meta_model(cfg)
    device = torch.device(device)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    scratch = torch.empty(largest, device=device)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        _materialise(model, scratch, dtype)
    return model


def _materialise(module: nn.Module, scratch: torch.Tensor, dtype: torch.dtype) -> None:
    """Post-order, like construction: a module's children are initialised before its own parameters."""
    for child in module.children():
        _materialise(child, scratch, dtype)
    own = dict(module.named_parameters(recurse=False))
    if not own:
        return
    draws, offset = {}, 0
    for name, p in own.items():  # fp32 views of the scratch buffer, one per parameter
        draws[name] = scratch[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
    if hasattr(module, "reset_parameters") and not list(module.children()):  # Linear / LayerNorm / RMSNorm
        fresh = copy.deepcopy(module)  # still on meta: free
        for name, view in draws.items():
            setattr(fresh, name, nn.Parameter(view, requires_grad=False))
        with torch.no_grad():
            fresh.reset_parameters()  # torch's own init, in fp32
    elif set(own) == {"scale_shift_table"}:  # the modulation tables: torch.randn(...) / dim ** 0.5
        view = draws["scale_shift_table"]
        view.normal_().div_(view.shape[-1] ** 0.5)
    else:
        raise TypeError(f"build_model: no initialisation rule for {type(module).__name__} parameters {sorted(own)}")
    for name, view in draws.items():
        value = torch.empty(view.shape, dtype=dtype, device=scratch.device).copy_(view)
        setattr(module, name, nn.Parameter(value, requires_grad=False))


def build_meta_model(cfg: ModelConfig) -> WanVATransformer:
    """Shapes only, no memory: for loading and for byte counts of the full model."""
    with torch.device("meta"):
        return WanVATransformer(cfg).eval().requires_grad_(False)


def weight_files(folder: Path, what: str = f"{WEIGHTS_NAME} or a sharded index",
                 error: type[Exception] = ValueError) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it (a single file, or an index +
    shards); reads headers only. Problems raise `error` naming the file and `what` was expected."""
    refuse_temp_path(folder, error)
    files = _weight_files(folder, what, error)
    if any(name.endswith(QUANTIZED_WEIGHT_SUFFIX) for name in files):
        if (folder / QUANTIZED_MANIFEST).is_file():
            raise error(f"{folder}: a quantized checkpoint (has {QUANTIZED_MANIFEST}): load it with "
                        "lingbot_edge.io.quantized.load_quantized (or as load_policy's transformer=)")
        raise error(f"{folder}: holds quantized weights (*{QUANTIZED_WEIGHT_SUFFIX}) but no {QUANTIZED_MANIFEST}: "
                    "the manifest of this `lingbot-edge quantize` folder is missing (restore it, or quantize again)")
    return files


def _weight_files(folder: Path, what: str, error: type[Exception]) -> dict[str, Path]:
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        index = indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise error(f"{index}: expected a JSON object with a 'weight_map' of tensor name -> shard file") from e
        if not isinstance(weight_map, dict) or not weight_map:
            raise error(f"{index}: expected a non-empty 'weight_map' of tensor name -> shard file")
        files = {name: folder / fname for name, fname in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise error(f"{index}: shard files missing: {missing} (expected {what})")
        return files
    singles = sorted(folder.glob("*.safetensors"))
    if not singles:
        raise error(f"{folder}: no *.safetensors weights (expected {what})")
    if len(singles) > 1:
        raise error(f"{folder}: several .safetensors files {[p.name for p in singles]} but no *{INDEX_SUFFIX} "
                    f"to map tensors to them (expected {what})")
    return tensor_files(singles[0], error)


def tensor_files(path: Path, error: type[Exception] = ValueError) -> dict[str, Path]:
    """Every tensor name of one safetensors file -> that file (headers only)."""
    with open_safetensors(path, error) as f:
        return dict.fromkeys(f.keys(), path)


def load_transformer(
    folder: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    prefix: str = "",
) -> WanVATransformer:
    """Load a LingBot-VA DiT from a `transformer/` folder (or a checkpoint root containing one).

    `prefix` strips a key prefix (LeRobot-converted policies store `transformer.` keys).
    """
    folder = Path(folder)
    if (folder / "transformer").is_dir() and not (folder / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected upstream's transformer/ layout)")
    cfg = ModelConfig.from_json(folder / "config.json")
    files = {k[len(prefix):]: p for k, p in weight_files(folder).items() if k.startswith(prefix)}

    model = build_meta_model(cfg)
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{folder}: checkpoint keys do not match the LingBot-VA transformer: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )

    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    # Check every shape from the headers first, so a bad file fails before any device memory is used.
    for path, names in by_file.items():
        with open_safetensors(path) as f:
            for name in names:
                shape = tuple(f.get_slice(prefix + name).get_shape())
                if shape != tuple(expected[name].shape):
                    raise ValueError(f"{path}: {name} has shape {shape}, expected {tuple(expected[name].shape)}")
    for path, names in by_file.items():
        with open_safetensors(path) as f:
            for name in names:
                _set_param(model, name, f.get_tensor(prefix + name).to(device=device, dtype=dtype))
    log.info("loaded %s (%d tensors) as %s on %s", folder, len(files), dtype, device)
    return model


@contextlib.contextmanager
def open_safetensors(path: Path, error: type[Exception] = ValueError):
    """`safe_open` on the CPU; a damaged file raises `error` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise error(f"{path}: unreadable safetensors file ({e}); expected a complete safetensors file "
                    "(truncated download?)") from e


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(value, requires_grad=False))


def is_transformer_folder(folder: Path) -> bool:
    """Only what `save_transformer` writes: config.json + the weights (one file, or an index + shards)."""
    names = {p.name for p in folder.iterdir()}
    weights = {n for n in names if n.startswith(WEIGHTS_NAME.removesuffix(".safetensors"))
               and (n.endswith(".safetensors") or n.endswith(INDEX_SUFFIX))}
    return "config.json" in names and bool(weights) and names == {"config.json"} | weights


def save_transformer(model: WanVATransformer, folder: str | Path, max_shard_bytes: int | None = None, *,
                     replace: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """Write `folder` (config.json + safetensors, sharded above max_shard_bytes) atomically.

    `folder` must be absent or empty, or (with `replace`) a transformer folder; never one of `inputs`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    check_output_folder(folder, ours=is_transformer_folder, what="a transformer/ checkpoint folder",
                        replace=replace, inputs=inputs, replace_hint="pass replace=True to replace it")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        shards = shard_state(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            return
        stem = WEIGHTS_NAME.removesuffix(".safetensors")
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / (WEIGHTS_NAME + ".index.json")).write_text(json.dumps(index, indent=2))

    return write_folder(folder, fill)


def shard_state(state: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Split a state dict, in order, into shards of at most max_shard_bytes (None: one shard)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    return shards


# ----------------------------------------------------------------------------- safe output paths
#
# Every folder and file the project writes goes through `write_folder` / `write_file`: filled under a
# temporary name beside the target, then swapped in. Temporary names are
# `.<target name>.lingbot-edge-<tmp|old>.<pid>.<random>`: loaders refuse them (`refuse_temp_path`), and
# the next write of the same target sweeps those whose process is gone and, if a killed two-rename
# swap left the target missing, puts the previous folder back (`recover`).

TEMP_PATTERN = re.compile(r"\.(?P<target>.+)\.lingbot-edge-(?P<kind>tmp|old)\.(?P<pid>\d+)\.[0-9a-f]+")
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


def temp_path(target: Path, kind: str = "tmp") -> Path:
    return target.parent / f".{target.name}.lingbot-edge-{kind}.{os.getpid()}.{secrets.token_hex(4)}"


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


def write_file(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Write one file all or nothing: `fill(tmp)` writes a temp file beside it, synced and renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = temp_path(path)
    try:
        fill(tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
