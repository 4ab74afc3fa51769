"""Quantization of the LingBot-VA DiT (int8 / fp8 via torchao, optimum-quanto, bitsandbytes).

Import direction: `calib -> quantize -> lingbot_edge`. The runtime (`lingbot_edge`) never imports
this package; it owns the quantized checkpoint format and loader. Not implemented yet: see the
quantization issue.
"""
