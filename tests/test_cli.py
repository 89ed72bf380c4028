"""The command line's own parsing: global options anywhere, the right subcommand imported."""

from __future__ import annotations

import sys
import types

import pytest

from graphwise import cli


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "WARNING", "generate", "Hi"],
        ["--log-level=WARNING", "generate", "Hi"],
        ["--log-level", "warning", "generate", "Hi"],
        ["generate", "Hi", "--log-level", "WARNING"],
        ["generate", "--log-level=WARNING", "Hi"],
        ["generate", "--max-tokens", "3", "--log-level", "WARNING", "Hi"],
    ],
)
def test_log_level_before_or_after_the_subcommand(argv: list[str]) -> None:
    args = cli.parse_args(argv)
    assert args.log_level == "WARNING"
    assert args.prompt == "Hi"
    assert args._module == "graphwise.commands.generate"


def test_default_level_and_nested_subcommands() -> None:
    args = cli.parse_args(["generate", "Hi"])
    assert args.log_level == "INFO"
    args = cli.parse_args(["bench", "--log-level", "ERROR", "latency"])
    assert args.log_level == "ERROR" and args._module == "graphwise.bench.latency"


def test_a_prompt_after_double_dash_stays_a_prompt() -> None:
    args = cli.parse_args(["--log-level", "DEBUG", "generate", "--", "--log-level"])
    assert args.prompt == "--log-level" and args.log_level == "DEBUG"


@pytest.mark.parametrize(
    "argv", [["--log-level", "LOUD", "generate", "Hi"], ["generate", "Hi", "--log-level"]]
)
def test_bad_log_level_is_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert "--log-level" in capsys.readouterr().err


def test_subcommand_help_lists_the_global_option(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(["generate", "--help"])
    assert "--log-level" in capsys.readouterr().out


def test_main_runs_the_selected_module_with_the_level(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    module = types.ModuleType("graphwise_test_cli_probe")
    module.add_arguments = lambda parser: parser.add_argument("word")  # type: ignore[attr-defined]
    module.run = lambda args: seen.append(f"{args.word}:{args.log_level}") or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, ("probe",), (module.__name__, "a test command"))
    assert cli.main(["--log-level", "WARNING", "probe", "x"]) == 0
    assert cli.main(["probe", "y", "--log-level=error"]) == 0
    assert seen == ["x:WARNING", "y:ERROR"]
