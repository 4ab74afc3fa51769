"""Capture: run calibration episodes through the model and accumulate activation statistics.

The statistics file is rewritten atomically after every episode with the ids of the episodes it
covers; a capture started again on the same file skips them, so a stopped run continues where it
stopped and ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lingbot_edge.core.config import PolicyConfig
from lingbot_edge.core.sampler import StaticSampler
from lingbot_edge.io.episodes import EpisodeSource
from quantize.metrics import run_episode

from .stats import DEFAULT_BUCKET_EDGES, ActivationStats, recording

log = logging.getLogger(__name__)


def capture_meta(model: nn.Module, cfg: PolicyConfig, source: EpisodeSource, pattern: str | None) -> dict[str, Any]:
    """What a statistics file describes; a resumed capture must match it."""
    meta = {"model_config": model.config.to_dict(), "policy": cfg.name,
            "steps": [cfg.num_inference_steps, cfg.action_num_inference_steps], "modules": pattern,
            "data": source.describe()}
    return json.loads(json.dumps(meta, sort_keys=True))  # as it reads back from a file


def capture(
    model: nn.Module,
    cfg: PolicyConfig,
    source: EpisodeSource,
    out: str | Path | None = None,
    *,
    pattern: str | None = None,
    bucket_edges=DEFAULT_BUCKET_EDGES,
    resume: bool = True,
    progress: bool = False,
) -> ActivationStats:
    """Statistics of the inputs of `model`'s Linears (names fully matching `pattern`; default all)
    over every episode of `source`, run eagerly through the static sampler.

    `out`: the statistics file, saved atomically after each episode; with `resume`, episodes it
    already covers are skipped (its capture settings must match)."""
    meta = capture_meta(model, cfg, source, pattern)
    stats = ActivationStats(bucket_edges, meta)
    if out is not None and resume and Path(out).is_file():
        stats = ActivationStats.load(out)
        if stats.meta != meta or stats.bucket_edges != tuple(float(e) for e in bucket_edges):
            raise ValueError(f"{out}: captured with other settings (model, preset, steps, modules, data or buckets); "
                             f"use a new file or resume=False")
        log.info("resuming %s: %d episodes already captured", out, len(stats.episodes))
    todo = [e for e in source.episode_ids() if e not in set(stats.episodes)]
    sampler = StaticSampler(model, cfg, compile=False)
    with tqdm(todo, desc="capture", unit="episode", disable=not progress) as bar, torch.no_grad():
        for episode_id in bar:
            bar.set_postfix_str(episode_id)
            episode = source.load(episode_id)
            with recording(model, stats, pattern):
                run_episode(model, cfg, episode, sampler=sampler)
            stats.episodes.append(episode_id)
            if out is not None:
                stats.save(out)
    return stats
