"""One flag vocabulary (`lingbot_edge.flags`): every command of `lingbot-edge` spells dtypes, devices, seeds, threads
and the policy flags the same way, and a dtype flag takes the short and the long names alike."""

from __future__ import annotations

import argparse

import pytest

from lingbot_edge.cli.main import build_parser
from lingbot_edge.flags import DTYPE_SPELLINGS, LONG_NAMES, add_policy_args, dtype_type, policy_kwargs


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, its parser) of every leaf command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _commands(child, (*path, name))


COMMANDS = dict(_commands(build_parser()))


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_the_walk_finds_the_runtime_and_the_offline_commands():
    for command in [("demo",), ("quantize",), ("calibrate", "plan"), ("train", "fit"), ("train", "eval"),
                    ("train", "distill"), ("eval-libero",), ("serve",), ("run-so100",), ("encode-prompt",)]:
        assert command in COMMANDS, sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(c for c, p in COMMANDS.items() if _option(p, "--dtype")))
def test_every_dtype_flag_takes_short_and_long_names(command):
    action = _option(COMMANDS[command], "--dtype")
    for short, long in (("bf16", "bfloat16"), ("fp32", "float32")):
        assert action.type(short) == action.type(long) == short, command
    with pytest.raises(argparse.ArgumentTypeError, match="bf16 \\(bfloat16\\)"):
        action.type("float64")


@pytest.mark.parametrize("flag", ["--dtype", "--device", "--seed", "--threads", "--checkpoint", "--preset",
                                  "--transformer", "--set"])
def test_a_flag_is_defined_once_everywhere(flag):
    """Each command's flag comes from the shared definition: the same type (and, for the policy flags, help)."""
    reference = argparse.ArgumentParser()
    add_policy_args(reference)
    found = [(c, _option(p, flag)) for c, p in COMMANDS.items() if _option(p, flag)]
    assert found, flag
    for command, action in found:
        if flag == "--dtype":
            assert getattr(action.type, "__name__", None) == "dtype", command
        elif flag in ("--seed", "--threads"):
            assert action.type is int, command
        elif flag in ("--checkpoint", "--preset", "--transformer", "--set", "--device"):
            want = _option(reference, flag)
            assert action.dest == want.dest and action.type is want.type, command
            if flag in ("--transformer", "--set"):
                assert action.help == want.help, command


@pytest.mark.parametrize("dtype", ["bf16", "bfloat16"])
def test_train_eval_takes_both_dtype_spellings_and_the_shared_policy_flags(dtype):
    args = build_parser().parse_args(["train", "eval", "--checkpoint", "so100-grasp", "--dtype", dtype,
                                      "--set", "action_noise_scale=1", "--transformer", "dit"])
    assert args.dtype == "bf16" and args.settings == ["action_noise_scale=1"] and args.transformer == "dit"


def test_old_spellings_stay():
    parser = build_parser()
    assert parser.parse_args(["train", "fit", "--out", "x", "--base-dtype", "bf16"]).base_dtype == "bfloat16"
    assert parser.parse_args(["train", "fit", "--out", "x", "--base-dtype", "int8"]).base_dtype == "int8"


def test_dtype_names():
    assert {DTYPE_SPELLINGS[n] for n in ("bf16", "bfloat16")} == {"bf16"}
    assert dtype_type(long=True)("bf16") == LONG_NAMES["bf16"] == "bfloat16"
    args = build_parser().parse_args(["demo", "--dtype", "float32", "--device", "cpu", "--seed", "3"])
    kwargs = policy_kwargs(args)
    assert (kwargs["dtype"], kwargs["device"], kwargs["seed"]) == ("fp32", "cpu", 3)
