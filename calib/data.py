"""Calibration episodes: where the inputs of the calibration runs come from.

`lingbot_edge.io.episodes` reads recordings and LeRobot datasets (`RecordedEpisodes`, `LeRobotEpisodes`);
this module adds random-input episodes for tests (`SyntheticEpisodes`) and `open_source`, which picks the
source of a `calibrate` command's paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lingbot_edge.core.config import PolicyConfig
from lingbot_edge.io.episodes import Episode, EpisodeSource, LeRobotEpisodes, RecordedEpisodes
from quantize.metrics import make_episode

# ----------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class SyntheticEpisodes:
    """`count` random-input episodes of `chunks` chunks (quantize.metrics.make_episode, seeds seed..)."""

    cfg: PolicyConfig
    count: int
    chunks: int = 2
    seed: int = 0

    def episode_ids(self) -> list[str]:
        return [f"synthetic-{self.seed + i}" for i in range(self.count)]

    def load(self, episode_id: str) -> Episode:
        return make_episode(self.cfg, self.chunks, seed=int(episode_id.removeprefix("synthetic-")))

    def describe(self) -> dict[str, Any]:
        # How episodes are made, not how many: a capture may be extended with more episodes.
        return {"source": "synthetic", "chunks": self.chunks, "seed": self.seed}


def open_source(paths: Sequence[str | Path], policy, max_chunks: int | None = None,
                max_episodes: int | None = None, camera_map: Mapping[str, str] | None = None) -> EpisodeSource:
    """A LeRobot dataset root (has meta/info.json), or `.npz` recordings / folders of them."""
    if len(paths) == 1 and (Path(paths[0]) / "meta" / "info.json").is_file():
        return LeRobotEpisodes(Path(paths[0]), policy, camera_map=dict(camera_map or {}), max_chunks=max_chunks,
                               max_episodes=max_episodes)
    source = RecordedEpisodes.from_paths(paths, policy, max_chunks=max_chunks)
    if max_episodes is not None:
        source = RecordedEpisodes(source.paths[:max_episodes], policy, max_chunks, source.seed)
    return source
