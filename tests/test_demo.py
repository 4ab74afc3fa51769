import re

from lingbot_edge.cli.main import main


def test_demo_prints_actions(capsys):
    assert main(["demo", "--chunks", "3"]) == 0
    out = capsys.readouterr().out
    heads = re.findall(r"chunk (\d+): (\d+) actions x (\d+) channels", out)
    assert heads == [("0", "4", "6"), ("1", "8", "6"), ("2", "8", "6")]
