"""The compiled sampler writes its KV cache in place: inductor's post-grad graph and generated code hold no
scatter into, copy of or temporary the size of a whole cache buffer, only in-place index writes. (A write
through a view of one [layers, ...] buffer compiles to slice / select scatters into a full-size copy plus a
copy back: at the libero shape ~25 GB of extra memory traffic per forward.)"""

from unittest import mock

import torch
import torch._inductor.compile_fx as compile_fx
from torch._inductor.utils import run_and_get_code

from lingbot_edge.core.config import MODEL_PRESETS, get_policy_config
from lingbot_edge.core.sampler import StaticSampler
from lingbot_edge.io.checkpoint import build_model

IN_PLACE_WRITES = {"aten.index_put_.default", "aten.index_copy_.default"}
VIEWS = {"aten.slice.Tensor", "aten.select.int", "aten.view.default", "aten.permute.default",
         "aten.transpose.int", "aten.expand.default", "aten.unsqueeze.default", "aten.reinterpret_tensor.default"}


def _cache_shapes(cfg) -> set[tuple[int, ...]]:
    """The shapes of a whole cache buffer, from the config: [rows, capacity, H, D] for every count of
    leading CFG rows, its attention layout [rows, H, capacity, D], and a stacked [layers, B, capacity, H, D]."""
    mc = MODEL_PRESETS[cfg.model]
    cap, heads, dim, batch = cfg.cache_capacity, mc.num_attention_heads, mc.attention_head_dim, cfg.cfg_batch
    shapes = {(mc.num_layers, batch, cap, heads, dim)}
    for rows in range(1, batch + 1):
        shapes |= {(rows, cap, heads, dim), (rows, heads, cap, dim)}
    return shapes


def test_compiled_cache_writes_are_in_place():
    # The action stream with two steps: a transient forward of the cond row alone (guidance off: a write to the
    # leading row) and the predicted forward of every row. Two graphs, the cheapest to compile.
    cfg = get_policy_config("tiny").replace(action_num_inference_steps=2)
    assert cfg.action_guidance_scale <= 1 < cfg.cfg_batch  # both write paths below
    model = build_model(MODEL_PRESETS[cfg.model], dtype=torch.float32, device="cpu", seed=0)
    sampler = StaticSampler(model, cfg, compile=True, compile_mode=None)
    text = torch.randn(1, cfg.max_sequence_length, model.config.text_dim)
    sampler.reset(text, text)

    graphs = []  # per compiled graph: (op, output shape) of every call in the final post-grad graph

    def post_grad_passes(gm, is_inference):
        original(gm, is_inference)
        graphs.append([(str(n.target), tuple(getattr(n.meta.get("val"), "shape", ()))) for n in gm.graph.nodes
                       if n.op == "call_function"])

    original = compile_fx.post_grad_passes
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True), \
            mock.patch.object(compile_fx, "post_grad_passes", post_grad_passes):
        _, codes = run_and_get_code(sampler.sample_actions, torch.randn(sampler.action_shape), 0)

    cache = _cache_shapes(cfg)
    assert len(graphs) == 2 and len(codes) == 2
    whole = [(op, shape) for graph in graphs for op, shape in graph if shape in cache]
    assert whole, "the graphs should write the cache"
    copies = [(op, shape) for op, shape in whole if op not in IN_PLACE_WRITES | VIEWS]
    assert copies == [], f"whole-cache scatters / copies in the post-grad graph: {copies}"
    assert {op for op, _ in whole} & IN_PLACE_WRITES
    temporaries = [f"empty_strided_cpu({shape}" for shape in cache]
    allocated = [t for code in codes for t in temporaries if t in code]
    assert allocated == [], f"cache-sized temporaries in the generated code: {allocated}"
