"""LeRobot dataset metadata: action bounds for the policy's quantiles, and the action names' order.

Layouts (`meta/info.json` `codebase_version`):

- v2.0: `meta/stats.json` (`{"action": {"min", "max", "mean", "std"[, "q01", "q99"]}}`).
- v2.1 (what LeRobot 0.3.2 records): no `stats.json`; `meta/episodes_stats.jsonl`, one line per
  episode `{"episode_index", "stats": {"action": {"min", "max", "mean", "std", "count"}}}`, aggregated
  here: min of the minima, max of the maxima; per-episode q01/q99 (if any) as the count-weighted mean.
- v3.0 (what LeRobot 0.4 records): `meta/stats.json` aggregated over the dataset, with q01..q99 quantiles
  (per-episode stats live in parquet files).

q01 / q99 are used where present; else min / max with a warning naming the fallback (outliers then
stretch the range). `info.json` `features.action.names` is checked against the robot's motor order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lingbot_edge.io.files import read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActionStats:
    """Per-channel bounds of a dataset's action feature."""

    path: Path  # the file the bounds came from
    version: str  # codebase_version, or "?" without info.json
    low: tuple[float, ...]
    high: tuple[float, ...]
    bounds: str  # "q01/q99" or "min/max"
    names: tuple[str, ...] | None  # info.json features.<key>.names, flattened


def _meta_dir(path: Path) -> Path:
    if path.is_file():
        return path.parent
    if (path / "meta").is_dir():
        return path / "meta"
    if path.is_dir() and ((path / "info.json").exists() or (path / "stats.json").exists()
                          or (path / "episodes_stats.jsonl").exists()):
        return path
    raise ValueError(f"{path}: not a LeRobot dataset (expected its root with meta/, the meta/ folder, or "
                     "meta/stats.json / meta/episodes_stats.jsonl)")


def _names(info: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    names = info.get("features", {}).get(key, {}).get("names")
    if isinstance(names, Mapping):  # older datasets: {"motors": [...]}
        names = next(iter(names.values()), None) if len(names) == 1 else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return tuple(names)


def _bounds(entry: Mapping[str, Any], where: str, key: str) -> tuple[Any, Any, str]:
    if "q01" in entry and "q99" in entry:
        return entry["q01"], entry["q99"], "q01/q99"
    if "min" in entry and "max" in entry:
        return entry["min"], entry["max"], "min/max"
    raise ValueError(f"{where}: {key!r} has neither q01/q99 nor min/max (has {sorted(entry)})")


def _aggregate_episodes(path: Path, key: str) -> tuple[np.ndarray, np.ndarray, str]:
    lows, highs, counts, kinds = [], [], [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            stats = json.loads(line)["stats"][key]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected {{'stats': {{{key!r}: {{...}}}}}} per line ({e!r})") from e
        lo, hi, kind = _bounds(stats, f"{path}:{n}", key)
        lows.append(np.asarray(lo, np.float64).reshape(-1))
        highs.append(np.asarray(hi, np.float64).reshape(-1))
        counts.append(float(np.asarray(stats.get("count", 1)).reshape(-1)[0]))
        kinds.add(kind)
    if not lows:
        raise ValueError(f"{path}: no episode stats")
    if len({a.shape for a in lows + highs}) != 1:
        raise ValueError(f"{path}: episodes disagree on the size of {key!r}")
    if kinds == {"q01/q99"}:  # quantiles do not aggregate exactly: the count-weighted mean is close
        w = np.asarray(counts) / sum(counts)
        return (w[:, None] * np.stack(lows)).sum(0), (w[:, None] * np.stack(highs)).sum(0), "q01/q99"
    if "q01/q99" in kinds:
        raise ValueError(f"{path}: some episodes have q01/q99 for {key!r}, others only min/max")
    return np.stack(lows).min(0), np.stack(highs).max(0), "min/max"


def read_action_stats(path: str | Path, key: str = "action") -> ActionStats:
    """Bounds of `key` from a LeRobot dataset (v2.0 / v2.1 / v3.0): its root, its meta/ folder or the file."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such dataset (expected a LeRobot dataset root or its meta/stats.json)")
    meta = _meta_dir(p)
    info = read_json(meta / "info.json", "LeRobot dataset info") if (meta / "info.json").exists() else {}
    version = str(info.get("codebase_version", "?"))
    stats_file, episodes_file = meta / "stats.json", meta / "episodes_stats.jsonl"
    if p.is_file():
        stats_file, episodes_file = (p, None) if p.suffix == ".json" else (None, p)
    if stats_file is not None and stats_file.exists():
        stats = read_json(stats_file, obj=False)
        if not isinstance(stats, dict) or not isinstance(stats.get(key), dict):
            keys = sorted(stats) if isinstance(stats, dict) else "?"
            raise ValueError(f"{stats_file}: no {key!r} entry (keys: {keys})")
        lo, hi, kind = _bounds(stats[key], str(stats_file), key)
        lo, hi, src = np.asarray(lo, np.float64).reshape(-1), np.asarray(hi, np.float64).reshape(-1), stats_file
    elif episodes_file is not None and episodes_file.exists():
        lo, hi, kind = _aggregate_episodes(episodes_file, key)
        src = episodes_file
    else:
        raise ValueError(f"{meta}: no stats.json (v2.0 / v3.0) and no episodes_stats.jsonl (v2.1) "
                         f"(codebase_version {version})")
    if lo.shape != hi.shape or not (np.isfinite(lo).all() and np.isfinite(hi).all()) or (hi < lo).any():
        raise ValueError(f"{src}: {key!r} bounds must be finite, equal-length, high >= low; got {lo.tolist()} / "
                         f"{hi.tolist()}")
    if kind == "min/max":
        log.warning("%s: %r has no q01/q99 quantiles; falling back to min/max (outliers stretch the range; "
                    "recompute the stats with a recent LeRobot for outlier-robust bounds)", src, key)
    return ActionStats(src, version, tuple(lo.tolist()), tuple(hi.tolist()), kind, _names(info, key))


def _motor(name: str) -> str:
    """`shoulder_pan.pos` / `main_shoulder_pan` -> `shoulder_pan` (LeRobot 0.3 / older dataset names)."""
    return name.removesuffix(".pos").removeprefix("main_")


def check_action_names(stats: ActionStats, motors: Sequence[str]) -> None:
    """The dataset's action names must be the robot's motors in the robot's order."""
    if stats.names is None:
        log.warning("%s: info.json has no action names; assuming the robot's motor order %s", stats.path,
                    list(motors))
        return
    got = [_motor(n) for n in stats.names]
    if got != [_motor(m) for m in motors]:
        raise ValueError(f"{stats.path.parent / 'info.json'}: the dataset's action names {list(stats.names)} are "
                         f"not the robot's motor order {list(motors)}")


def load_action_quantiles(path: str | Path, motors: Sequence[str], key: str = "action"
                          ) -> tuple[list[float], list[float]]:
    """(q01, q99) of the robot's action channels from a LeRobot dataset, names and size checked."""
    stats = read_action_stats(path, key)
    if len(stats.low) != len(motors):
        raise ValueError(f"{stats.path}: {key!r} has {len(stats.low)} values, expected {len(motors)} (one per motor "
                         f"{list(motors)})")
    check_action_names(stats, motors)
    return list(stats.low), list(stats.high)


def quantile_overrides(cfg, q01: Sequence[float], q99: Sequence[float]) -> dict[str, tuple[float, ...]]:
    """PolicyConfig overrides placing the used channels' (q01, q99) in the model's action space."""
    used = cfg.used_action_channel_ids
    if len(q01) != len(used) or len(q99) != len(used):
        raise ValueError(f"q01/q99: expected {len(used)} values each (used_action_channel_ids {list(used)}), got "
                         f"{len(q01)}/{len(q99)}")
    lo, hi = list(cfg.action_q01), list(cfg.action_q99)
    for i, ch in enumerate(used):
        lo[ch], hi[ch] = float(q01[i]), float(q99[i])
    return {"action_q01": tuple(lo), "action_q99": tuple(hi)}
