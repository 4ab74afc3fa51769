"""What fewer action steps save, measured side by side in one process: DiT forwards and CPU time per chunk.

    python -m train.distill_cost --teacher so100-grasp --teacher-steps 10,5,2,1 --student DIR [--student DIR]
        [--modes sync,grounded] [--episodes 2] [--rounds 2] [--threads 1] [--markdown F]

Every variant (the teacher at each step count, each student at its own) drives the same held-out grasp episodes
through the robot loop (`eval.sim.run_episode`), in interleaved rounds so a machine's load spreads over all of
them alike. Per chunk: the forwards the DiT ran (counted on the model) and the CPU time of the thread that ran the
chunk's job (its feedback, grounding and inference; thread CPU time, not wall time, so other processes on a shared
machine do not count), from the end of one inference to the end of the next. The table gives the median over the
steady-state chunks (the episode's first chunk has no feedback before it) and the ratio to the first variant.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from lingbot_edge.eval.sim import EVAL_SEED0, held_out_seeds, run_episode
from lingbot_edge.eval.task_success import checkpoint_loader
from lingbot_edge.flags import add_dtype_arg, add_threads_arg
from lingbot_edge.io.files import write_text
from lingbot_edge.io.loading import checkpoint_folder

log = logging.getLogger(__name__)


class ChunkMeter:
    """Counts a policy's DiT forwards and its thread CPU time, cut at every `infer` return."""

    def __init__(self, policy):
        self.forwards, self.cpu, self.chunks = 0, 0.0, []
        policy.model.register_forward_pre_hook(self._count)
        for name in ("infer", "feedback"):
            setattr(policy, name, self._timed(getattr(policy, name), cut=name == "infer"))

    def _count(self, module, args) -> None:
        self.forwards += 1

    def _timed(self, call, cut: bool):
        def run(*args, **kwargs):
            t = time.thread_time()
            try:
                return call(*args, **kwargs)
            finally:
                self.cpu += time.thread_time() - t
                if cut:
                    self.chunks.append((self.forwards, self.cpu * 1e3))
                    self.forwards, self.cpu = 0, 0.0
        return run

    def episode(self) -> list[tuple[int, float]]:
        """(forwards, CPU ms) of the chunks since the last call, the episode's first chunk dropped."""
        chunks, self.chunks = self.chunks[1:], []
        return chunks


def measure(variants: list[tuple[str, str, int]], modes: list[str], episodes: int, rounds: int,
            dtype: str = "bfloat16") -> list[dict]:
    """variants: (label, checkpoint, action steps). Returns one row per variant and mode."""
    meters = {}
    for label, checkpoint, steps in variants:
        for mode in modes:
            extra = {} if mode == "sync" else {"async_mode": mode}
            policy = checkpoint_loader(checkpoint, dtype)(sampler="static", action_num_inference_steps=steps, **extra)
            meters[label, mode] = (policy, ChunkMeter(policy), [])
    seeds = held_out_seeds(episodes, EVAL_SEED0)
    for r in range(rounds):
        for seed in seeds:
            for (_, mode), (policy, meter, chunks) in meters.items():
                run_episode(policy, seed, mode=mode)
                chunks += meter.episode()
        log.info("round %d of %d done", r + 1, rounds)
    rows = []
    for (label, mode), (policy, _, chunks) in meters.items():
        forwards = [f for f, _ in chunks]
        rows.append({"variant": label, "mode": mode, "action_steps": policy.cfg.action_num_inference_steps,
                     "forwards": int(np.median(forwards)), "forwards_min": min(forwards),
                     "forwards_max": max(forwards), "cpu_ms": float(np.median([ms for _, ms in chunks])),
                     "chunks": len(chunks)})
    for row in rows:
        first = next(r for r in rows if r["mode"] == row["mode"])
        row["ratio"] = row["cpu_ms"] / first["cpu_ms"]
    return rows


def format_table(rows: list[dict], episodes: int, rounds: int) -> str:
    lines = [f"| variant | loop | action steps | DiT forwards per chunk | CPU ms per chunk (median of "
             f"{rows[0]['chunks']} chunks: {episodes} episodes x {rounds} rounds) | CPU time vs the first row |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        span = "" if r["forwards_min"] == r["forwards_max"] else f" ({r['forwards_min']}-{r['forwards_max']})"
        lines.append(f"| {r['variant']} | {r['mode']} | {r['action_steps']} | {r['forwards']}{span} "
                     f"| {r['cpu_ms']:.1f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="so100-grasp")
    parser.add_argument("--teacher-steps", default="10,5,2,1", help="comma-separated action step counts")
    parser.add_argument("--student", action="append", default=[], help="a student checkpoint (at its own steps)")
    parser.add_argument("--modes", default="sync,grounded")
    parser.add_argument("--episodes", type=int, default=2, help="held-out seeds per round")
    parser.add_argument("--rounds", type=int, default=2)
    add_threads_arg(parser, 1)
    add_dtype_arg(parser, "bf16", allowed=("bf16", "fp32"))
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    variants = [(f"teacher {args.teacher} at {n}", args.teacher, int(n)) for n in args.teacher_steps.split(",") if n]
    for student in args.student:
        config = json.loads((Path(checkpoint_folder(student)) / "policy_config.json").read_text())
        steps = config["action_num_inference_steps"]
        variants.append((f"student {student}", student, steps))
    rows = measure(variants, [m for m in args.modes.split(",") if m], args.episodes, args.rounds, args.dtype)
    table = format_table(rows, args.episodes, args.rounds)
    print(table)
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2))
    if args.markdown:
        write_text(args.markdown, table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
