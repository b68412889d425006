"""Reports: plots of a run's gradient flow, a self-contained HTML page, terminal views.

Everything here reads run directories (never a live model) with bounded memory:

- :mod:`vanishing.report.data`: :class:`~vanishing.report.data.RunData`, one pass over a run's
  Parquet parts that keeps per-time-bucket mean, min and max (so spikes survive downsampling);
- :mod:`vanishing.report.plots`: one matplotlib figure per picture (``save_figure`` writes PNG
  and SVG);
- :mod:`vanishing.report.html`: ``write_report(target)`` for a run, a sweep or a directory of runs;
- :mod:`vanishing.report.terminal`: rich tables, the per-layer gradient strip, a live view.

Example:
    >>> from vanishing.report.html import write_report
    >>> write_report("runs/my-run")   # doctest: +SKIP
    PosixPath('runs/my-run/report.html')
"""
