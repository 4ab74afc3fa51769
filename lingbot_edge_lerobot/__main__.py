"""Run a LeRobot CLI with lingbot-edge registered: `lingbot-edge-lerobot eval|record|<module> [args]`.

    lingbot-edge-lerobot eval --env.type=pusht --policy.type=lingbot_edge --policy.checkpoint=tiny \\
        --policy.device=cpu --eval.batch_size=1 --eval.n_episodes=1
    lingbot-edge-lerobot record --robot.type=so100_follower ... --policy.type=lingbot_edge \\
        --policy.checkpoint=/ckpt/lingbot-va-so100
    python -m lingbot_edge_lerobot eval ...      # the same

Same arguments as LeRobot's `lerobot-eval` / `lerobot-record`; the names map to the installed release's modules
(`lerobot.scripts.lerobot_eval` in 0.4, `lerobot.scripts.eval` in 0.3.2). Why go through here: with the CUDA
torchvision that pip resolves for LeRobot 0.3.2 next to CPU torch 2.13, LeRobot's own entry points die importing
torchvision (`operator torchvision::nms does not exist`) before `--policy.discover_packages_path` can load any
plugin; this one makes torchvision importable first and registers `--policy.type=lingbot_edge` before LeRobot
parses its arguments. With LeRobot 0.4.4 (torch 2.9.1 + torchvision 0.24.1) LeRobot's own entry point works:
`lerobot-eval --policy.discover_packages_path=lingbot_edge_lerobot --policy.type=lingbot_edge ...`.
"""

import runpy
import sys


def main(argv: list[str] | None = None) -> int:
    from lingbot_edge.io import lerobot_compat as compat

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(compat.SCRIPT_NAMES)} (or any module name, e.g. lerobot.scripts.lerobot_eval); "
              "policy-server: ours for LeRobot 0.4's async robot client")
        return 0 if argv else 2
    if argv[0] == "policy-server":  # ours, for LeRobot 0.4's async robot client (lingbot_edge.lerobot.async_server)
        from lingbot_edge.lerobot.async_server import main as serve

        return serve(argv[1:])
    import lingbot_edge_lerobot  # noqa: F401  (torchvision fix, registration; already done under -m)

    module = compat.script_module(argv[0])
    sys.argv = [module, *argv[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
