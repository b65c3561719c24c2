"""The CLI's surface: `prunert --version`, help text and the default shown on every flag of every subcommand
(walked from build_parser(), so a new flag without them fails here), and `run`'s seed: a sampled run without
--seed draws a fresh one and prints it, --seed repeats a run."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
from pathlib import Path

import pytest

import prunert
from prunert import cli

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
# Actions that are switches: their default (off, or unset) is what leaving them out means, so nothing to show.
SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction, argparse._CountAction,
            argparse._HelpAction, argparse._VersionAction, argparse._AppendConstAction)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser, by its full name ("prunert", "prunert run", ...)."""
    found = {parser.prog: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found.update(subcommands(child))
    return found


def problems(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out += [f"command {choice.dest!r}: no help" for choice in action._choices_actions if not choice.help]
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help or action.help == argparse.SUPPRESS:
            out.append(f"{name}: no help text")
            continue
        shown = "%(default)" in action.help or re.search(r"\bdefault", action.help, re.IGNORECASE)
        if action.option_strings and not isinstance(action, SWITCHES) and not action.required and not shown:
            out.append(f"{name}: help does not show its default ({action.default!r})")
    return out


def test_every_flag_of_every_subcommand_has_help_and_shows_its_default() -> None:
    parsers = subcommands(cli.build_parser())
    assert {"prunert", "prunert run", "prunert export", "prunert eval", "prunert plan", "prunert quantize"} <= set(parsers)
    found = {prog: problems(parser) for prog, parser in parsers.items()}
    assert not {prog: issues for prog, issues in found.items() if issues}
    for parser in parsers.values():
        assert parser.format_help()  # every %(default)s and %% renders


def test_the_walker_catches_a_flag_without_help_or_default() -> None:
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--bare", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=3, help="some number")
    parser.add_argument("--shown", type=int, default=3, help="some number (default %(default)s)")
    parser.add_argument("--switch", action="store_true", help="turn it on")
    assert problems(parser) == ["--bare: no help text", "--hidden: help does not show its default (3)"]


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"prunert {prunert.__version__}\n"
    assert importlib.metadata.version("prunert") == prunert.__version__


def _seed_line(err: str) -> int | None:
    lines = [line for line in err.splitlines() if line.startswith("seed: ")]
    assert len(lines) <= 1, err
    if not lines:
        return None
    match = re.fullmatch(r"seed: (\d+) \(pass --seed (\d+) to repeat\)", lines[0])
    assert match and match.group(1) == match.group(2), lines[0]
    return int(match.group(1))


def test_sampled_run_without_seed_draws_a_fresh_one_and_prints_it(prunert_main, tiny_artifact: Path) -> None:
    args = ["run", tiny_artifact, "--image", PHOTO, "--prompt", "<image> What is it?", "--temperature", "1.5",
            "--max-new-tokens", "12", "--no-stream"]
    runs = [prunert_main(*args) for _ in range(2)]
    assert all(code == 0 for code, _, _ in runs), runs
    seeds = [_seed_line(err) for _, _, err in runs]
    assert None not in seeds and seeds[0] != seeds[1]  # a fresh seed each run (2**31 of them)
    for (_, out, _), seed in zip(runs, seeds):  # the printed seed repeats the run exactly, and prints nothing then
        code, again, err = prunert_main(*args, "--seed", seed)
        assert code == 0 and again == out and _seed_line(err) is None


def test_greedy_run_prints_no_seed(prunert_main, tiny_artifact: Path) -> None:
    code, _, err = prunert_main("run", tiny_artifact, "--image", PHOTO, "--prompt", "<image> What is it?", "--max-new-tokens", "2")
    assert code == 0 and _seed_line(err) is None
