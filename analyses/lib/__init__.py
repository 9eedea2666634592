"""The small library under the analysis scripts, one module per concern.

* :mod:`lib.setting` — the command line, the scales and their knobs, :class:`~lib.setting.Setting`.
* :mod:`lib.catalog` — ONE catalog of runs (:func:`~lib.catalog.catalog`) and their configs.
* :mod:`lib.training` — train, resume or reuse one catalog run (the package's rule, :mod:`robustdrop.reuse`).
* :mod:`lib.tasks` — trainings and evaluations in order or in parallel processes, with
  dependencies and prefixed, logged output; :func:`~lib.tasks.ensure_runs`.
* :mod:`lib.evaluation` — the tables' settings for :func:`robustdrop.evaluation.evaluate_run_cached` (final / best checkpoints, cached).
* :mod:`lib.outputs` — captions, and writing figures, text and tables.

Reading run directories and formatting numbers are the package's (:mod:`robustdrop.plots.runs`,
:mod:`robustdrop.formatting`), shared with ``robustdrop plot`` and ``robustdrop compare``.
"""
