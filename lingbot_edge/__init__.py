"""lingbot-edge: the LingBot-VA policy in real time on one consumer GPU.

Cheap to import: heavy modules load on first attribute access.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "config",
    "PolicyConfig": "config",
    "get_policy_config": "config",
    "WanVATransformer": "model",
    "CacheMode": "kv_cache",
    "RingKVCache": "kv_cache",
    "ListKVCache": "kv_cache",
    "ReferenceSampler": "sampler",
    "StaticSampler": "sampler",
    "LingBotPolicy": "policy",
    "build_tiny_policy": "policy",
    "load_transformer": "checkpoint",
    "save_transformer": "checkpoint",
    "build_model": "checkpoint",
    "load_policy": "loading",
    "resolve_checkpoint": "loading",
    "CheckpointError": "loading",
    "save_tiny_checkpoint": "loading",
    "PromptCache": "prompt_cache",
    "load_quantized": "quantized",
    "save_quantized": "quantized",
    "QuantizedLinear": "quantized",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lingbot_edge' has no attribute {name!r}")
