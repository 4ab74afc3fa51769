"""io: folders (released, LeRobot, user post-trained, quantized DiT) or "tiny" -> a policy.

`load_policy` is the one factory; checkpoints are checked from their headers before any weight is
read; device / dtype / compile defaults are decided in `lingbot_edge.io.loading` only.
"""
