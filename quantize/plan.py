"""Quantization plans: which Linear gets which scheme, and which stay in high precision ("keep").

Resolution for each nn.Linear of the model, by fully qualified name (FQN):
1. `modules`: exact FQNs (what calibration writes: one entry per layer);
2. `rules`: (regex, scheme) pairs, the first `re.fullmatch` wins;
3. `default` (None = keep).

JSON form (`QuantPlan.from_json` / `to_json`); a scheme is a registered name, "keep", or an object
{"backend": "torchao" | "quanto" | "bitsandbytes", <fields of that backend's scheme>}:

    {
      "version": 1,
      "rules": [{"pattern": "blocks\\\\.\\\\d+\\\\.(attn1|attn2|ffn)\\\\..+", "scheme": "int8_weight_only"}],
      "modules": {"blocks.0.ffn.net.2": "keep", "blocks.29.attn1.to_q": {"backend": "torchao", "weight": "float8"}},
      "default": "keep",
      "provenance": {"checkpoint_sha256": "...", "dtype": "bfloat16", "smoothing_alpha": 0.5, "data": {...}}
    }

`provenance` (optional; `lingbot-edge calibrate plan` writes it) records what the plan was measured
on; `lingbot-edge quantize` refuses another checkpoint. A rule that matches no Linear is an error.

The default plan quantizes the Linears inside the blocks (attn1, attn2, ffn: ~98% of the weights)
and keeps embedders, modulation (`time_proj`) and output heads in high precision (docs/design.md
section 1). Keeping `patch_embedding_mlp` and `condition_embedder*.time_embedder.linear_1` also keeps
the biases `model.dtype` and the condition embedder read in a plain Linear (QuantizedLinear keeps its
bias in the compute dtype too, so quantizing them would still work).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lingbot_edge.io.files import read_json, write_json

from .schemes import Scheme, get_scheme, scheme_name

log = logging.getLogger(__name__)

KEEP = "keep"
PLAN_VERSION = 1
BLOCK_LINEARS = r"blocks\.\d+\.(attn1|attn2|ffn)\..+"


@dataclass(frozen=True)
class QuantPlan:
    rules: tuple[tuple[str, Scheme | None], ...] = ()
    modules: Mapping[str, Scheme | None] = field(default_factory=dict)
    default: Scheme | None = None
    # What the plan was measured on (`lingbot-edge calibrate plan`): checkpoint hash, dtype, smoothing,
    # calibration data; `lingbot-edge quantize` refuses a checkpoint it does not match.
    provenance: Mapping[str, Any] | None = None

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple((str(p), s) for p, s in self.rules))
        for pattern, _ in self.rules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"plan rule {pattern!r}: invalid regex ({e})") from e

    def resolve(self, model: nn.Module) -> dict[str, Scheme | None]:
        """Scheme (None = keep) of every nn.Linear of `model`, by FQN."""
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        unknown = sorted(set(self.modules) - set(linears))
        if unknown:
            raise ValueError(f"plan modules: not Linears of this model: {unknown[:8]}"
                             f"{'...' if len(unknown) > 8 else ''}")
        used = set()
        out = {}
        for name in linears:
            if name in self.modules:
                out[name] = self.modules[name]
                continue
            for pattern, scheme in self.rules:
                if re.fullmatch(pattern, name):
                    out[name] = scheme
                    used.add(pattern)
                    break
            else:
                out[name] = self.default
        for pattern, _ in self.rules:
            if not any(re.fullmatch(pattern, name) for name in linears):
                raise ValueError(f"plan rule {pattern!r} matches no Linear of this model (a typo? Linear names look "
                                 f"like {linears[len(linears) // 2]!r})")
            if pattern not in used:
                log.warning("plan rule %r is shadowed: every Linear it matches is decided before it", pattern)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {
            "version": PLAN_VERSION,
            "rules": [{"pattern": p, "scheme": _scheme_ref(s)} for p, s in self.rules],
            "modules": {name: _scheme_ref(s) for name, s in self.modules.items()},
            "default": _scheme_ref(self.default),
        }
        if self.provenance is not None:
            d["provenance"] = dict(self.provenance)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "plan") -> QuantPlan:
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: expected a JSON object with 'rules' / 'modules' / 'default'")
        unknown = set(d) - {"version", "rules", "modules", "default", "provenance"}
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}; expected version, rules, modules, default, "
                             "provenance")
        if not isinstance(d.get("provenance", {}), Mapping):
            raise ValueError(f"{source}: 'provenance' must be a JSON object (what `calibrate plan` measured)")
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise ValueError(f"{source}: plan version {d.get('version')!r} not supported (expected {PLAN_VERSION})")
        rules = []
        for i, rule in enumerate(d.get("rules", [])):
            if not isinstance(rule, Mapping) or set(rule) != {"pattern", "scheme"}:
                raise ValueError(f"{source}: rules[{i}]: expected {{'pattern': regex, 'scheme': ...}}, got {rule!r}")
            rules.append((rule["pattern"], _parse_ref(rule["scheme"], f"{source}: rules[{i}]")))
        modules = d.get("modules", {})
        if not isinstance(modules, Mapping):
            raise ValueError(f"{source}: 'modules' must map module names to schemes")
        return cls(
            rules=tuple(rules),
            modules={name: _parse_ref(s, f"{source}: modules[{name!r}]") for name, s in modules.items()},
            default=_parse_ref(d.get("default", KEEP), f"{source}: default"),
            provenance=d.get("provenance"),
        )

    def to_json(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> QuantPlan:
        return cls.from_dict(read_json(path, obj=False), source=str(path))


def default_plan(scheme: Scheme) -> QuantPlan:
    """`scheme` on every Linear inside the blocks; everything else kept."""
    return QuantPlan(rules=((BLOCK_LINEARS, scheme),))


def _scheme_ref(scheme: Scheme | None) -> str | dict[str, Any]:
    if scheme is None:
        return KEEP
    name = scheme_name(scheme)
    return name if name != scheme.label else scheme.to_dict()


def _parse_ref(ref: Any, source: str) -> Scheme | None:
    return None if ref == KEEP else get_scheme(ref, source, keep=True)
