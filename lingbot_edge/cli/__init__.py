"""The `lingbot-edge` command line (runtime commands; `quantize` / `calibrate` come from entry points)."""

from lingbot_edge.cli.main import main

__all__ = ["main"]
