import re

import imageio.v2 as imageio

from lingbot_edge.cli.main import main
from lingbot_edge.eval.grasp import EVAL_STEPS


def test_demo_reports_success_next_to_random_weights(capsys, tmp_path):
    video = tmp_path / "grasp.mp4"
    assert main(["demo", "--episodes", "2", "--video", str(video), "-q"]) == 0
    out = capsys.readouterr().out
    assert "policy so100-grasp: so100-tiny, 128x256 per camera (camera_top)" in out
    rows = re.findall(r"^  (policy|random weights) +success (\d)/2 \((\d+)%\), closest approach ([\d.]+) cm", out,
                      re.MULTILINE)
    assert [r[0] for r in rows] == ["policy", "random weights"]
    for _, k, pct, _ in rows:
        assert int(pct) == 50 * int(k)
    # The first episode as a video: one frame per executed action (124), cameras side by side.
    frames = imageio.mimread(video, memtest=False)
    assert len(frames) == EVAL_STEPS
