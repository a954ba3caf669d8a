"""The `isles` entry point: wires the command groups together and turns known errors into one actionable line.

Run `isles --help`. Each command group lives in its own module and exposes `register(app)`.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from isles.protocol.errors import IslesError

from . import output

# typer bundles its own copy of click; its usage errors share this base class with typer.BadParameter.
_CLICK_ERRORS = typer.BadParameter.__mro__[2]  # ClickException: BadParameter, UsageError, NoSuchOption...

app = typer.Typer(
    name="isles",
    help="Train one diffusion model together: an ensemble of experts, each trained in isolation by a volunteer.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from isles.protocol.installation import isles_version

        typer.echo(f"isles {isles_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logs."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the installed version and exit."
    ),
) -> None:
    output.setup_logging(verbose=debug)


def _register_commands() -> None:
    # Imported here so that `isles --help` stays fast: command modules import torch and hivemind lazily too.
    from . import commands

    for register in commands.REGISTRY:
        register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app; known failures become `Error:` + `Hint:` and exit code 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ISLES_DEBUG") == "1"
    from isles.client.lifetime import children_die_with_me, die_with_parent

    children_die_with_me()  # a killed command (kill -9, the OOM killer) leaves no DHT process or p2p daemon behind
    if os.environ.get("ISLES_DIE_WITH_PARENT") == "1":  # started by another isles process (the demo's roles)
        die_with_parent()
    _register_commands()
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=argv, prog_name="isles", standalone_mode=False)
    except IslesError as exc:
        if debug:
            logging.getLogger("isles").exception("failed")
        _fail(exc.message, exc.hint)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        output.stderr.print("Aborted.")
        sys.exit(130)
    except _CLICK_ERRORS as exc:  # bad arguments: click's usage errors (typer vendors click, so match by type)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `isles` alone: help was printed
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        _fail(exc.format_message(), f"{ctx.command_path if ctx is not None else 'isles'} --help")
    except KeyboardInterrupt:
        output.stderr.print("Interrupted.")
        sys.exit(130)
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if debug:
            raise
        _fail(f"{type(exc).__name__}: {exc}", "run again with --debug for the traceback, and report it")
    # Without standalone mode, typer turns a KeyboardInterrupt into a returned exit code instead of raising it.
    if isinstance(rc, int) and rc:
        if rc == 130:
            output.stderr.print("Interrupted.")
        sys.exit(rc)


def _fail(message: str, hint: str | None) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    sys.stderr.write(f"Error: {first_line}\n")
    if hint:
        sys.stderr.write(f"Hint: {hint}\n")
    sys.stderr.flush()
    sys.exit(1)


if __name__ == "__main__":
    main()
