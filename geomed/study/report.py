"""The figures and the ``index.html`` of a longitudinal study (offscreen matplotlib; no display needed)."""

from __future__ import annotations

import html
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .. import __version__
from .._files import atomic_path, distinct_file_stem
from ..io import read_mesh
from ..plotting import plot_surface

logger = logging.getLogger(__name__)

_GROUP_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def write_report(result, parameters, *, table: Path, folder: Path | None = None) -> Path:
    """Draw the study's figures into ``folder/figures`` and write ``folder/index.html``, which shows them.

    Parameters
    ----------
    result : geomed.study.StudyResult
    parameters : geomed.study.StudyParameters
    table : Path
        The study table (named in the report).
    folder : Path, optional
        Where to write (default ``result.output``; :func:`geomed.study.run_study` writes into a staging folder
        and moves the report and the tables into place together). Change maps are read from ``result.output``.

    Returns
    -------
    Path of ``index.html``.
    """
    folder = result.output if folder is None else Path(folder)
    figures_folder = folder / "figures"
    figures_folder.mkdir(exist_ok=True)
    figures = []
    if not result.changes.empty:
        figures.append(("Trajectories", "Percent volume change from baseline (registration-based), one line per "
                        "subject; bold: group means.", _save(plot_trajectories(result.changes),
                                                              figures_folder / "trajectories.png")))
        figures.append(("Annualised rates", "Annual percent volume change per subject (dots) and group mean with "
                        "its 95% confidence interval.", _save(plot_rates(result.rates, result.groups),
                                                              figures_folder / "rates.png")))
        for structure in sorted(result.changes["structure"].unique()):
            chosen = _typical_map(result, structure)
            if chosen is None:
                continue
            subject, path, start, end = chosen
            mesh = read_mesh(path)
            rate = mesh.point_data["normal displacement"] / (end - start)
            figure = Figure(figsize=(6, 5))
            ax = figure.add_subplot(projection="3d")
            plot_surface(mesh, np.nan_to_num(rate), ax=ax, label="normal displacement (mm/year)",
                         title=f"{structure}: {subject}, year {start:g} to {end:g}")
            name = f"change_map_{distinct_file_stem(structure)}.png"
            figures.append((f"Change map: {structure}", f"Where {subject}'s {structure} moved, annualised: blue "
                            "inwards (atrophy), red outwards (growth), on the baseline surface.",
                            _save(figure, figures_folder / name)))
    index = folder / "index.html"
    with atomic_path(index) as partial:
        partial.write_text(_html(result, parameters, table, figures), encoding="utf-8")
    return index


def plot_trajectories(changes) -> Figure:
    """One panel per structure: cumulative percent volume change against years, per subject and group mean."""
    structures = sorted(changes["structure"].unique())
    figure = Figure(figsize=(4.2 * len(structures), 3.6), layout="constrained")
    axes = figure.subplots(1, len(structures), squeeze=False)[0]
    groups = sorted(changes["group"].unique())
    for ax, structure in zip(axes, structures):
        means: dict[str, dict[float, list[float]]] = {group: {} for group in groups}
        for (subject, group), chain in changes[changes["structure"] == structure].groupby(["subject", "group"]):
            chain = chain.sort_values(["from_timepoint", "to_timepoint"])
            times = np.concatenate([[chain["from_timepoint"].iloc[0]], chain["to_timepoint"].to_numpy()])
            change = 100 * np.expm1(np.concatenate([[0.0], np.cumsum(np.log1p(
                chain["registration_percent"].to_numpy() / 100))]))
            colour = _GROUP_COLOURS[groups.index(group) % len(_GROUP_COLOURS)]
            ax.plot(times, change, color=colour, alpha=0.35, lw=1)
            for time, value in zip(times, change):
                means[group].setdefault(float(time), []).append(float(value))
        for index, group in enumerate(groups):
            if means[group]:
                times = sorted(means[group])
                ax.plot(times, [np.mean(means[group][t]) for t in times], color=_GROUP_COLOURS[index % 6], lw=2.5,
                        marker="o", label=group or "all")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set(title=structure, xlabel="years", ylabel="volume change from baseline (%)")
        ax.legend(fontsize="small")
    return figure


def plot_rates(rates, groups) -> Figure:
    """One panel per structure: each subject's annual rate and each group's mean ± 95% confidence interval."""
    structures = sorted(rates["structure"].unique())
    figure = Figure(figsize=(3.2 * len(structures), 3.6), layout="constrained")
    axes = figure.subplots(1, len(structures), squeeze=False)[0]
    for ax, structure in zip(axes, structures):
        summary = groups[groups["structure"] == structure].reset_index(drop=True)
        for index, row in summary.iterrows():
            colour = _GROUP_COLOURS[index % len(_GROUP_COLOURS)]
            subjects = rates[(rates["structure"] == structure) & (rates["group"] == row["group"])]
            jitter = np.linspace(-0.12, 0.12, len(subjects)) if len(subjects) > 1 else np.zeros(len(subjects))
            ax.scatter(index + jitter, subjects["registration_rate"], color=colour, alpha=0.5, s=14)
            low, high = row["mean_rate"] - row["ci_low"], row["ci_high"] - row["mean_rate"]
            ax.errorbar([index + 0.3], [row["mean_rate"]], yerr=[[low], [high]], color=colour, fmt="o", capsize=4)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xticks(range(len(summary)), [group or "all" for group in summary["group"]])
        ax.set(title=structure, ylabel="annual volume change (%/year)")
    return figure


def _typical_map(result, structure: str):
    """The change map worth showing for a structure: the first interval (not a rescan) of the median-rate subject
    of the group that changes most."""
    rates = result.rates[result.rates["structure"] == structure].dropna(subset=["registration_rate"])
    if rates.empty:
        return None
    means = rates.groupby("group")["registration_rate"].mean()
    group = means.abs().idxmax()
    members = rates[rates["group"] == group].sort_values("registration_rate").reset_index(drop=True)
    subject = members.loc[len(members) // 2, "subject"]
    changes = result.changes[(result.changes["subject"] == subject) & (result.changes["structure"] == structure)]
    for _, row in changes.sort_values(["from_timepoint", "to_timepoint"]).iterrows():
        path = result.output / "subjects" / subject / row["map"]
        if row["interval_years"] > 0 and path.is_file():
            return subject, path, float(row["from_timepoint"]), float(row["to_timepoint"])
    return None


def _save(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=110)
    return path


def _html(result, parameters, table: Path, figures) -> str:
    """The report page: summary, group rates, figures, links to the tables, failures, parameters."""
    def frame(data, columns, digits=3) -> str:
        if data.empty:
            return "<p>(none)</p>"
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{_cell(row[c], digits)}</td>" for c in columns) + "</tr>"
                       for _, row in data.iterrows())
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    changes = result.changes
    intervals = changes[~changes["rescan"]] if not changes.empty else changes
    rescans = changes[changes["rescan"]] if not changes.empty else changes
    summary = [f"{result.scans['subject'].nunique() if not result.scans.empty else 0} subjects measured, "
               f"{len(result.failures)} failed; {len(result.scans)} scans, {len(intervals)} intervals"
               f"{f', {len(rescans)} same-day rescans' if len(rescans) else ''}."]
    if not changes.empty:
        summary.append(f"Direct vs registration-based change: median |difference| "
                       f"{changes['disagreement_pp'].abs().median():.3f} percentage points; forward/backward "
                       f"consistency: median {changes['consistency_pp'].abs().median():.3f} pp.")
    if len(rescans):
        summary.append(f"Rescans (no true change): median |registration-based change| "
                       f"{rescans['registration_percent'].abs().median():.3f}%, direct "
                       f"{rescans['direct_percent'].abs().median():.3f}%.")
    group_columns = [c for c in ("structure", "group", "n", "mean_rate", "ci_low", "ci_high", "difference",
                                 "p_value", "cohens_d") if c in result.groups.columns]
    pictures = "".join(f"<figure><h3>{html.escape(title)}</h3><img src=\"figures/{path.name}\" alt=\""
                       f"{html.escape(title)}\"><figcaption>{html.escape(caption)}</figcaption></figure>"
                       for title, caption, path in figures)
    links = " · ".join(f"<a href=\"{name}\">{name}</a>" for name in
                       ("scans.csv", "changes.csv", "rates.csv", "groups.csv", "scans.parquet", "changes.parquet",
                        "rates.parquet", "groups.parquet", "failures.csv", "warnings.csv"))
    failures = frame(result.failures, ["subject", "file", "error"])
    warnings = frame(result.warnings, ["subject", "structure", "path", "warning"])
    settings = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in asdict(parameters).items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>geomed longitudinal study</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}img{{max-width:100%}}figure{{margin:2em 0}}</style></head><body>
<h1>Longitudinal study</h1>
<p>Table <code>{html.escape(str(table))}</code>; geomed {__version__}.</p>
<p>{' '.join(html.escape(line) for line in summary)}</p>
<h2>Annual volume change by group (% per year, registration-based, 95% CI)</h2>
{frame(result.groups, group_columns)}
<h2>Figures</h2>{pictures}
<h2>Tables</h2><p>{links}; change maps: <code>subjects/&lt;subject&gt;/maps/*.vtp</code> (point arrays
<code>normal displacement</code> in mm and <code>area change</code>).</p>
<h2>Failed subjects</h2>{failures}
<h2>Warnings</h2><p>Scans measured after a repair (small holes of their surfaces closed):</p>{warnings}
<h2>Parameters</h2><ul>{settings}</ul>
</body></html>
"""


def _cell(value, digits: int) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{value:.{digits}g}" if abs(value) < 1e-3 else f"{value:.{digits}f}"
    return html.escape(str(value))
