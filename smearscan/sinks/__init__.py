"""Report sinks: per-image rows (CSV/JSONL), the summary JSON and the HTML page.

Each takes :class:`~smearscan.results.CellResult` objects whose labels the run's decision
policy has already filled in, and writes atomically (:mod:`smearscan.files`).
"""
