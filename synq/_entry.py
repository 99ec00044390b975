"""The `synq` command's entry point: imports the command (torch with it, about half a second
and more on a cold disk) inside a handler, so that Ctrl-C then exits 130 with one line
instead of a traceback, as it does later (synq.cli.main)."""
import sys


def main(argv=None) -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("\nsynq: interrupted", file=sys.stderr)
        return 130
    return cli_main(argv)
