import re

from lingbot_edge.cli.main import main


def test_demo_prints_actions(capsys):
    assert main(["demo", "--chunks", "3"]) == 0
    out = capsys.readouterr().out
    heads = re.findall(r"chunk (\d+): (\d+) actions x (\d+) joints, (\d+) keyframes", out)
    # The embedded tiny model on the simulated SO-100 (F=2, apf=4): the first chunk drops frame 0's steps.
    assert heads == [("0", "4", "6", "4"), ("1", "8", "6", "8"), ("2", "8", "6", "8")]
