"""Sensitivity: quantize one target (a Linear, or every Linear of a block) at a time with each
candidate scheme and measure the end-to-end effect on the calibration episodes (action RMS and
cosine, video latent SQNR) against the unquantized model.

Results are saved atomically after each target; a run started again on the same file skips the
(target, scheme) pairs it already holds, as long as the settings match.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from lingbot_edge.io.files import read_json, write_json
from quantize import get_scheme
from quantize.plan import BLOCK_LINEARS

from .evaluate import Evaluator, linear_deploy_bytes

log = logging.getLogger(__name__)

SENSITIVITY_VERSION = 1


@dataclass(frozen=True)
class SensitivityEntry:
    target: str  # a Linear's name, or "blocks.N"
    modules: tuple[str, ...]
    scheme: str
    action_rms: float
    action_cos: float
    latent_sqnr: float
    bytes_before: int  # the target's deployed bytes kept in bf16
    bytes_after: int  # ... quantized with the scheme

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after


@dataclass(frozen=True)
class Sensitivity:
    entries: tuple[SensitivityEntry, ...]
    meta: dict[str, Any]

    def get(self, target: str, scheme: str) -> SensitivityEntry:
        for e in self.entries:
            if e.target == target and e.scheme == scheme:
                return e
        raise KeyError(f"no sensitivity for {target!r} with {scheme!r}")

    @property
    def targets(self) -> list[str]:
        return list(dict.fromkeys(e.target for e in self.entries))

    @property
    def schemes(self) -> list[str]:
        return list(dict.fromkeys(e.scheme for e in self.entries))

    def to_dict(self) -> dict[str, Any]:
        return {"version": SENSITIVITY_VERSION, "meta": self.meta,
                "entries": [{**asdict(e), "modules": list(e.modules)} for e in self.entries]}

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        d = read_json(path, "a sensitivity table (`lingbot-edge calibrate sensitivity`)")
        if d.get("version") != SENSITIVITY_VERSION:
            raise ValueError(f"{path}: sensitivity version {d.get('version')!r} not supported")
        return cls(tuple(SensitivityEntry(**{**e, "modules": tuple(e["modules"])}) for e in d["entries"]), d["meta"])


def sensitivity_targets(model: nn.Module, pattern: str = BLOCK_LINEARS, granularity: str = "module"
                        ) -> dict[str, tuple[str, ...]]:
    """Target name -> its Linears: each matching Linear, or the matching Linears of each block."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
    if granularity == "module":
        return {n: (n,) for n in names}
    if granularity != "block":
        raise ValueError(f"granularity: expected 'module' or 'block', got {granularity!r}")
    targets: dict[str, list[str]] = {}
    for n in names:
        m = re.match(r"(blocks\.\d+)\.", n)
        targets.setdefault(m.group(1) if m else n, []).append(n)
    return {t: tuple(ns) for t, ns in targets.items()}


def measure_sensitivity(
    evaluator: Evaluator,
    schemes: Sequence[str],
    targets: dict[str, tuple[str, ...]],
    *,
    out: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> Sensitivity:
    """Error of every (target, scheme) alone. `out`: saved after each target, resumed if present."""
    meta = json.loads(json.dumps({**(meta or {}), "schemes": list(schemes), "targets": list(targets)}))
    done: dict[tuple[str, str], SensitivityEntry] = {}
    if out is not None and Path(out).is_file():
        previous = Sensitivity.load(out)
        if previous.meta == meta:
            done = {(e.target, e.scheme): e for e in previous.entries}
            log.info("resuming %s: %d of %d measurements done", out, len(done), len(targets) * len(schemes))
        else:
            log.warning("%s: measured with other settings; starting over", out)
    model = evaluator.model
    entries = []
    with tqdm(targets.items(), desc="sensitivity", unit="target", disable=not progress) as bar:
        for target, modules in bar:
            bar.set_postfix_str(target)
            for name in schemes:
                if (target, name) in done:
                    entries.append(done[(target, name)])
                    continue
                scheme = get_scheme(name)
                err = evaluator.error(dict.fromkeys(modules, scheme))
                linears = [model.get_submodule(m) for m in modules]
                entries.append(SensitivityEntry(
                    target, tuple(modules), name, err.action_rms, err.action_cos, err.latent_sqnr,
                    sum(linear_deploy_bytes(lin, None) for lin in linears),
                    sum(linear_deploy_bytes(lin, scheme) for lin in linears),
                ))
            if out is not None:
                Sensitivity(tuple(entries), meta).save(out)
    return Sensitivity(tuple(entries), meta)
