"""core: the math. Config, the DiT, the KV caches, the samplers, the schedulers, the policy.

Never opens a file, never imports a robot, a server or an offline tool: the policy receives its
model, observation encoder and prompt encoder (built by `lingbot_edge.io.load_policy`).
"""
