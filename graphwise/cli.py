"""The `graphwise` command line: one subcommand per module, imported only when used.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`, so that start-up of
`graphwise generate` does not pay for importing the server or the plotting stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, help). Nested groups ("bench latency") use a tuple path.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("generate",): ("graphwise.commands.generate", "generate text for one prompt"),
    ("serve",): ("graphwise.server.cli", "OpenAI-compatible HTTP server"),
    ("explain",): ("graphwise.insight.explain_cli", "why eager or CUDA graph is faster here"),
    ("bench", "latency"): ("graphwise.bench.latency", "per-iteration decode latency"),
    ("bench", "serve"): ("graphwise.bench.serve", "serving benchmark against an OpenAI server"),
    ("bench", "offline"): ("graphwise.bench.offline", "in-process offline throughput"),
    ("bench", "sweep"): ("graphwise.bench.sweep", "start servers, run bench serve, write table"),
}


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _global_options(parser: argparse.ArgumentParser, default: object) -> None:
    """Options that apply to every subcommand, accepted before or after its name."""
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=default,
        help="logging threshold (default INFO)",
    )


def split_global_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The global options wherever they appear (`--log-level X` or `--log-level=X`), and the
    rest of argv in order.

    They are taken out before the real parse: the subcommand's module is chosen from argv's
    first words, so a global option's value must not be mistaken for a subcommand
    (`graphwise --log-level WARNING generate Hi`), and argparse would not accept a parent's
    option after a subparser's positional arguments.
    """
    # Only what precedes a bare `--` is option territory; a prompt after it stays as written.
    cut = argv.index("--") if "--" in argv else len(argv)
    pre = argparse.ArgumentParser(prog="graphwise", add_help=False, allow_abbrev=False)
    _global_options(pre, "INFO")
    # parse_known_args reports an invalid level itself (exit 2, like any usage error).
    options, rest = pre.parse_known_args(argv[:cut])
    return options, rest + argv[cut:]


def _command_words(argv: list[str]) -> tuple[str, ...]:
    """The subcommand path argv selects (its first two words, options left out)."""
    return tuple(a for a in argv if not a.startswith("-"))[:2]


def _build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphwise", description=__doc__.splitlines()[0])
    _global_options(parser, "INFO")
    # Listed in every subcommand's --help too; the value itself is taken out beforehand.
    shared = argparse.ArgumentParser(add_help=False)
    _global_options(shared, argparse.SUPPRESS)
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    # Only the selected subcommand's module is imported (argv decides which one).
    wanted = _command_words(argv)
    for path, (module, help_text) in COMMANDS.items():
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text, parents=[shared])
        else:
            if path[0] not in groups:
                grp = top.add_parser(path[0], help=f"{path[0]} tools", parents=[shared])
                groups[path[0]] = grp.add_subparsers(dest="subcommand", required=True)
            sub = groups[path[0]].add_parser(path[1], help=help_text, parents=[shared])
        sub.set_defaults(_module=module)
        if wanted[: len(path)] == path:
            importlib.import_module(module).add_arguments(sub)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    options, rest = split_global_options(argv)
    args = _build_parser(rest).parse_args(rest)
    args.log_level = options.log_level
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except ValueError as exc:  # bad input: a clear message, not a traceback
        print(f"graphwise: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
