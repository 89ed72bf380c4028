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


def _build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphwise", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING")
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    # Only the selected subcommand's module is imported (argv decides which one).
    wanted = tuple(a for a in argv if not a.startswith("-"))[:2]
    for path, (module, help_text) in COMMANDS.items():
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text)
        else:
            if path[0] not in groups:
                grp = top.add_parser(path[0], help=f"{path[0]} tools")
                groups[path[0]] = grp.add_subparsers(dest="subcommand", required=True)
            sub = groups[path[0]].add_parser(path[1], help=help_text)
        sub.set_defaults(_module=module)
        if wanted[: len(path)] == path:
            importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
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
