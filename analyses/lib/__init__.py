"""The small library under the analysis scripts, one module per concern.

* :mod:`lib.setting` — the command line, the scales and their knobs, :class:`~lib.setting.Setting`.
* :mod:`lib.catalog` — ONE catalog of runs as named sweep cells (:func:`~lib.catalog.cells`), run
  as one sweep over the runs dir (:func:`~lib.catalog.run_cells`); the tables' evaluation settings.
* :mod:`lib.outputs` — captions, and writing figures, text and tables.

Reading run directories and formatting numbers are the package's (:mod:`robustdrop.plots.runs`,
:mod:`robustdrop.formatting`), shared with ``robustdrop plot`` and ``robustdrop compare``.
"""
