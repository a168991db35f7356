"""Tables rendered as Markdown, LaTeX and one self-contained HTML page (plots embedded)."""

from __future__ import annotations

import base64
import html

from bench.report.plots import PLOT_TITLES
from bench.report.runs import Report


TITLES = {
    "table1": "Table 1 (measured): editor properties",
    "results": "Table 3/4 style: edit success and drawdown",
    "protocols": "What the edited model says: teacher-forced and free answers side by side",
    "rome": "ROME-style scores (true answer known)",
    "batch": "Table 5 style: batched edits",
    "cost": "Cost",
    "retention": "Sequential editing: retention",
    "lifelong": "Sequential editing: every checkpoint, with the size of the accumulated change",
    "tuning": "Tuning: every sample of each search space",
    "training": "Training of the learned editors: convergence",
}


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def to_latex(header: list[str], rows: list[list[str]]) -> str:
    def tex(s: str) -> str:
        s = s.replace("**", "")
        for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                     ("±", r"$\pm$"), ("✓", r"\checkmark{}"), ("✗", r"$\times$"), (">=", r"$\geq$"),
                     ("<=", r"$\leq$")):
            s = s.replace(a, b)
        return s

    lines = [r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule", " & ".join(map(tex, header)) + r" \\",
             r"\midrule"]
    lines += [" & ".join(tex(c) for c in r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def to_html(rep: Report) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(rep.experiment)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f4f4f4}</style></head><body>",
             f"<h1>Editing report: {html.escape(rep.experiment)}</h1><p>{rep.n_runs} finished trial runs.</p>"]
    for key, (header, rows) in rep.tables.items():
        parts.append(f"<h2>{html.escape(TITLES[key])}</h2><table><tr>")
        parts += [f"<th>{html.escape(h)}</th>" for h in header]
        parts.append("</tr>")
        for r in rows:
            cells = []
            for c in r:
                bold = c.startswith("**") and c.endswith("**")
                c = html.escape(c.strip("*"))
                cells.append(f"<td>{'<b>' + c + '</b>' if bold else c}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append(f"</table><p><small>{html.escape(rep.notes.get(key, ''))}</small></p>")
    for name, path in rep.plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        title = html.escape(PLOT_TITLES.get(name, name))
        parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{data}'/>")
    parts.append("</body></html>")
    return "\n".join(parts)
