"""Every implementation of `core.protocols` has every member the callers rely on (no capability probes)."""

from __future__ import annotations

import inspect

import pytest

from lingbot_edge.core.policy import LingBotPolicy, PromptMemo
from lingbot_edge.core.protocols import ObservationEncoder, Policy, PromptEncoder
from lingbot_edge.io.loading import load_policy


def members(protocol: type) -> set[str]:
    """The attributes and methods a protocol declares (its own, not `object`'s or `Protocol`'s)."""
    own = vars(protocol)
    return set(own.get("__annotations__", {})) | {
        n for n, v in own.items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}


def test_protocol_members():
    assert members(Policy) == {"cfg", "supports_lookahead", "takes_executing_keyframes", "reset", "infer", "feedback",
                               "cancel"}
    assert members(PromptEncoder) == {"memory_report", "encode_pair"}
    assert members(ObservationEncoder) == {"latent_hw", "reset", "encode"}


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny", device="cpu", compile=False)


def test_local_policy_and_its_encoders_implement_the_protocols(tiny):
    for obj, protocol in ((tiny, Policy), (tiny.prompt_encoder, PromptEncoder), (tiny.obs_encoder, ObservationEncoder),
                          (PromptMemo(tiny.prompt_encoder), PromptEncoder)):
        missing = sorted(n for n in members(protocol) if not hasattr(obj, n))
        assert not missing, f"{type(obj).__name__} lacks {missing} of {protocol.__name__}"
    assert LingBotPolicy.supports_lookahead is True
    tiny.cancel()  # nothing to interrupt locally


def test_infer_signatures_match_the_protocol():
    want = list(inspect.signature(Policy.infer).parameters)
    assert list(inspect.signature(LingBotPolicy.infer).parameters) == want
    from lingbot_edge.serve.client import RemotePolicy

    assert list(inspect.signature(RemotePolicy.infer).parameters) == want
    for name in ("reset", "feedback", "cancel"):
        assert callable(getattr(RemotePolicy, name))


def test_prompt_memo_encodes_each_prompt_once(tiny):
    calls = []

    class Counting:
        def encode_pair(self, prompt, use_cfg):
            calls.append((prompt, use_cfg))
            return tiny.prompt_encoder.encode_pair(prompt, use_cfg)

    memo = PromptMemo(Counting())
    a = memo.encode_pair("pick", False)
    b = memo.encode_pair("pick", False)
    memo.encode_pair("place", False)
    assert a is b and calls == [("pick", False), ("place", False)] and memo.memory_report is None
