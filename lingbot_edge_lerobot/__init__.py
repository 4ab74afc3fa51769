"""LeRobot plugin: `--policy.discover_packages_path=lingbot_edge_lerobot` makes `--policy.type=lingbot_edge` work.

LeRobot 0.3.2's CLI (`lerobot.record`, `lerobot.scripts.eval`, ...) imports this package before
parsing its arguments. Importing it registers `LingBotEdgeConfig` under the config type
`lingbot_edge` and teaches LeRobot's hard-coded policy factory the `LingBotEdgePolicy` class.
"""

from lingbot_edge.lerobot.adapter import LingBotEdgeConfig, LingBotEdgePolicy, register_with_lerobot

register_with_lerobot()

__all__ = ["LingBotEdgeConfig", "LingBotEdgePolicy"]
