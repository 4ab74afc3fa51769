"""A policy with an owner thread: the episode driven from several caller threads (as the server's worker,
the control loop's worker and the LeRobot server's 4 gRPC workers do) runs every sampler step on the one
thread that also warmed it up, and gives the same chunks as the same policy called directly."""

import concurrent.futures
import itertools
import threading

import numpy as np
import pytest
import torch

from lingbot_edge.core.owner_thread import OwnerThread
from lingbot_edge.io.loading import load_policy
from lingbot_edge.testing.toy import toy_episode


class ManyCallers:
    """The episode protocol, each call made from the next of 4 caller threads, round robin."""

    def __init__(self, policy):
        self.policy = policy
        self.cfg = policy.cfg
        self.callers = [concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"caller{i}")
                        for i in range(4)]
        self.caller_threads = set()
        self._next = itertools.cycle(self.callers)

    def _call(self, fn, *args, **kwargs):
        def on_caller():
            self.caller_threads.add(threading.get_ident())
            return fn(*args, **kwargs)
        return next(self._next).submit(on_caller).result()

    def reset(self, prompt):
        return self._call(self.policy.reset, prompt=prompt)

    def infer(self, obs, ahead=False):
        return self._call(self.policy.infer, obs, ahead=ahead)

    def feedback(self, chunk):
        return self._call(self.policy.feedback, chunk)


def _tiny_policy():
    return load_policy("tiny", sampler="static", compile=False, device="cpu", dtype="fp32")


def test_every_policy_call_runs_on_the_owner_thread():
    direct = [c.actions for c in toy_episode(_tiny_policy(), 3, "stack the blocks")]

    policy = _tiny_policy()
    assert policy.owner is None  # uncompiled: no owner thread by default; a compiled policy gets one
    policy.owner = OwnerThread("lingbot-policy")
    step_threads = []
    step = policy.sampler.step

    def recording_step(*args):
        step_threads.append(threading.get_ident())
        return step(*args)

    policy.sampler.step = recording_step
    policy.warm_up()  # from the main thread
    warm_up_steps = len(step_threads)
    callers = ManyCallers(policy)
    threaded = [c.actions for c in toy_episode(callers, 3, "stack the blocks")]

    assert warm_up_steps > 0 and len(step_threads) > warm_up_steps
    assert set(step_threads) == {policy.owner.ident}
    assert len(callers.caller_threads) == 4 and policy.owner.ident not in callers.caller_threads | {
        threading.get_ident()}
    for a, b in zip(threaded, direct, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_owner_thread_raises_the_callers_error_and_keeps_serving():
    owner = OwnerThread("test-owner")
    with pytest.raises(ZeroDivisionError):
        owner.run(lambda: 1 / 0)
    assert owner.run(threading.get_ident) == owner.ident
    assert owner.run(lambda: owner.run(threading.get_ident)) == owner.ident  # a nested call runs in place
    assert torch.equal(owner.run(torch.ones, 2), torch.ones(2))
    owner.close()
