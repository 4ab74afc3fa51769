"""`lingbot-edge quantize --out` as a user meets it: what it refuses (every byte of the refused path
and of the source left as it was), what it replaces (only its own checkpoints, with --force), and
kill -9 at every stage of a run (the CLI in a subprocess, SIGKILLed at a named step through
`lingbot_edge.io.files.STAGE_HOOK`): the old or the new valid checkpoint stays at --out, and
nothing the loader accepts is left anywhere else."""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lingbot_edge.core.config import get_policy_config
from lingbot_edge.io import files
from lingbot_edge.io.checkpoint import build_model, load_transformer, save_transformer
from lingbot_edge.io.files import recover
from lingbot_edge.io.loading import CheckpointError, resolve_checkpoint
from lingbot_edge.io.quantized import MANIFEST_NAME, QuantizedCheckpointError, load_quantized
from quantize.commands import register

OLD, NEW = "int8_weight_only", "int8_dynamic"


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lingbot-edge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["quantize", *argv])
    return args.func(args)


def tree(root: Path) -> dict[str, str | None]:
    """Every path under `root` -> sha256 of its bytes (None for a folder)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A checkpoint root as released: transformer/ (the tiny DiT) next to the frozen parts."""
    root = tmp_path_factory.mktemp("src") / "ckpt"
    save_transformer(build_model(get_policy_config("tiny").model_config, seed=3), root / "transformer")
    for part in ("vae", "text_encoder", "tokenizer"):
        (root / part).mkdir()
        (root / part / "config.json").write_text(json.dumps({"part": part}))
    return root


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    """A quantized checkpoint of `source` (OLD scheme), to copy."""
    out = tmp_path_factory.mktemp("q") / "q"
    assert _cli("--checkpoint", str(source), "--scheme", OLD, "--out", str(out), "--device", "cpu") == 0
    return out


def _schemes(folder: Path) -> set[str]:
    return {m["scheme"] for m in json.loads((folder / MANIFEST_NAME).read_text())["modules"].values()}


@pytest.fixture
def base(tmp_path, source, quantized):
    """tmp_path with a copy of the source root and of the quantized checkpoint."""
    shutil.copytree(source, tmp_path / "ckpt")
    shutil.copytree(quantized, tmp_path / "q")
    return tmp_path


def _own(p: Path) -> Path:
    p.mkdir()
    (p / "notes.txt").write_text("my notes")
    return p


def _file(p: Path) -> Path:
    p.write_text("a regular file")
    return p


def _quantized_plus_file(p: Path) -> Path:
    (p.parent / "q" / "notes.txt").write_text("mine")
    return p.parent / "q"


def _edited_manifest(p: Path) -> Path:
    path = p.parent / "q" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["dtype"] = "float16"
    path.write_text(json.dumps(manifest))
    return p.parent / "q"


REFUSED = {  # name -> (make the --out path under base, extra args, error)
    "own folder": (_own, [], r"not empty \(notes.txt\) and not a lingbot-edge quantized checkpoint"),
    "own folder --force": (_own, ["--force"], r"not empty \(notes.txt\) and not a lingbot-edge quantized"),
    "regular file": (_file, ["--force"], "exists and is not a folder"),
    "source root": (lambda p: p.parent / "ckpt", ["--force"], "the output is the input"),
    "source transformer/": (lambda p: p.parent / "ckpt" / "transformer", ["--force"], "the output is the input"),
    "inside the source": (lambda p: p.parent / "ckpt" / "transformer" / "q", [], "the output is inside the input"),
    "around the source": (lambda p: p.parent, ["--force"], "the output contains the input"),
    "quantized, no --force": (lambda p: p.parent / "q", [], "already holds a lingbot-edge quantized checkpoint; "
                                                            "pass --force"),
    "quantized + a user file": (_quantized_plus_file, ["--force"], "not empty .* and not a lingbot-edge quantized"),
    "quantized, edited manifest": (_edited_manifest, ["--force"], "not empty .* and not a lingbot-edge quantized"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_outputs_keep_every_byte(base, capsys, case):
    make, extra, error = REFUSED[case]
    out = make(base / "out")
    before = tree(base)
    assert _cli("--checkpoint", str(base / "ckpt"), "--scheme", NEW, "--out", str(out), "--device", "cpu",
                *extra) == 2
    assert re.search(error, capsys.readouterr().err), error
    assert tree(base) == before


@pytest.mark.parametrize("case", ["absent", "empty", "quantized --force"])
def test_accepted_outputs(base, capsys, case):
    out = {"absent": base / "new" / "out", "empty": base / "empty", "quantized --force": base / "q"}[case]
    if case == "empty":
        out.mkdir()
    source_before = tree(base / "ckpt")
    extra = ["--force"] if case == "quantized --force" else []
    assert _cli("--checkpoint", str(base / "ckpt" / "transformer"), "--scheme", NEW, "--out", str(out),
                "--device", "cpu", *extra) == 0
    assert _schemes(out) == {NEW} and load_quantized(out) is not None
    assert tree(base / "ckpt") == source_before
    assert not [p for p in out.parent.iterdir() if files.is_temp_path(p)]


def test_empty_plans_and_unmatched_rules_are_errors(base, capsys):
    plan = base / "plan.json"
    for rules, error in [([], "quantizes no Linear of this model"),
                         ([{"pattern": r"blocks\.\d+\.atn1\..+", "scheme": NEW}], r"matches no Linear")]:
        plan.write_text(json.dumps({"rules": rules, "default": "keep"}))
        assert _cli("--checkpoint", str(base / "ckpt"), "--plan", str(plan), "--out", str(base / "out"),
                    "--device", "cpu") == 2
        assert re.search(error, capsys.readouterr().err)
        assert not (base / "out").exists()


def test_scheme_error_lists_what_scheme_accepts(base, capsys):
    assert _cli("--checkpoint", str(base / "ckpt"), "--scheme", "keep", "--out", str(base / "out")) == 2
    err = capsys.readouterr().err
    assert "unknown scheme 'keep'; expected one of ['fp8_dynamic'," in err and "or 'keep'" not in err


def test_missing_manifest_says_so(base):
    (base / "q" / MANIFEST_NAME).unlink()
    with pytest.raises(QuantizedCheckpointError, match=f"no {MANIFEST_NAME}"):
        load_quantized(base / "q")
    with pytest.raises(CheckpointError, match=f"holds quantized weights .* but no {MANIFEST_NAME}"):
        resolve_checkpoint(base / "ckpt", transformer=base / "q", parts=("transformer",))
    with pytest.raises(ValueError, match=f"but no {MANIFEST_NAME}"):
        load_transformer(base / "q")


def test_temp_folders_are_refused_and_swept_once_their_process_is_gone(base):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = base / f".q.lingbot-edge-tmp.{dead.pid}.0123abcd"
    live = base / f".q.lingbot-edge-tmp.{os.getpid()}.4567abcd"  # a write still running (this process)
    for p in (stale, live):
        shutil.copytree(base / "q", p)
        with pytest.raises(QuantizedCheckpointError, match="temporary folder of an unfinished or interrupted"):
            load_quantized(p)
    assert _cli("--checkpoint", str(base / "ckpt"), "--scheme", NEW, "--out", str(base / "q"), "--force",
                "--device", "cpu") == 0
    assert not stale.exists() and live.exists()


# ----------------------------------------------------------------------------- kill -9

KILL = r"""
import os, signal, sys
import lingbot_edge.io.files as files

stage, argv = sys.argv[1], sys.argv[2:]
def hook(name):
    if name == stage:
        os.kill(os.getpid(), signal.SIGKILL)
files.STAGE_HOOK = hook
if stage in ("moved-aside", "renamed"):  # the two-rename fallback, as without renameat2
    files.exchange = lambda a, b: False
if stage == "shard":  # during the weight files: after the first of several shards
    import safetensors.torch as st
    real, calls = st.save_file, []
    def save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    st.save_file = save_file
from lingbot_edge.cli.main import main
sys.exit(main(argv))
"""
# stage -> what --out holds right after the kill (None: nothing until the next run repairs it)
STAGES = {"quantized": OLD, "shard": OLD, "written": OLD, "exchanged": NEW, "moved-aside": None, "renamed": NEW}


def _loadable(folder: Path) -> bool:
    for load in (load_quantized, load_transformer):
        try:
            load(folder)
            return True
        except (QuantizedCheckpointError, ValueError, FileNotFoundError):
            pass
    return False


@pytest.mark.parametrize("stages", [
    ("exchanged", "moved-aside"),  # between the swap steps, both ways of swapping
    pytest.param(tuple(STAGES), marks=pytest.mark.slow),  # every stage (~30 s on 2 cores)
], ids=["swap", "every-stage"])
def test_kill_leaves_old_or_new(tmp_path, source, quantized, stages):
    """The stages at once (one subprocess each, run side by side: ~5 s of imports apiece)."""
    runs = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    for stage in stages:
        base = tmp_path / stage
        shutil.copytree(source, base / "ckpt")
        shutil.copytree(quantized, base / "q")
        argv = ["quantize", "--checkpoint", str(base / "ckpt"), "--scheme", NEW, "--out", str(base / "q"),
                "--force", "--device", "cpu", "--max-shard-gb", str(60_000 / 2**30)]
        runs[stage] = subprocess.Popen([sys.executable, "-c", KILL, stage, *argv], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for stage, proc in runs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -9, (stage, err.decode()[-2000:])
    for stage in stages:
        expected, base = STAGES[stage], tmp_path / stage
        out = base / "q"
        if expected is None:  # killed between the fallback's two renames: the next run puts the old one back
            assert not out.exists()
            recover(out)
            expected = OLD
        assert _schemes(out) == {expected}, stage
        load_quantized(out)  # complete and valid: every checksum
        others = [p for p in base.rglob("*") if p.is_dir() and p != out and not p.is_relative_to(base / "ckpt")]
        assert not [p for p in others if _loadable(p)], stage
        if stage in ("exchanged", "renamed", "written"):
            assert [p for p in others if files.is_temp_path(p)], stage  # what the next run sweeps
        assert _cli("--checkpoint", str(base / "ckpt"), "--scheme", NEW, "--out", str(out), "--force",
                    "--device", "cpu") == 0
        assert _schemes(out) == {NEW} and load_quantized(out) is not None
        assert sorted(p.name for p in base.iterdir()) == ["ckpt", "q"], stage  # swept


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        p.mkdir()
        (p / "name").write_text(p.name)
    if not files.exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported here: the two-rename fallback is used")
    assert (a / "name").read_text() == "b" and (b / "name").read_text() == "a"


def test_provenance_checks(caplog):
    from quantize.run import MismatchError, check_provenance

    record = {"checkpoint": "/c/transformer", "checkpoint_sha256": "a" * 64, "dtype": "bfloat16",
              "smoothing_alpha": 0.5, "data": {"source": "synthetic", "episodes": ["synthetic-0"]}}
    check_provenance({"--plan p": record, "--calibration c": dict(record)}, "a" * 64, "bfloat16", False)
    with pytest.raises(MismatchError, match=r"--plan p: measured on checkpoint /c/transformer .* smoothing 0.5"):
        check_provenance({"--plan p": record}, "b" * 64, "bfloat16", False)
    with pytest.raises(MismatchError, match="come from different `calibrate plan` runs"):
        check_provenance({"--plan p": record, "--calibration c": {**record, "data": {}}}, "a" * 64, "bfloat16",
                         False)
    with pytest.raises(MismatchError, match="--calibration c: records no provenance"):
        check_provenance({"--calibration c": None}, "a" * 64, "bfloat16", False)
    with caplog.at_level("WARNING"):
        check_provenance({"--plan p": record}, "b" * 64, "bfloat16", True)
        check_provenance({"--plan p": record}, "a" * 64, "float32", False)
    assert "--allow-mismatch: used anyway" in caplog.text
    assert "verified in bfloat16, deploying in float32" in caplog.text
