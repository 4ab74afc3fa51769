"""robot: SO-100 robots (kinematic sim, MuJoCo, LeRobot), the safety filter, the 30 Hz control loop."""
