"""``vanishing reproduce NAME``: reproduce a published experiment under the monitor."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``reproduce`` command to ``app``."""

    @app.command()
    def reproduce(
        name: str = typer.Argument(..., help="The experiment: nielsen."),
        as_json: bool = typer.Option(
            False, "--json", help='Print only {"nets": [{"sizes", "init", "final"}]} as JSON.'
        ),
        seeds: int = typer.Option(
            10, "--seeds", help="Initialisations per net (medians over them)."
        ),
        steps: int = typer.Option(500, "--steps", help="Full-batch gradient descent steps."),
        data_dir: Path = typer.Option(
            None,
            "--data-dir",
            help="Directory with the MNIST IDX files (train-images-idx3-ubyte[.gz], ...); "
            "default: scikit-learn's bundled digits.",
        ),
        out: Path = typer.Option(
            None, "--out", "-o", help="Output directory (default runs/reproduce-NAME-<date-time>)."
        ),
    ) -> None:
        """Reproduce a published experiment under the monitor (available: nielsen).

        nielsen: speed of learning per hidden layer of sigmoid nets with 2, 3 and 4 hidden layers (Neural Networks and Deep Learning, ch. 5): prints the speeds at initialisation and after training, writes the speed-vs-step plot.
        """
        from vanishing.cli.app import fail
        from vanishing.experiments.reproductions import AVAILABLE

        if name not in AVAILABLE:
            raise fail(f"unknown experiment {name!r}; available: {', '.join(AVAILABLE)}")
        if seeds < 1:
            raise fail(f"--seeds must be at least 1, got {seeds}")
        if steps < 1:
            raise fail(f"--steps must be at least 1, got {steps}")
        if data_dir is not None and not data_dir.expanduser().is_dir():
            raise fail(
                f"--data-dir {data_dir} is not a directory; pass the directory that holds the "
                "MNIST IDX files"
            )
        _nielsen(as_json=as_json, seeds=seeds, steps=steps, data_dir=data_dir, out=out)


def _nielsen(*, as_json: bool, seeds: int, steps: int, data_dir: Path | None, out: Path | None):
    import json
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from vanishing.cli.app import fail
    from vanishing.diagnose.view import max_derivative_text
    from vanishing.experiments.reproductions import nielsen

    err = Console(stderr=True, highlight=False)
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=140)
    started = time.perf_counter()
    try:
        out = nielsen.check_out(out)  # before any progress bar: a refusal is one clean line
        data = nielsen.load_data(data_dir)
        if not as_json:
            where = f"MNIST from {data_dir}" if data_dir is not None else "scikit-learn's digits"
            console.print(
                f"Nielsen, Neural Networks and Deep Learning ch. 5: sigmoid nets with 2, 3 and 4 "
                f"hidden layers of {nielsen.WIDTH}, {where} (first {nielsen.N_TRAIN} examples), "
                f"full-batch GD (eta {nielsen.ETA}, lambda {nielsen.LMBDA:g}), {steps} steps, "
                f"{seeds} seeds, every step watched by vanishing.watch"
            )
        with Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            console=err,
            transient=True,
            disable=as_json,
        ) as bar:
            task = bar.add_task("nets", total=len(nielsen.HIDDEN_LAYERS) * seeds)
            result = nielsen.reproduce(
                seeds=seeds,
                steps=steps,
                out=out,
                data=data,
                progress=lambda done, total: bar.update(task, completed=done),
            )
    except ValueError as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"cannot write the results: {e.strerror or e} ({e.filename or ''})") from None
    seconds = time.perf_counter() - started
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        err.print(f"runs and plots written to {result.out} ({seconds:.0f} s)")
        return
    console.print(nielsen.speed_table(result))
    rising = all(net.init == sorted(net.init) for net in result.nets)
    ratios = [net.init[0] / net.init[-1] for net in result.nets]
    shrinking = all(a > b for a, b in zip(ratios, ratios[1:]))
    if rising and shrinking:
        console.print(
            "As in Nielsen's chapter, the speed at initialisation rises with the layer index "
            "(each layer back multiplies the error by sigmoid'(z) <= "
            f"{max_derivative_text('sigmoid')} and weights of size "
            "~1/sqrt(n_in)), and the first-to-last ratio falls with depth: "
            + " > ".join(f"{r:.3g}" for r in ratios)
            + "."
        )
    else:
        console.print(
            "Unlike Nielsen's chapter, the speeds at initialisation do not "
            + ("rise with the layer index in every net" if not rising else "")
            + (" and " if not rising and not shrinking else "")
            + ("fall in first-to-last ratio with depth" if not shrinking else "")
            + f" (first / last: {', '.join(f'{r:.3g}' for r in ratios)}); try more --seeds."
        )
    plots = ", ".join(str(p) for p in result.plots)
    console.print(f"Plot: {plots}. Runs: {result.out} ({seconds:.0f} s).")
