"""Quantize a DiT in memory (`quantize_`) or a checkpoint folder (`quantize_checkpoint`), and count
its weight bytes per module group without building it (`plan_summary`, meta device only)."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lingbot_edge.core.config import ModelConfig
from lingbot_edge.core.model import WanVATransformer
from lingbot_edge.core.qlinear import QuantizedLinear, check_device_support, quantized_linears
from lingbot_edge.io.checkpoint import build_meta_model, load_transformer
from lingbot_edge.io.files import stage
from lingbot_edge.io.loading import checkpoint_folder
from lingbot_edge.io.quantized import build_quantized_skeleton, check_quantized_output, save_quantized, sha256_file

from .plan import QuantPlan, default_plan
from .schemes import Scheme, quantize_linear, scheme_name

log = logging.getLogger(__name__)

CalibrateFn = Callable[[nn.Module], None]
FilterFn = Callable[[nn.Module, str], bool]
DEFAULT_MAX_SHARD_BYTES = 4 << 30
CALIBRATION_MOMENTUM = 0.9  # quanto's Calibration default


def as_plan(config: Scheme | QuantPlan) -> QuantPlan:
    return config if isinstance(config, QuantPlan) else default_plan(config)


def plan_schemes(plan: QuantPlan) -> list[Scheme]:
    """Every scheme a plan can assign, in a stable order (for up-front hardware / calibration checks)."""
    found = [s for _, s in plan.rules] + list(plan.modules.values()) + [plan.default]
    return list(dict.fromkeys(s for s in found if s is not None))


def needs_calibration(scheme: Scheme) -> bool:
    return scheme.runtime_format().activation == "static"


def check_schemes_supported(schemes, device: str | torch.device) -> None:
    for scheme in schemes:
        check_device_support(scheme.runtime_format(), device, what=f"{scheme_name(scheme)}: {scheme.label}")


def quantize_(
    model: WanVATransformer,
    config: Scheme | QuantPlan,
    filter_fn: FilterFn | None = None,
    *,
    calibrate: CalibrateFn | None = None,
    input_scales: Mapping[str, float] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    check_hardware: bool = True,
) -> dict[str, Scheme]:
    """Swap the model's Linears for runtime `QuantizedLinear`s in place, torchao style.

    Args:
        model: the DiT, changed in place.
        config: a scheme (e.g. `SCHEMES["int8_weight_only"]`, applied by the default plan: the Linears
            inside the blocks) or a `QuantPlan` (a scheme per module pattern).
        filter_fn: `filter_fn(module, fqn)` further restricts which planned Linears are quantized.
        calibrate: `calibrate(model)` runs representative forwards (eagerly); needed by schemes with
            calibrated (static) activation scales unless `input_scales` are given.
        input_scales: FQN -> static activation scale (e.g. `calibration.json`'s `static_input_scales` from
            `lingbot-edge calibrate plan`); replaces `calibrate`.
        device: where the model will run (default: where it is); schemes it cannot run are refused before
            anything changes.
        progress: show a progress bar per block.
        check_hardware: False builds schemes anyway, to study their numerics where their kernel only runs
            as a slow reference (torch._scaled_mm on CPU).

    Returns:
        The scheme of every quantized Linear, by FQN.

    Raises:
        ValueError: the plan quantizes no Linear, or static activation scales have neither `calibrate` nor
            a complete `input_scales`.
        UnsupportedSchemeError: a scheme cannot run on `device` (with `check_hardware`).

    Example:
        from quantize import SCHEMES, quantize_
        from quantize.metrics import synthetic_calibration
        quantize_(model, SCHEMES["int8_weight_only"])  # the block Linears, int8 weights
        # or int8 weights and activations, with activation scales calibrated on a random-input episode:
        quantize_(model, SCHEMES["quanto_int8_a8"], calibrate=synthetic_calibration(cfg, chunks=2))
    """
    plan = as_plan(config)
    assignment = {name: s for name, s in plan.resolve(model).items() if s is not None}
    if filter_fn is not None:
        assignment = {name: s for name, s in assignment.items() if filter_fn(model.get_submodule(name), name)}
    if not assignment:
        raise ValueError("plan: quantizes no Linear of this model (every Linear is kept); a quantized checkpoint "
                         "of it would be the original in another format")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if check_hardware:
        check_schemes_supported(dict.fromkeys(assignment.values()), device)
    static = [name for name, s in assignment.items() if needs_calibration(s)]
    if static and input_scales is not None:
        if missing := sorted(set(static) - set(input_scales)):
            raise ValueError(f"input_scales: no static activation scale for {missing[:8]} (expected one per "
                             "static-activation Linear of the plan, as `lingbot-edge calibrate plan` writes them)")
    elif static and calibrate is None:
        names = sorted({scheme_name(assignment[n]) for n in static})
        raise ValueError(f"{', '.join(names)} quantize activations with calibrated scales: pass calibrate=fn(model) "
                         f"that runs representative forwards (e.g. quantize.metrics.synthetic_calibration) or "
                         f"input_scales from `lingbot-edge calibrate plan`")

    groups: dict[str, list[str]] = {}
    for name in assignment:
        m = re.match(r"blocks\.(\d+)\.", name)
        groups.setdefault(f"block {m.group(1)}" if m else "other", []).append(name)
    with tqdm(groups.items(), desc="quantize", unit="block", disable=not progress) as bar:
        for group, names in bar:
            bar.set_postfix_str(group)
            for name in names:
                model.set_submodule(name, quantize_linear(assignment[name], model.get_submodule(name)))
    if static and input_scales is not None:
        for name in static:
            model.get_submodule(name).input_scale.fill_(float(input_scales[name]))
    elif static:
        calibrate_input_scales(model, static, calibrate)
    log.info("quantized %d Linears (%s)", len(assignment),
             ", ".join(sorted({scheme_name(s) for s in assignment.values()})) or "none")
    return assignment


def calibrate_input_scales(model: nn.Module, names: list[str], calibrate: CalibrateFn,
                           momentum: float = CALIBRATION_MOMENTUM) -> None:
    """Set `input_scale` of the static-activation QuantizedLinears `names` the way quanto's
    Calibration does: per-tensor absmax / qmax of each input, averaged with `momentum` over calls
    (the first call sets it). The scale is updated before each forward, which then quantizes its
    input with it, as in quanto."""
    seen = dict.fromkeys(names, 0)

    def observer(name: str):
        def hook(module: QuantizedLinear, args):
            qmax = float(torch.finfo(module.weight_qdata.dtype).max if module.weight_qdata.is_floating_point()
                         else torch.iinfo(module.weight_qdata.dtype).max)
            new = args[0].detach().abs().amax().float().clamp(min=torch.finfo(torch.float32).eps) / qmax
            scale = module.input_scale
            scale.copy_(new if seen[name] == 0 else momentum * scale + (1 - momentum) * new)
            seen[name] += 1

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(observer(name)) for name in names]
    try:
        with torch.no_grad():
            calibrate(model)
    finally:
        for h in handles:
            h.remove()
    missed = [name for name, count in seen.items() if count == 0]
    if missed:
        raise RuntimeError(f"calibration never ran these Linears, their input scales are unset: {missed[:8]}")
    log.info("calibrated input scales of %d Linears (%d forwards each on average)", len(names),
             sum(seen.values()) // max(len(seen), 1))


# ----------------------------------------------------------------------------- checkpoints


def transformer_folder(checkpoint: str | Path) -> Path:
    """The `transformer/` folder of a checkpoint root (or an embedded checkpoint's name), or the folder itself (as
    load_transformer)."""
    folder = Path(checkpoint_folder(checkpoint))
    if (folder / "transformer").is_dir() and not (folder / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected upstream's transformer/ layout)")
    return folder


def checkpoint_sha256(folder: str | Path) -> str:
    """One hash of a transformer folder: sha256 over (file name, file sha256) of its config, index
    and safetensors files, in name order."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in (".json", ".safetensors")))
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def provenance(assignment: dict[str, Scheme]) -> dict[str, dict]:
    """The manifest's per-module record of what produced each QuantizedLinear (for save_quantized)."""
    return {name: {"scheme": scheme_name(s), "backend": s.backend, "spec": s.to_dict()}
            for name, s in assignment.items()}


@dataclass(frozen=True)
class QuantizeResult:
    folder: Path
    assignment: dict[str, Scheme]
    summary: list[SummaryRow]


def quantize_checkpoint(
    checkpoint: str | Path,
    config: Scheme | QuantPlan,
    out: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    calibrate: CalibrateFn | None = None,
    input_scales: Mapping[str, float] | None = None,
    progress: bool = True,
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
    replace: bool = False,
    source_sha256: str | None = None,
) -> QuantizeResult:
    """Load a `transformer/` checkpoint in `dtype` on `device`, quantize it (Linear by Linear, the
    high-precision weight of each is freed as its quantized module replaces it) and write a
    quantized checkpoint to `out` (atomically). `out` must be absent, empty or (with `replace`) a
    quantized checkpoint, and apart from the checkpoint (`check_quantized_output`): checked before
    anything is read. `source_sha256`: `checkpoint_sha256` of the source if already computed."""
    plan = as_plan(config)
    check_schemes_supported(plan_schemes(plan), device)  # before reading gigabytes
    src = transformer_folder(checkpoint)
    inputs = (Path(checkpoint), src)
    check_quantized_output(out, replace=replace, inputs=inputs)
    source = {"path": str(src.resolve()), "sha256": source_sha256 or checkpoint_sha256(src)}
    model = load_transformer(src, dtype=dtype, device=device)
    assignment = quantize_(model, plan, calibrate=calibrate, input_scales=input_scales, device=device,
                           progress=progress)
    stage("quantized")
    folder = save_quantized(model, out, provenance(assignment), source=source, max_shard_bytes=max_shard_bytes,
                            replace=replace, inputs=inputs)
    return QuantizeResult(folder, assignment, summarize(model.config, model, assignment, dtype))


# ----------------------------------------------------------------------------- byte counts


@dataclass(frozen=True)
class SummaryRow:
    group: str  # "blocks.*.attn1", "condition_embedder", ...
    linears: int
    kept_linears: int
    schemes: str
    params: int
    bytes_before: int
    bytes_after: int


def module_group(name: str) -> str:
    parts = name.split(".")
    return f"blocks.*.{parts[2]}" if parts[0] == "blocks" and len(parts) > 2 else parts[0]


def summarize(cfg: ModelConfig, quantized: nn.Module, assignment: dict[str, Scheme],
              dtype_before: torch.dtype = torch.bfloat16) -> list[SummaryRow]:
    """Weight bytes per module group: before (every parameter in `dtype_before`) and after (the
    quantized model's actual state dict: 8-bit data, fp32 scales, kept tensors). `quantized` may
    live on the meta device: only shapes and dtypes are read."""
    before_model = build_meta_model(cfg)
    rows: dict[str, dict] = {}

    def row(group: str) -> dict:
        return rows.setdefault(group, dict(linears=0, kept=0, schemes=set(), params=0, before=0, after=0))

    for name, m in before_model.named_modules():
        if isinstance(m, nn.Linear):
            r = row(module_group(name))
            r["linears"] += 1
            r["kept"] += name not in assignment
            r["schemes"].add(scheme_name(assignment[name]) if name in assignment else "keep")
    itemsize = torch.empty((), dtype=dtype_before).element_size()
    for name, p in before_model.named_parameters():
        r = row(module_group(name))
        r["params"] += p.numel()
        r["before"] += p.numel() * itemsize
    for name, t in quantized.state_dict().items():
        row(module_group(name))["after"] += t.numel() * t.element_size()
    return [SummaryRow(group, r["linears"], r["kept"], ", ".join(sorted(r["schemes"])) or "-", r["params"],
                       r["before"], r["after"]) for group, r in rows.items()]


def plan_summary(cfg: ModelConfig, config: Scheme | QuantPlan,
                 dtype: torch.dtype = torch.bfloat16) -> tuple[list[SummaryRow], dict[str, Scheme]]:
    """Dry run: the byte table of `config` applied to a model of `cfg`, on the meta device."""
    assignment = {n: s for n, s in as_plan(config).resolve(build_meta_model(cfg)).items() if s is not None}
    skeleton = build_quantized_skeleton(cfg, {n: s.runtime_format() for n, s in assignment.items()}, dtype)
    assert len(quantized_linears(skeleton)) == len(assignment)
    return summarize(cfg, skeleton, assignment, dtype), assignment


def format_summary(rows: list[SummaryRow], dtype_before: torch.dtype = torch.bfloat16) -> str:
    before_name = str(dtype_before).removeprefix("torch.")
    header = ("group", "Linears", "kept", "scheme", "params", f"{before_name} MB", "quantized MB", "ratio")
    lines = [header]
    for r in rows:
        lines.append((r.group, str(r.linears), str(r.kept_linears), r.schemes, f"{r.params:,}",
                      f"{r.bytes_before / 1e6:,.1f}", f"{r.bytes_after / 1e6:,.1f}", _ratio(r)))
    total = SummaryRow("total", sum(r.linears for r in rows), sum(r.kept_linears for r in rows), "",
                       sum(r.params for r in rows), sum(r.bytes_before for r in rows),
                       sum(r.bytes_after for r in rows))
    lines.append((total.group, str(total.linears), str(total.kept_linears), "", f"{total.params:,}",
                  f"{total.bytes_before / 1e6:,.1f}", f"{total.bytes_after / 1e6:,.1f}", _ratio(total)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        cells = [c.ljust(w) if j in (0, 3) else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths, strict=True))]
        if i == len(lines) - 1:
            out.append("  ".join("-" * w for w in widths))
        out.append("  ".join(cells).rstrip())
    out.append(f"weights: {total.bytes_before:,} bytes before, {total.bytes_after:,} bytes after "
               f"({total.bytes_after / 1e9:.3f} GB); quantized Linears: {total.linears - total.kept_linears}, "
               f"kept Linears: {total.kept_linears}")
    return "\n".join(out)


def _ratio(r: SummaryRow) -> str:
    return f"{r.bytes_after / r.bytes_before:.2f}" if r.bytes_before else "-"
