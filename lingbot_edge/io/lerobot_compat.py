"""What differs between the LeRobot releases lingbot-edge runs on: the one place that knows.

Tested: LeRobot 0.3.2 (the release that resolves next to torch 2.13; `make test-lerobot-0.3`) and 0.4.4 (the last
release for Python 3.11, torch < 2.11; `make test-lerobot`). Everything else in `lingbot_edge.lerobot`,
`lingbot_edge_lerobot` and `lingbot_edge.robot.arm` asks here instead of testing versions itself. Each
difference is named with the release that introduced it:

- 0.4.0, policy processors: LeRobot runs `select_action` between a pre-processor (rename, batch, device,
  normalize) and a post-processor pipeline made by `make_pre_post_processors`; a plugin provides
  `make_<type>_pre_post_processors` in the module of its config class (`has_processors`, `make_processors`).
- 0.4.0, plugin policies: the policy factory resolves a plugin's policy class and config from its registered
  config class; 0.3.x has hard-coded if-chains that must be taught the plugin (`factory_finds_plugins`).
- 0.4.0, entry points: the CLIs moved to `lerobot.scripts.lerobot_<name>` (0.3.x: `lerobot.scripts.eval`,
  `lerobot.record`, ...) (`script_module`).
- 0.4.0, `rollout` and `predict_action` take the policy processors, `rollout` also the env's from 0.4.2;
  `make_env` returns `{suite: {task id: vector env}}` (`rollout`, `predict_action`, `make_env`).
- 0.4.0, datasets: recorded as v3.0 (many episodes per file, `meta/stats.json` with q01..q99; 0.3.x: v2.1,
  per-episode stats without quantiles); `add_frame` takes the task inside the frame; `finalize()` must close
  the parquet writers (`dataset_version`, `add_frame`, `finalize_dataset`).
- 0.4.0, constants moved to `lerobot.utils.constants` (0.3.x: `lerobot.constants`) (`constants`).
- 0.4.3, the SO-100 follower moved to `lerobot.robots.so_follower` (0.3.x to 0.4.2: `lerobot.robots.so100_follower`)
  and its config defaults to `use_degrees=True` (`follower_module`; robot.arm sets it False).

LeRobot itself is imported lazily: importing this module needs nothing but the standard library.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from functools import cache
from typing import Any

TESTED = ("0.3.2", "0.4.4")  # the releases `make test-lerobot-0.3` / `make test-lerobot` run against
# Newest first: where the SO-100 follower lives (0.4.3 moved it; the class names stayed).
FOLLOWER_MODULES = ("lerobot.robots.so_follower", "lerobot.robots.so100_follower")

# The CLIs `lingbot-edge-lerobot NAME` runs, per layout.
_SCRIPTS_04 = {"eval": "lerobot.scripts.lerobot_eval", "record": "lerobot.scripts.lerobot_record",
               "replay": "lerobot.scripts.lerobot_replay", "teleoperate": "lerobot.scripts.lerobot_teleoperate",
               "train": "lerobot.scripts.lerobot_train"}
_SCRIPTS_03 = {"eval": "lerobot.scripts.eval", "record": "lerobot.record", "replay": "lerobot.replay",
               "teleoperate": "lerobot.teleoperate", "train": "lerobot.scripts.train"}
SCRIPT_NAMES = tuple(_SCRIPTS_04)


@cache
def version() -> tuple[int, ...]:
    """The installed LeRobot release as a tuple, e.g. (0, 4, 4); ImportError when it is not installed."""
    try:
        text = importlib.metadata.version("lerobot")
    except importlib.metadata.PackageNotFoundError as e:
        raise ImportError("LeRobot is not installed") from e
    parts = []
    for p in text.split("."):
        digits = "".join(c for c in p if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def version_string() -> str:
    return importlib.metadata.version("lerobot")


def at_least(*release: int) -> bool:
    return version() >= release


# ------------------------------------------------------------------------------------------------ 0.4.0


def has_processors() -> bool:
    """0.4.0: policies run between a pre- and a post-processor pipeline (`lerobot.processor`)."""
    return at_least(0, 4)


def factory_finds_plugins() -> bool:
    """0.4.0: `get_policy_class` / `make_policy_config` / `make_pre_post_processors` fall back to the registered
    config class (policy class `<Name>Policy` and `make_<type>_pre_post_processors` in the config's module)."""
    return at_least(0, 4)


def script_module(name: str) -> str:
    """The module of LeRobot's CLI `name` (eval, record, replay, teleoperate, train); other names pass through."""
    table = _SCRIPTS_04 if at_least(0, 4) else _SCRIPTS_03
    return table.get(name, name)


def dataset_version() -> str:
    """The `codebase_version` LeRobotDataset records: v3.0 from 0.4.0, v2.1 in 0.3.x."""
    return "v3.0" if at_least(0, 4) else "v2.1"


def constants() -> Any:
    """LeRobot's constants module (0.4.0: lerobot.utils.constants; 0.3.x: lerobot.constants)."""
    return importlib.import_module("lerobot.utils.constants" if at_least(0, 4) else "lerobot.constants")


def make_processors(policy_cfg: Any, pretrained_path: Any = None, dataset_stats: dict | None = None) -> tuple:
    """(preprocessor, postprocessor) as LeRobot's own tools build them (0.4.0); (identity, identity) before."""
    if not has_processors():
        return _identity, _identity
    from lerobot.policies.factory import make_pre_post_processors

    kwargs: dict[str, Any] = {"dataset_stats": dataset_stats} if dataset_stats is not None else {}
    return make_pre_post_processors(policy_cfg, pretrained_path=pretrained_path, **kwargs)


def _identity(x: Any) -> Any:
    return x


def make_env(env_cfg: Any, n_envs: int = 1) -> Any:
    """One vector env of `env_cfg` (0.4.0: `make_env` returns `{suite: {task id: env}}`; one task here)."""
    from lerobot.envs.factory import make_env as make

    envs = make(env_cfg, n_envs=n_envs)
    if isinstance(envs, dict):
        tasks = [env for suite in envs.values() for env in suite.values()]
        if len(tasks) != 1:
            raise ValueError(f"make_env: {len(tasks)} tasks; expected one")
        return tasks[0]
    return envs


def rollout(env: Any, policy: Any, env_cfg: Any, seeds: list[int] | None = None,
            return_observations: bool = False) -> dict:
    """LeRobot's eval `rollout` of `policy` on `env` with the processors `lerobot-eval` builds (0.4.0 added the
    policy's, 0.4.2 the env's)."""
    if not has_processors():
        from lerobot.scripts.eval import rollout as run

        return run(env, policy, seeds=seeds, return_observations=return_observations)
    from lerobot.scripts.lerobot_eval import rollout as run

    pre, post = make_processors(policy.config)
    if not at_least(0, 4, 2):
        return run(env, policy, pre, post, seeds=seeds, return_observations=return_observations)
    from lerobot.envs.factory import make_env_pre_post_processors

    env_pre, env_post = make_env_pre_post_processors(env_cfg=env_cfg, policy_cfg=policy.config)
    return run(env, policy, env_pre, env_post, pre, post, seeds=seeds, return_observations=return_observations)


def predict_action(frame: dict, policy: Any, device: Any, processors: tuple | None = None, *, task: str | None = None,
                   robot_type: str | None = None, use_amp: bool = False) -> Any:
    """`lerobot.utils.control_utils.predict_action`, the record loop's policy call (0.4.0 added the processors)."""
    from lerobot.utils.control_utils import predict_action as run

    if not has_processors():
        return run(frame, policy, device, use_amp, task=task, robot_type=robot_type)
    pre, post = processors if processors is not None else make_processors(policy.config)
    return run(frame, policy, device, pre, post, use_amp, task=task, robot_type=robot_type)


def add_frame(dataset: Any, frame: dict, task: str) -> None:
    """`LeRobotDataset.add_frame` (0.4.0: the task is a key of the frame; 0.3.x: an argument)."""
    if at_least(0, 4):
        dataset.add_frame({**frame, "task": task})
    else:
        dataset.add_frame(frame, task=task)


def finalize_dataset(dataset: Any) -> None:
    """Close a recorded dataset's writers (0.4.0: v3.0 parquet footers; nothing to do in 0.3.x)."""
    if hasattr(dataset, "finalize"):
        dataset.finalize()


def follower_module() -> Any:
    """The module holding `SO100Follower` / `SO100FollowerConfig` (0.4.3 moved it to `so_follower`)."""
    errors = []
    for name in FOLLOWER_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise ImportError("; ".join(errors))
