"""`python -m deadneuron` and the `deadneuron` command."""

import os
import signal
import sys


def _early_interrupt(signum: int, frame: object) -> None:
    """Ctrl-C before the CLI has loaded (a fraction of a second): one line and exit 130, no traceback."""
    os.write(2, b"deadneuron: interrupted\n")
    os._exit(130)


def main() -> int:
    """The CLI, with Ctrl-C told in one line also while its own imports run (cli.main takes over from there)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _early_interrupt)
    from .cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
