"""`eval.sim.run_episode` quiets the control loop's expected holds for its own thread only: the logger's level and
filters are as they were afterwards, and another thread's records still pass while an episode runs."""

from __future__ import annotations

import logging
import threading

from lingbot_edge.eval.sim import _ThisThreadBelow, run_episode
from lingbot_edge.io.loading import load_policy
from lingbot_edge.robot.control import AsyncController


def test_run_episode_leaves_the_control_logger_as_it_was():
    log = logging.getLogger(AsyncController.__module__)
    before = (log.level, list(log.filters))
    policy = load_policy("so100-grasp", preset="so100", device="cpu", compile=False, prompt_cache_dir=False)
    episode = run_episode(policy, 100_000, steps=12)
    assert episode["steps"] == 12
    assert (log.level, list(log.filters)) == before


def test_the_filter_drops_only_this_threads_records_below_its_level():
    quiet = _ThisThreadBelow(logging.ERROR)

    def record(level: int) -> logging.LogRecord:
        return logging.LogRecord("x", level, __file__, 1, "m", None, None)

    assert not quiet.filter(record(logging.WARNING)) and quiet.filter(record(logging.ERROR))
    seen = []
    other = threading.Thread(target=lambda: seen.append(quiet.filter(record(logging.WARNING))))
    other.start()
    other.join()
    assert seen == [True]
