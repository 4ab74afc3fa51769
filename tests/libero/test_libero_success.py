"""LIBERO success of the embedded `libero-tiny` policy, graded by LIBERO's own `check_success()`: the regression
test that fails when a quantization, sampler or action-path change breaks a LIBERO policy.

The policy plays libero_object tasks 3 and 5 (the tasks it was trained on) from three of the held-out benchmark
initial states its success is reported on, in bf16 and through `lingbot-edge quantize` int8 weight-only, and must
stay within MARGIN episodes of what the held-out evaluation recorded for those episodes when the checkpoint was
committed (bench/results/task_success/libero.md).
A deliberately broken action path (the gripper's sign flipped between the policy and the env) must fall below
that threshold: the check is shown to catch what it exists for.

Needs the `libero` extra and headless GL: `make test-libero`.
"""

import numpy as np
import pytest

from lingbot_edge.cli.main import main
from lingbot_edge.eval import libero
from lingbot_edge.io.loading import load_policy

pytestmark = pytest.mark.libero

SUITE, TASKS = "libero_object", (3, 5)
INIT_STATES = (20, 21, 22)
# Successes of these 6 episodes (tasks x INIT_STATES) in the held-out evaluation of libero-tiny
# (bench/results/task_success/libero.md: its bf16 sync and int8_weight_only rows).
RECORDED = {"bf16": 6, "int8_weight_only": 6}
MARGIN = 1  # episodes: the loop is deterministic on one machine; the margin absorbs another CPU's rounding


class FlippedGripper:
    """The env with the gripper command's sign flipped on the way in: a broken action path."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):
        return getattr(self._env, name)

    def step(self, action):
        action = np.array(action, np.float64)
        action[-1] = -action[-1]
        return self._env.step(action)


def successes(policy, wrap=lambda env: env) -> int:
    won = 0
    for task_id in TASKS:
        env = wrap(libero.LiberoEnv(SUITE, task_id))
        try:
            for state in INIT_STATES:
                out = libero.run_libero_episode(policy, env, state, libero.LIBERO_MAX_STEPS[SUITE], task_id)
                won += out.success
        finally:
            env.close()
    return won


@pytest.fixture(scope="module")
def requirements():
    missing = libero.missing_requirements(SUITE, "libero-tiny", device="cpu")
    if missing:
        pytest.fail("LIBERO is not usable here (run `make test-libero`):\n" + "\n".join(missing))


@pytest.fixture(scope="module")
def bf16_policy(requirements):
    return load_policy("libero-tiny", preset="libero", device="cpu", dtype="bf16", compile=False)


def test_bf16_success_holds(bf16_policy):
    won = successes(bf16_policy)
    print(f"\nlibero-tiny bf16: {won}/{len(TASKS) * len(INIT_STATES)} (recorded {RECORDED['bf16']})")
    assert won >= RECORDED["bf16"] - MARGIN


def test_int8_success_holds(requirements, tmp_path):
    out = tmp_path / "int8"
    assert main(["quantize", "--checkpoint", "libero-tiny", "--scheme", "int8_weight_only", "--device", "cpu",
                 "--out", str(out)]) == 0
    policy = load_policy("libero-tiny", preset="libero", device="cpu", dtype="bf16", compile=False, transformer=out)
    won = successes(policy)
    print(f"\nlibero-tiny int8 weight-only: {won}/{len(TASKS) * len(INIT_STATES)} "
          f"(recorded {RECORDED['int8_weight_only']})")
    assert won >= RECORDED["int8_weight_only"] - MARGIN


def test_flipped_gripper_fails_the_threshold(bf16_policy):
    won = successes(bf16_policy, FlippedGripper)
    print(f"\nlibero-tiny bf16, gripper sign flipped: {won}/{len(TASKS) * len(INIT_STATES)} (the check's threshold "
          f"{RECORDED['bf16'] - MARGIN})")
    assert won < RECORDED["bf16"] - MARGIN
