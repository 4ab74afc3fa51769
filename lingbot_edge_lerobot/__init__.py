"""LeRobot plugin: importing it registers `--policy.type=lingbot_edge` with LeRobot (0.3.2 and 0.4.4 tested).

It registers `LingBotEdgeConfig` under the config type `lingbot_edge`; LeRobot 0.4 then finds `LingBotEdgePolicy`
and its processors by itself, LeRobot 0.3.2's hard-coded policy factory is taught them. LeRobot's own tools load it
with `--policy.discover_packages_path=lingbot_edge_lerobot` (`lerobot-eval ...` with LeRobot 0.4.4); the
`lingbot-edge-lerobot` console script (see `__main__`) imports it before running LeRobot's CLI, which LeRobot 0.3.2
next to CPU torch needs.
"""

from lingbot_edge.lerobot.adapter import LingBotEdgeConfig, LingBotEdgePolicy, register_with_lerobot

register_with_lerobot()

__all__ = ["LingBotEdgeConfig", "LingBotEdgePolicy"]
