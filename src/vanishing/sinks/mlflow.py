"""MLflow: the selected scalars of every recorded step as MLflow metrics, one batch per flush."""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

from vanishing.sinks.scalars import ScalarSelector

#: MLflow's limit of metrics in one ``log_batch`` call (``mlflow.utils.validation``).
BATCH_LIMIT = 1000
_KEY_LIMIT = 250  # MLflow's longest key
_BAD = re.compile(r"[^A-Za-z0-9_./-]")


def metric_key(tag: str) -> str:
    """``tag`` as a valid MLflow metric key.

    Characters other than letters, digits, ``_``, ``.``, ``/`` and ``-`` become ``_``; empty,
    ``.`` and ``..`` path segments (MLflow treats keys as paths) get a ``_`` prefix; a key
    longer than MLflow's 250 characters is shortened, ending in a hash of the whole tag.

    Example:
        >>> from vanishing.sinks.mlflow import metric_key
        >>> metric_key("vanishing/grad_norm/blocks.0.attn[q] proj")
        'vanishing/grad_norm/blocks.0.attn_q__proj'
        >>> metric_key("vanishing/grad_norm/")     # a model that is itself the layer: name ""
        'vanishing/grad_norm/_'
    """
    parts = []
    for part in _BAD.sub("_", str(tag)).split("/"):
        parts.append("_" + part if part in ("", ".", "..") else part)
    key = "/".join(parts)
    if len(key) > _KEY_LIMIT:
        digest = hashlib.sha1(str(tag).encode()).hexdigest()[:10]
        key = key[: _KEY_LIMIT - 11] + "-" + digest
    return key


class MLflowSink:
    """Logs the :class:`~vanishing.sinks.scalars.ScalarSelector`'s scalars as MLflow metrics.

    Which run: ``run`` (an MLflow ``Run``/``ActiveRun`` or a run id) if given, else the active
    run (``mlflow.active_run()``), else a new run that this sink creates (in ``experiment``, a
    name, created if needed; default: MLflow's default experiment) and ends at ``close``. A run
    it did not create is left open. The run it creates is not made the active run (no global
    state changes). ``tracking_uri``: where to log (default: MLflow's configured URI, e.g.
    ``MLFLOW_TRACKING_URI``).

    Each flush is one ``MlflowClient.log_batch`` call (split at MLflow's limit of 1,000 metrics
    per call), with each metric's ``step`` the training step and its timestamp the step's time.
    Metric keys are the tags of docs/sinks.md, except that MLflow allows only letters, digits,
    ``_``, ``.``, ``/``, ``-`` (and spaces, colons) in keys: any other character of a layer name
    becomes ``_`` (:func:`metric_key`). Needs ``mlflow`` or ``mlflow-skinny``
    (``pip install "vanishing[mlflow]"``).

    Example (a local file store; MLflow 3 asks ``MLFLOW_ALLOW_FILE_STORE=true`` for one):
        >>> import os, tempfile, torch, vanishing
        >>> from mlflow.tracking import MlflowClient
        >>> from vanishing.sinks import MLflowSink
        >>> saved = dict(os.environ); os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        >>> uri = "file://" + tempfile.mkdtemp() + "/mlruns"
        >>> sink = MLflowSink(tracking_uri=uri, experiment="demo")
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with vanishing.watch(model, opt, run_dir=tempfile.mkdtemp() + "/r", sinks=[sink]):
        ...     for _ in range(3):
        ...         opt.zero_grad(); model(torch.randn(8, 3)).pow(2).mean().backward(); opt.step()
        >>> history = MlflowClient(uri).get_metric_history(sink.run_id, "vanishing/loss")
        >>> [m.step for m in history]
        [0, 1, 2]
        >>> os.environ.clear(); os.environ.update(saved)
    """

    def __init__(
        self,
        run: Any = None,
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        max_layers: int = 3,
    ) -> None:
        from vanishing.sinks import _require

        _require("mlflow", "MLflowSink", "mlflow")
        self.selector = ScalarSelector(max_layers=max_layers)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self._run = run
        self.run_id: str | None = None
        self._started = False
        self._client: Any = None

    def open(self, manifest: dict[str, Any]) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.selector.observe_manifest(manifest)
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        run = self._run if self._run is not None else mlflow.active_run()
        if run is not None:
            self.run_id = run if isinstance(run, str) else run.info.run_id
            return
        experiment_id = None
        if self.experiment is not None:
            found = self._client.get_experiment_by_name(self.experiment)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self._client.create_experiment(self.experiment)
            )
        created = self._client.create_run(
            experiment_id or "0", tags={"mlflow.source.name": "vanishing"}
        )
        self.run_id = created.info.run_id
        self._started = True

    def write(self, block: Any) -> None:
        if self._client is None:  # open failed (and was reported)
            self.selector.observe_manifest(block.manifest)
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        times = getattr(block, "times", None)
        metrics = []
        for i, (step, scalars) in enumerate(self.selector.scalars(block)):
            t = times[i] if times is not None and len(times) > i else float("nan")
            stamp = int(t * 1000) if t == t and t > 0 else now
            metrics += [Metric(metric_key(k), v, stamp, step) for k, v in scalars.items()]
        for start in range(0, len(metrics), BATCH_LIMIT):
            self._client.log_batch(self.run_id, metrics=metrics[start : start + BATCH_LIMIT])

    def close(self) -> None:
        if self._started and self._client is not None:
            self._client.set_terminated(self.run_id)
            self._started = False
