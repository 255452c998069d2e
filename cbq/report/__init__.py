"""Turn the ``results.json`` files of sweeps into tables (Markdown or CSV) and plots.

    python -m cbq.report multirun/2026-11-24_10-00-00 --metric ppl/wiki-sample
    python -m cbq.report multirun/... --rows model.name method.name --cols quant.name --csv
    python -m cbq.report multirun/table5_loss/cpu multirun/table4_window/cpu --table 5
    python -m cbq.report multirun/cbq_smollm2 --table 2 --plots plots/

``--table N`` lays the runs out as the paper's Table N (see :data:`LAYOUTS`). The rules:

- Only finished and failed runs make cells; skipped and still running ones do not.
- Later runs of an identical cell replace earlier ones (runs are read oldest first, across
  every root given).
- A cell with no run shows as ``-``, never as a number. A cell whose only runs failed shows
  as ``failed``; a failed run never replaces a finished one's number.
- An ablation table varies one CBQ component (window, loss, CFP or rounding); its CBQ runs
  must hold the other components at the table's reference, so that a run of another sweep
  (Table 4's windows, say) lands only in the row it shares (Table 5's default row). The
  reference of a component is its default (``cbq.config``) when a run of the table's own
  sweep uses the default, else the value most of the table's own runs use.
- Accuracies are percentages (lm-eval reports fractions).

Reads local files only.

The package: :mod:`~cbq.report.runs` reads the records (:class:`cbq.results.ResultRecord`,
the type the results writer writes) and what each run measured; :mod:`~cbq.report.render`
lays out free-form tables; :mod:`~cbq.report.tables` the paper's; :mod:`~cbq.report.plots`
draws them; :mod:`~cbq.report.cli` is the command line.
"""

from cbq.report.cli import main
from cbq.report.render import (
    FAILED,
    MISSING,
    csv_text,
    format_value,
    mark_best,
    markdown,
    pivot,
    run_summary,
)
from cbq.report.runs import (
    Record,
    load_many,
    load_results,
    lookup,
    matching,
    rounding_label,
    setting,
    variant_label,
)
from cbq.report.tables import LAYOUTS, build_table, table_csv, table_markdown

__all__ = [
    "FAILED",
    "LAYOUTS",
    "MISSING",
    "Record",
    "build_table",
    "csv_text",
    "format_value",
    "load_many",
    "load_results",
    "lookup",
    "main",
    "mark_best",
    "markdown",
    "matching",
    "pivot",
    "rounding_label",
    "run_summary",
    "setting",
    "table_csv",
    "table_markdown",
    "variant_label",
]
