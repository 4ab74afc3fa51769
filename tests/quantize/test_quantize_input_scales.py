"""Static activation scales from a calibration file replace the calibration episode."""

import pytest

from lingbot_edge.core.config import MODEL_PRESETS
from lingbot_edge.io.checkpoint import build_model
from quantize import SCHEMES, quantize_


def test_input_scales_are_applied_and_required():
    model = build_model(MODEL_PRESETS["tiny"])
    names = [n for n, _ in model.named_modules() if n.startswith("blocks.") and n.endswith(("to_q", "ffn.net.2"))]
    scales = {n: 0.01 * (i + 1) for i, n in enumerate(names)}
    only = set(names)
    quantize_(model, SCHEMES["quanto_int8_a8"], filter_fn=lambda m, fqn: fqn in only, input_scales=scales)
    for n, s in scales.items():
        assert float(model.get_submodule(n).input_scale) == pytest.approx(s)

    fresh = build_model(MODEL_PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"input_scales: no static activation scale for \['blocks"):
        quantize_(fresh, SCHEMES["quanto_int8_a8"], input_scales={names[0]: 0.1})
