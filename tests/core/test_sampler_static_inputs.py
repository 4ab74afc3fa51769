"""Under CUDA graphs every tensor the compiled step reads at a static address must keep that address:
cudagraph trees record a graph again for each new address of a static input (and, past a limit, fall back
to no graphs). Rehearsed on the CPU: the sampler set up for CUDA graphs, its step compiled by dynamo with a
backend that records, call by call, the addresses of the inputs marked static (what inductor's cudagraph
trees key their recordings on)."""

import torch

from lingbot_edge.core.config import MODEL_PRESETS, get_policy_config
from lingbot_edge.core.sampler import CUDA_GRAPHS_MODE, StaticSampler
from lingbot_edge.io.checkpoint import build_model


def test_static_inputs_keep_their_addresses_over_an_episode():
    cfg = get_policy_config("tiny")
    model = build_model(MODEL_PRESETS[cfg.model], dtype=torch.float32, device="cpu", seed=0)
    sampler = StaticSampler(model, cfg, compile=True, compile_mode=CUDA_GRAPHS_MODE)  # marks static addresses
    calls: dict[int, list[tuple[int, ...]]] = {}  # graph -> per call, the static inputs' addresses

    def recording_backend(gm, example_inputs):
        graph = len(calls)
        calls[graph] = []

        def run(*args):
            calls[graph].append(tuple(a.data_ptr() for a in args if isinstance(a, torch.Tensor)
                                      and hasattr(a, "_dynamo_static_input_type")))
            return gm(*args)
        return run

    torch._dynamo.reset()
    sampler.step = torch.compile(sampler._step, backend=recording_backend, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, cfg.max_sequence_length, model.config.text_dim, generator=g)
    sampler.reset(text, torch.randn(text.shape, generator=g))
    first = torch.randn(*sampler.latent_shape[:2], 1, *sampler.latent_shape[3:], generator=g)
    for i in range(3):  # the first chunk (pinned frame), the steady state, history writes, a lookahead pass
        out = sampler.sample_chunk(torch.randn(sampler.latent_shape, generator=g),
                                   torch.randn(sampler.action_shape, generator=g), first if i == 0 else None)
        sampler.feedback(out.latents, out.actions)
    sampler.sample_actions(torch.randn(sampler.action_shape, generator=g), frame_shift=cfg.frame_chunk_size)

    # video (every row), action transient (cond row), action with every row: one graph each
    assert len(calls) == len(sampler.graph_keys()) == 3
    video, action = len(sampler.schedules[False]), len(sampler.schedules[True])  # forwards per stream
    assert sum(len(c) for c in calls.values()) == 3 * (video + action + 2) + action
    for graph, addresses in calls.items():
        assert len(addresses[0]) > 0, f"graph {graph}: no input marked static"
        assert len(set(addresses)) == 1, f"graph {graph}: {len(set(addresses))} sets of static addresses " \
                                         f"over {len(addresses)} calls (one CUDA-graph recording each)"
