"""The ``hass-ext`` console script: answers ``hass-ext --help`` without importing the package (which loads torch
and the kernels, seconds of start-up), and hands every command to ``hass_ext.cli``.

The command list below is what ``hass_ext.cli.build_parser`` defines; tests/test_inputs.py checks that both print
the same help.
"""
import argparse
import sys

DESCRIPTION = "HASS speculative decoding: faster LLM generation with unchanged output."
EPILOG = "Run 'hass-ext COMMAND --help' for the options of a command."
COMMANDS = (
    ("generate", "generate a continuation of a prompt, streaming the text"),
    ("chat", "interactive multi-turn chat"),
    ("eval", "tau and speedup over MT-bench / HumanEval / GSM8K"),
    ("tree-profile", "measure a draft's acceptance per tree shape (for --total-tokens auto)"),
    ("regenerate", "self-distillation data: the target's greedy answers to first user turns (resumable)"),
    ("prepare-data", "conversations -> target features -> training shards (resumable)"),
    ("train", "train a HASS or EAGLE draft on prepared data"),
    ("token-map", "hot vocabulary for a draft: the N most frequent assistant tokens of prepared data"),
)


def overview_parser() -> argparse.ArgumentParser:
    """The top level of the command line: the commands and what each does, no options of their own."""
    parser = argparse.ArgumentParser(prog="hass-ext", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, text in COMMANDS:
        sub.add_parser(name, help=text)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") or argv[0] not in dict(COMMANDS):
        overview_parser().parse_args(argv)  # prints the help (exit 0) or the usage error (exit 2)
    from hass_ext.cli import main as run  # the package: torch, the kernels and the commands

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
