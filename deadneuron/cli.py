"""The `deadneuron` command line: parses, calls the API, renders. Heavy imports live inside the commands.

Exit codes: 0 done; 1 `--fail-over` exceeded; 2 bad input, refused file or usage error; 3 a bug in deadneuron.
"""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .errors import DeadNeuronError

if TYPE_CHECKING:
    from .core.options import ScanKeywords

app = typer.Typer(
    name="deadneuron",
    help="Find dead, dormant and gradient-dead units in PyTorch and Keras models; measure what SineReLU changes. "
    "--no-color anywhere on the line (or the NO_COLOR variable) prints without colour.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"deadneuron {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
) -> None:
    """Find dead, dormant and gradient-dead units; measure what SineReLU changes."""


# Shared options. Typer reads these annotations; keeping them here keeps the commands consistent.
ModelArg = Annotated[
    Path,
    typer.Argument(
        help=(
            "Saved model: .pt2, a state dict (.pt/.pth/.bin/.safetensors) with --arch, .keras, .h5, or a "
            "transformers directory (save_pretrained: config.json + model.safetensors)."
        ),
        show_default=False,
    ),
]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Inputs: .npz with key x (optional y: labels), or with a model's keyword inputs (input_ids, "
        "attention_mask, ..., labels); or .npy.",
    ),
]
SamplesOpt = Annotated[
    int | None, typer.Option("--samples", help="Scan at most N samples (without --data: N random inputs).")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Samples per forward pass.")]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch", help="Architecture for a state dict: FILE.py:NAME or pkg.module:NAME (a class or a factory)."
    ),
]
ShapeOpt = Annotated[
    str | None, typer.Option("--input-shape", help="One sample's shape for random inputs, e.g. 3,32,32.")
]
LossOpt = Annotated[
    str,
    typer.Option(
        "--loss",
        help="Gradient source: auto (task loss with labels, else probe), ce, mse, model (the loss a transformers "
        "model computes from its labels), probe, none.",
    ),
]
IncludeOpt = Annotated[
    str,
    typer.Option(
        "--include",
        help="Kinds to swap, comma-separated: relu (default), relu6 (clipped: swapped uncapped), leaky_relu.",
    ),
]
AtolOpt = Annotated[float, typer.Option("--atol", help="|output| <= atol counts as zero.")]
GtolOpt = Annotated[float, typer.Option("--gtol", help="|gradient| <= gtol counts as zero.")]
UnitAxisOpt = Annotated[
    int | None,
    typer.Option("--unit-axis", help="Axis that indexes units (default: channels for conv maps, features otherwise)."),
]
AllUnitsOpt = Annotated[
    bool,
    typer.Option(
        "--all-units", help="Name every dead, dormant and gradient-dead unit (default: the first 8 of each per site)."
    ),
]
JsonOpt = Annotated[str | None, typer.Option("--json", help="Write the JSON report to PATH, or '-' for stdout alone.")]
HtmlOpt = Annotated[Path | None, typer.Option("--html", help="Write the report as an HTML page.")]
FailOpt = Annotated[
    float | None, typer.Option("--fail-over", help="Exit 1 when the dead fraction exceeds this fraction (0-1).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for random inputs and the gradient probe.")]
PickleOpt = Annotated[
    bool,
    typer.Option(
        "--unsafe-pickle",
        help="Load a fully pickled torch module. Unpickling runs code from the file: only for files you trust.",
    ),
]
UnsafeKerasOpt = Annotated[
    bool,
    typer.Option(
        "--unsafe-deserialization",
        help="Turn Keras safe_mode off (Lambda layers). Runs code stored in the file: only for files you trust.",
    ),
]


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise DeadNeuronError(f"--input-shape {text!r} is not a shape; expected positive integers such as 3,32,32")
    return shape


def _check_fail_over(value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise DeadNeuronError(f"--fail-over takes a fraction between 0 and 1, received {value}")


@contextmanager
def _progress(total: int | None, description: str) -> Any:
    """A progress bar on stderr when it is a terminal; a no-op callback otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _stdout_console() -> Any:
    from rich.console import Console

    # Piped output (a file, CI logs) gets 120 columns rather than rich's 80, so the tables do not wrap.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 120)


def _check_outputs(json_path: str | None, html_path: Path | None) -> None:
    """Before any work: the report's files can be written (a long scan should not end in a typo)."""
    for flag, path in (("--json", None if json_path in (None, "-") else Path(json_path)), ("--html", html_path)):
        if path is None:
            continue
        folder = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise DeadNeuronError(f"{flag} {path} is a folder; expected a file path such as {path / 'report'}")
        if not folder.is_dir():
            raise DeadNeuronError(
                f"{flag} {path}: the folder {folder} does not exist; create it or choose another path"
            )


def _write_text(flag: str, path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as error:
        raise DeadNeuronError(
            f"cannot write {flag} {path}: {error.strerror or error}; expected a writable file path"
        ) from error


def _write_outputs(result: Any, json_path: str | None, html_path: Path | None, all_units: bool = False) -> None:
    from .report.text import UNITS_SHOWN, renderables

    units = None if all_units else UNITS_SHOWN
    if json_path == "-":
        sys.stdout.write(result.to_json() + "\n")
    else:
        _stdout_console().print(renderables(result, units))
        if json_path:
            _write_text("--json", Path(json_path), result.to_json() + "\n")
    if html_path is not None:
        from .report.html import to_html

        _write_text("--html", html_path, to_html(result, units))


def _kinds(include: str) -> tuple[str, ...]:
    """`--include relu,relu6` as a tuple of kinds (checked by the swap options)."""
    return tuple(kind.strip() for kind in include.split(",") if kind.strip())


def _load(model: Path, arch: str | None, unsafe_pickle: bool, unsafe_deserialization: bool) -> Any:
    from . import api

    return api.load_model(model, arch=arch, unsafe_pickle=unsafe_pickle, unsafe_deserialization=unsafe_deserialization)


def _dataset(data: Path | None, samples: int | None) -> Any:
    if data is None:
        if samples is None:
            raise DeadNeuronError("no data: pass --data PATH (.npz or .npy), or --samples N for N random inputs")
        if samples <= 0:
            raise DeadNeuronError(f"--samples must be positive, received {samples}")
        return None
    from .data import limit, load_data_file

    return limit(load_data_file(data, samples=samples), samples)


@app.command()
def scan(
    model: ModelArg,
    data: DataOpt = None,
    samples: SamplesOpt = None,
    batch_size: BatchOpt = 64,
    arch: ArchOpt = None,
    input_shape: ShapeOpt = None,
    loss: LossOpt = "auto",
    atol: AtolOpt = 0.0,
    gtol: GtolOpt = 0.0,
    unit_axis: UnitAxisOpt = None,
    json: JsonOpt = None,
    html: HtmlOpt = None,
    all_units: AllUnitsOpt = False,
    fail_over: FailOpt = None,
    seed: SeedOpt = 0,
    unsafe_pickle: PickleOpt = False,
    unsafe_deserialization: UnsafeKerasOpt = False,
) -> None:
    """Scan a saved model: dead, dormant and gradient-dead units per activation site."""
    from . import api

    _check_fail_over(fail_over)
    _check_outputs(json, html)
    shape = _parse_shape(input_shape)
    dataset = _dataset(data, samples)
    ranks = _torchrun_world()
    loaded = _load(model, arch, unsafe_pickle, unsafe_deserialization)
    total = len(dataset) if dataset is not None else samples
    options: ScanKeywords = dict(
        batch_size=batch_size, loss=loss, atol=atol, gtol=gtol, unit_axis=unit_axis, samples=samples,
        input_shape=shape, seed=seed,
    )
    primary = True
    with _progress(total, "scanning") as progress:
        if ranks > 1:
            report = api.scan_ranks(loaded, dataset, progress=progress, name=model.name, **options)
            primary = os.environ.get("RANK", "0") == "0"
        else:
            report = api.scan(loaded, dataset, progress=progress, name=model.name, **options)
    if primary:  # under torchrun, rank 0 alone writes the report
        _write_outputs(report, json, html, all_units)
    if fail_over is not None and report.dead_fraction > fail_over:
        if primary:
            print(
                f"deadneuron: dead fraction {report.dead_fraction:.4f} exceeds --fail-over {fail_over}",
                file=sys.stderr,
            )
        raise typer.Exit(1)


def _torchrun_world() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 without torchrun."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise DeadNeuronError(
            f"WORLD_SIZE={text!r} is not a number; start several processes with torchrun --nproc-per-node K"
        ) from None


@app.command()
def inspect(
    model: ModelArg,
    arch: ArchOpt = None,
    input_shape: ShapeOpt = None,
    unsafe_pickle: PickleOpt = False,
    unsafe_deserialization: UnsafeKerasOpt = False,
) -> None:
    """List the activation sites of a saved model: name, kind, units, unit axis. No data needed."""
    from rich.table import Table

    from . import api

    loaded = _load(model, arch, unsafe_pickle, unsafe_deserialization)
    sites = api.inspect(loaded, input_shape=_parse_shape(input_shape))
    table = Table(title=f"{model.name}: {len(sites)} activation sites", title_justify="left")
    for column in ("site", "kind", "units", "unit axis"):
        table.add_column(column)
    for site in sites:
        table.add_row(site.name, site.kind, str(site.units), str(site.unit_axis))
    _stdout_console().print(table)


@app.command()
def compare(
    model: ModelArg,
    to: Annotated[str, typer.Option("--to", help="Activation to swap in for ReLU.")] = "sinerelu",
    epsilon: Annotated[float | None, typer.Option("--epsilon", help="SineReLU epsilon for every site.")] = None,
    epsilon_conv: Annotated[
        float | None, typer.Option("--epsilon-conv", help="Epsilon after convolutions (default 0.0025).")
    ] = None,
    epsilon_dense: Annotated[
        float | None, typer.Option("--epsilon-dense", help="Epsilon after dense layers (default 0.025).")
    ] = None,
    finetune_steps: Annotated[
        int,
        typer.Option(
            "--finetune-steps", help="Train copies of both models K steps and count revived units (needs labels)."
        ),
    ] = 0,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate for --finetune-steps.")] = 1e-3,
    include: IncludeOpt = "relu",
    data: DataOpt = None,
    samples: SamplesOpt = None,
    batch_size: BatchOpt = 64,
    arch: ArchOpt = None,
    input_shape: ShapeOpt = None,
    loss: LossOpt = "auto",
    atol: AtolOpt = 0.0,
    gtol: GtolOpt = 0.0,
    json: JsonOpt = None,
    html: HtmlOpt = None,
    all_units: AllUnitsOpt = False,
    seed: SeedOpt = 0,
    unsafe_pickle: PickleOpt = False,
    unsafe_deserialization: UnsafeKerasOpt = False,
) -> None:
    """Scan a model before and after swapping ReLU for SineReLU, side by side."""
    from . import api

    _check_outputs(json, html)
    shape = _parse_shape(input_shape)
    dataset = _dataset(data, samples)
    loaded = _load(model, arch, unsafe_pickle, unsafe_deserialization)
    comparison = api.compare(
        loaded,
        dataset,
        to=to,
        epsilon=epsilon,
        epsilon_conv=epsilon_conv,
        epsilon_dense=epsilon_dense,
        include=_kinds(include),
        finetune_steps=finetune_steps,
        lr=lr,
        batch_size=batch_size,
        loss=loss,
        atol=atol,
        gtol=gtol,
        samples=samples,
        input_shape=shape,
        seed=seed,
        name=model.name,
    )
    _write_outputs(comparison, json, html, all_units)


@app.command()
def swap(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the swapped model (same format).")],
    to: Annotated[str, typer.Option("--to", help="Activation to swap in for ReLU.")] = "sinerelu",
    epsilon: Annotated[float | None, typer.Option("--epsilon", help="SineReLU epsilon for every site.")] = None,
    include: IncludeOpt = "relu",
    arch: ArchOpt = None,
    unsafe_pickle: PickleOpt = False,
    unsafe_deserialization: UnsafeKerasOpt = False,
) -> None:
    """Write a copy of MODEL with every ReLU replaced by SineReLU, in the input's format."""
    from . import api

    message = api.swap_file(
        model,
        output,
        to=to,
        epsilon=epsilon,
        include=_kinds(include),
        arch=arch,
        unsafe_pickle=unsafe_pickle,
        unsafe_deserialization=unsafe_deserialization,
    )
    print(message)


@app.command()
def demo(
    framework: Annotated[str, typer.Option("--framework", help="Which bundled sample: torch or keras.")] = "torch",
) -> None:
    """Scan the bundled sample model on its held-out digits, then compare it with its SineReLU swap."""
    from .demo import run_demo

    code = run_demo(framework, console=_stdout_console())
    if code:
        raise typer.Exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2 (`--debug` shows the traceback);
    Ctrl-C is one line and exit 130; TensorFlow's start-up lines stay off stderr (deadneuron.quiet)."""
    from .quiet import Interrupted, cli_quiet

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DEADNEURON_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    if "--no-color" in args:  # accepted anywhere, like --debug; rich honours NO_COLOR (https://no-color.org)
        args = [a for a in args if a != "--no-color"]
        os.environ["NO_COLOR"] = "1"
    try:
        with cli_quiet(silence_imports=not debug):
            # Standalone mode: typer handles usage errors (exit 2) and --help itself and always ends in SystemExit.
            app(args=args, prog_name="deadneuron")
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except DeadNeuronError as error:
        if debug:
            traceback.print_exc()
        print(f"deadneuron: error: {error}", file=sys.stderr)
        return error.exit_code
    except (KeyboardInterrupt, Interrupted):
        print("deadneuron: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            traceback.print_exc()
        print(
            "deadneuron: error: out of memory; expected a model and batches that fit in memory; pass a smaller "
            "--batch-size or --samples",
            file=sys.stderr,
        )
        return 2
    except Exception as error:  # a bug: still one line for the user, the traceback on request
        if debug:
            traceback.print_exc()
        print(
            f"deadneuron: internal error: {type(error).__name__}: {error}; this is a bug in deadneuron: rerun with "
            "--debug and report the traceback",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
