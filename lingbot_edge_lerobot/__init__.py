"""LeRobot plugin: importing it registers `--policy.type=lingbot_edge` with LeRobot 0.3.2.

It registers `LingBotEdgeConfig` under the config type `lingbot_edge` and teaches LeRobot's hard-coded
policy factory the `LingBotEdgePolicy` class. Use it through the `lingbot-edge-lerobot` console script
(`lingbot-edge-lerobot eval|record ...`, see `__main__`). Where torchvision imports cleanly (a CUDA torch
install), LeRobot's own `lerobot-eval --policy.discover_packages_path=lingbot_edge_lerobot ...` works too.
"""

from lingbot_edge.lerobot.adapter import LingBotEdgeConfig, LingBotEdgePolicy, register_with_lerobot

register_with_lerobot()

__all__ = ["LingBotEdgeConfig", "LingBotEdgePolicy"]
