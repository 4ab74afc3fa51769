"""Offline training of the dual-stream LingBot-VA DiT on scripted SO-100 demonstrations.

The task itself (the kinematic SO-100 with a cube at a seeded random position, a grasp check and a success
test) is the runtime's `lingbot_edge.robot.grasp`, and its episode loop `lingbot_edge.eval.sim`: `lingbot-edge
demo` measures the embedded trained checkpoint on them.
- `train.expert`: a scripted reach-and-grasp expert (IK + a small state machine).
- `train.dataset`: episodes recorded in LeRobot's v2.1 dataset layout with `meta/stats.json` quantiles.
- `train.teacher`: the teacher-forced forward: one pass over a whole episode whose attention mask
  reproduces the inference KV-cache semantics (docs/design.md sections 2-3).
- `train.trainer`: flow matching on both streams, resumable atomic checkpoints, loss curve PNG, export
  in the released folder layout with `policy_config.json`.
- `train.evaluate`: task success of a checkpoint per 8-bit scheme and step setting
  (`lingbot_edge.eval.task_success`, shared with the ladder, the drift table and `calibrate plan
  --task-episodes`), next to the expert and random weights.
- `train.commands`: `lingbot-edge train {record,fit,eval}` (entry point `train.commands:register`).

Imports point one way: train -> quantize -> lingbot_edge (train does not import calib); the runtime never imports
train.
"""
