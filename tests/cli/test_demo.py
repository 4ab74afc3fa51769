import re

import imageio.v2 as imageio

from lingbot_edge.cli.main import main
from lingbot_edge.eval.sim import EVAL_STEPS, chunk_delay_ticks
from lingbot_edge.io.loading import load_policy


def test_demo_reports_success_next_to_random_weights(capsys, tmp_path):
    video = tmp_path / "grasp.mp4"
    assert main(["demo", "--episodes", "2", "--video", str(video), "-q"]) == 0
    out = capsys.readouterr().out
    assert "policy so100-grasp: so100-tiny, 128x256 per camera (camera_top)" in out
    rows = re.findall(r"^  (policy, sync|policy, grounded|random weights) +success (\d)/2 \((\d+)%\), held in "
                      r"([\d-]+) ticks \(median\), closest approach ([\d.]+) cm", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["policy, sync", "policy, grounded", "random weights"]
    for _, k, pct, _, _ in rows:
        assert int(pct) == 50 * int(k)
    # The first (synchronous) episode as a video: one frame per control tick, cameras side by side: the 124
    # executed actions plus the ticks the arm held while each of the 15 later chunks was inferred.
    frames = imageio.mimread(video, memtest=False)
    delay = chunk_delay_ticks(load_policy("so100-grasp", compile=False).cfg)
    assert len(frames) == EVAL_STEPS + 15 * (delay - 1)
