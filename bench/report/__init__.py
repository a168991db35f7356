"""The report of an experiment: the paper's tables and plots regenerated from its MLflow runs.

- :mod:`bench.report.runs`: loading the FINISHED trial runs, pooling them into cells, the marks and curves;
- :mod:`bench.report.tables`: results (Tables 3/4), ROME-style, batch size (Table 5), cost, retention, training,
  tuning;
- :mod:`bench.report.properties`: Table 1, each property decided from evidence in the runs;
- :mod:`bench.report.plots`: the PNG plots;
- :mod:`bench.report.render`: Markdown, LaTeX and HTML;
- :mod:`bench.report.build`: everything into a folder, logged as a run of its own; ``python -m bench.report``.
"""

from bench.report.build import build, default_out, log_report, main, write
from bench.report.render import TITLES, to_html, to_latex, to_markdown
from bench.report.runs import (BUDGET_MARK, UNTRAINED_MARK, Report, ReportError, budget_limited, chosen_sample,
                               kept_untrained, load_runs, retention_curves, trained_runs, unedited_es,
                               validation_curves)
from bench.report.tables import (table_batch, table_cost, table_protocols, table_results, table_retention, table_rome,
                                 table_training, table_tuning)

__all__ = [
    "BUDGET_MARK", "TITLES", "UNTRAINED_MARK", "Report", "ReportError", "budget_limited", "build", "chosen_sample",
    "default_out", "kept_untrained", "load_runs", "log_report", "main", "to_html", "to_latex", "to_markdown", "write", "retention_curves", "table_batch",
    "table_cost", "table_protocols", "table_results", "table_retention", "table_rome", "table_training", "table_tuning",
    "trained_runs", "unedited_es", "validation_curves",
]
