"""The ``resopt`` command line: one small module per subcommand, registered here in pipeline order.

Importing this module must stay cheap (no torch, onnxruntime or tensorrt): ``resopt --help`` answers in a
fraction of a second. Each command imports its library inside its body.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from resopt import __version__
from resopt.errors import ResoptError

# (name, module, function): pipeline order is help order.
COMMANDS: list[tuple[str, str, str]] = [
    ("train", "resopt.cli.train", "train_cmd"),
    ("distill", "resopt.cli.distill", "distill_cmd"),
    ("import", "resopt.cli.importer", "import_cmd"),
    ("prune", "resopt.cli.prune", "prune_cmd"),
    ("export", "resopt.cli.export", "export_cmd"),
    ("quantize", "resopt.cli.quantize", "quantize_cmd"),
    ("build", "resopt.cli.build", "build_cmd"),
    ("bench", "resopt.cli.bench", "bench_cmd"),
    ("info", "resopt.cli.info", "info_cmd"),
    ("env", "resopt.cli.env", "env_cmd"),
]

app = typer.Typer(
    name="resopt",
    help="Train, compress, export, quantize, build and benchmark ResNet-family image classifiers.\n\n"
    "Example: resopt train --arch resnet20 --data cifar10 -o r20.pt && resopt export r20.pt -o r20.onnx",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"resopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Train, compress, export, quantize, build and benchmark ResNet-family image classifiers."""


for _name, _module, _func in COMMANDS:
    app.command(_name)(getattr(importlib.import_module(_module), _func))


def report_error(e: BaseException) -> int:
    """Print a one-line error (and hint) to stderr; return the exit code."""
    if isinstance(e, ResoptError):
        msg, hint, code = e.message, e.hint, e.exit_code
    else:  # OSError: disk full, permission denied, ...
        msg, hint, code = f"{type(e).__name__}: {e}", "set RESOPT_DEBUG=1 for the traceback", 1
    sys.stderr.write(f"Error: {msg}\n")
    if hint:
        sys.stderr.write(f"Hint: {hint}\n")
    return code


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit code (tests call this in-process)."""
    debug = os.environ.get("RESOPT_DEBUG", "") not in ("", "0")
    try:
        app(args=argv, prog_name="resopt", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (ResoptError, OSError) as e:
        if debug:
            raise
        return report_error(e)
    return 0


def main() -> None:
    sys.exit(run())
