"""lerobot: the LeRobot policy adapter (`--policy.type=lingbot_edge`); LeRobot itself is imported lazily."""
