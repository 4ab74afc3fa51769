"""Run a LeRobot CLI with lingbot-edge registered: `python -m lingbot_edge_lerobot eval|record|<module> [args]`.

    python -m lingbot_edge_lerobot eval --env.type=... --policy.type=lingbot_edge --eval.batch_size=1
    python -m lingbot_edge_lerobot record --robot.type=so100_follower ... --policy.type=lingbot_edge

Same arguments as `python -m lerobot.scripts.eval` / `python -m lerobot.record`. Two reasons to go
through here: the policy is registered before LeRobot parses its arguments (no
`--policy.discover_packages_path` needed), and in an environment where torchvision is a CUDA build
next to CPU torch (what pip resolves for lerobot 0.3.2 with torch 2.13 CPU) LeRobot's own entry
points die importing torchvision before any plugin can load; this one makes it importable first.
"""

import runpy
import sys

ALIASES = {
    "eval": "lerobot.scripts.eval",
    "record": "lerobot.record",
    "replay": "lerobot.replay",
    "teleoperate": "lerobot.teleoperate",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(ALIASES)} (or any module name, e.g. lerobot.scripts.eval)")
        return 0 if argv else 2
    module = ALIASES.get(argv[0], argv[0])
    import lingbot_edge_lerobot  # noqa: F401  (torchvision fix, registration; already done under -m)

    sys.argv = [module, *argv[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
