"""Calibration: activation statistics, per-layer sensitivity and mixed-precision plans.

Import direction: `calib -> quantize -> lingbot_edge`. Not implemented yet: see the calibration issue.
"""
