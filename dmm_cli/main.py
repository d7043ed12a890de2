"""The `dmm` process: run the command line (cli.py), and turn every way it can end into one sentence on stderr and
an exit code: 0 ok, 1 the environment, 2 bad input, 130 interrupted."""
from __future__ import annotations

import os
import sys
import traceback

import click
import typer

from . import console, interrupts
from .cli import app
from .errors import DMMError, ProcessLost, out_of_memory

try:  # recent typer ships its own copy of click
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:
    _TyperClickException = click.ClickException

_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_USAGE = (click.ClickException, _TyperClickException)


def entry() -> int:
    """The `dmm` process: run the CLI, then exit with its code even if a late signal arrives while exiting."""
    code = main()
    interrupts.ignore()  # a stray interrupt must not turn the outcome into one unhandled during shutdown
    # CPython marks an interrupt that escaped an exec() of source text (a dataclass or namedtuple being made
    # during a lazy import) as unhandled, however it was handled after, and then kills the process with SIGINT
    # instead of exiting with `code`. Running source text clears that mark (CPython 3.11 does; where a later one
    # keeps it, a shell still reads 130).
    exec("")
    return code


# What needs less memory, per command, when one runs out of it.
_MEMORY_HINTS = {
    "generate": "fewer pictures per forward pass (--batch-size) or a smaller --width and --height need less",
    "eval": "fewer pictures per forward pass (--batch-size) need less",
    "distill": "`dmm distill RECIPE --dry-run` plans a run's memory and names settings that fit",
    "": "free some memory or use a machine with more",
}


def _interrupted() -> int:
    print("dmm: interrupted", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and map every failure to one sentence on stderr and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("DMM_DEBUG") == "1"
    interrupts.catch()
    console.set_debug(debug)
    try:
        code = app(args=argv, prog_name="dmm", standalone_mode=False)
        if code == 130:  # typer answers an interrupt it caught with its exit code
            return _interrupted()
        return code if isinstance(code, int) else 0
    except _EXIT as e:
        return e.exit_code
    except _ABORT:
        return _interrupted()
    except _USAGE as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `dmm` or `dmm toy`: the help is the message
            print(e.format_message(), file=sys.stderr)
            return 2
        if debug:
            traceback.print_exc()
        print(f"dmm: error: {e.format_message()}", file=sys.stderr)
        return 2
    except DMMError as e:
        if debug:
            traceback.print_exc()
        if e.exit_code != 130 and interrupts.arrived() and not isinstance(e, ProcessLost):
            return _interrupted()
        print(f"dmm: {e}" if e.exit_code == 130 else f"dmm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as e:  # the last resort: one line, the traceback only with --debug
        if debug:
            traceback.print_exc()
        if interrupts.arrived():
            return _interrupted()
        command = next((a for a in argv if not a.startswith("-")), "")  # dmm's own options are all flags
        memory = out_of_memory(e, f"in `dmm {command}`", _MEMORY_HINTS.get(command, _MEMORY_HINTS[""]))
        if memory is not None:
            print(f"dmm: error: {memory}", file=sys.stderr)
            return memory.exit_code
        print(f"dmm: internal error: {e.__class__.__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
