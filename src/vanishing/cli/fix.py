"""``vanishing fix CONFIG``: repair an experiment, write the fixed config and a before/after report."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``fix`` command to ``app``."""

    @app.command()
    def fix(
        config: Path = typer.Argument(..., help="The experiment's TOML config."),
        steps: int = typer.Option(
            200, "--steps", "-k", min=1, help="Steps per candidate (K; at most the config's)."
        ),
        out: Path = typer.Option(
            None, "--out", "-o", help="Output directory (default runs/fix-<name>-<date-time>)."
        ),
    ) -> None:
        """Repair an experiment: its remedies tried for K steps, the best written as fixed.toml.

        The diagnosis' remedies are tried on copies of its model for K steps on the same
        batches; the best one a config field can express is written as fixed.toml and checked
        on its own, with a before/after report. Exit 0 when a fix was found (or nothing needed
        fixing), 1 when none was, 2 on bad input."""

        from vanishing.cli.app import fail, stdout_console
        from vanishing.experiments.config import ConfigError
        from vanishing.experiments.fix import fix_experiment

        if not config.is_file():
            raise fail(f"{config}: no such config file")
        if out is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"fix-{config.stem}-{stamp}"
        try:
            result = fix_experiment(config, out, steps=steps, progress=True)
        except ConfigError as e:
            message = str(e)
            raise fail(
                message if message.startswith(str(config)) else f"{config}: {message}"
            ) from None
        except ValueError as e:
            raise fail(str(e)) from None
        except OSError as e:
            raise fail(f"cannot write to {out}: {e.strerror or e}") from None
        console = stdout_console()
        rep = result.repair
        console.print(str(rep))
        if rep.healthy:
            console.print(f"Nothing to repair. Records: {out}")
            raise typer.Exit(0)
        if not result.fixed:
            also = (
                f" (fixed, but no config field expresses: {', '.join(result.unexpressed)}; "
                "see repair.json for their code)"
                if result.unexpressed
                else ""
            )
            console.print(f"No remedy a config can express fixed it{also}. Records: {out}")
            raise typer.Exit(1)
        c = result.chosen
        changes = ", ".join(f"{k} = {v!r}" for k, v in result.changes.items())
        console.print(
            f"Fix: {c.label} ({changes}); in the probe loss {rep.loss_before:.4g} -> "
            f"{c.loss_after:.4g}. The fixed config on its own over the same steps: loss "
            f"{result.check_loss:.4g}, diagnosis "
            f"{', '.join(result.check_kinds) or 'healthy'}."
        )
        console.print(f"Fixed config: {result.fixed_config}")
        console.print(f"Report (before beside after): {result.report}")
