"""lingbot-edge: the LingBot-VA policy in real time on one consumer GPU.

Cheap to import: heavy modules load on first attribute access.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "core.config",
    "PolicyConfig": "core.config",
    "get_policy_config": "core.config",
    "WanVATransformer": "core.model",
    "CacheMode": "core.kv_cache",
    "RingKVCache": "core.kv_cache",
    "ListKVCache": "core.kv_cache",
    "ReferenceSampler": "core.sampler",
    "StaticSampler": "core.sampler",
    "LingBotPolicy": "core.policy",
    "load_transformer": "io.checkpoint",
    "save_transformer": "io.checkpoint",
    "build_model": "io.checkpoint",
    "load_policy": "io.loading",
    "resolve_checkpoint": "io.loading",
    "CheckpointError": "io.loading",
    "PromptCache": "io.prompt_cache",
    "load_quantized": "io.quantized",
    "save_quantized": "io.quantized",
    "QuantizedLinear": "io.quantized",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lingbot_edge' has no attribute {name!r}")
