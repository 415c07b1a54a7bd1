"""Validation of the longitudinal atrophy pipeline (``geomed.study``) against the exact truth of a synthetic cohort.

``geomed.synthetic_cohort.synthetic_cohort`` writes real anatomy (left hippocampi of the Allen brain donors, the MNI lateral
ventricles, the knees' femoral cartilage, the LV myocardium) changed by a known smooth contraction each year, with a
random rigid repositioning and a 0.1 mm RMS boundary jitter at every scan and a same-day rescan of the baseline;
``run_study`` measures every consecutive interval both ways; ``SyntheticCohort.validate`` compares each with the
exact percent volume change of the written meshes. Per structure, and over all of them ("all"):

- ``error``: |registration-based percent volume change − truth| (pp) over the intervals with a true change (the
  rescans left out); ``direct_error`` the same for the direct estimate (difference of enclosed volumes: on meshes it
  is exact to float precision, as the truth is computed the same way);
- ``asymmetry``: |consistency_pp| = |(1 + p_AB/100)(1 + p_BA/100) − 1| in pp of the two one-way estimates, over all
  intervals (rescans included); ``naive_sum``: |p_AB + p_BA|, for reference (not 0 even for exact measurements);
- ``rescan``: |registration_percent| on the same-day rescans (true change 0);
- ``rate_error``: median |measured − simulated| annual rate of the subjects (%/yr);
- group detection: true mean annual rates per group (of the simulated subjects, ``truth.csv``), measured means,
  the measured difference patient − control with its Welch p-value and Cohen's d (the study's ``groups`` table),
  and the true difference;
- ``seconds``: "all": wall time of ``run_study``; a structure: the sum of its intervals' measuring times (both ways,
  inside the workers, which run side by side); ``seconds_per_interval`` = seconds / (intervals + rescans).

Medians and 90th percentiles are of absolute values. Goals (issue #7): error ≤ 0.1 pp median and ≤ 0.3 pp at the
90th percentile per structure; forward/backward asymmetry ≤ 0.05 pp. SIENA's published figures are printed for
comparison (literature, not run: whole-brain PBVC on MR images, so not a like-for-like comparison).

    python benchmarks/atrophy_validation.py [--subjects 4] [--structures ...] [--seed 0] [--workers 2]
                                            [--work DIR] [--out benchmarks/results]

``--scans images`` validates segmentations as users have them instead (issue #21): the same cohort's scans written
as NIfTI images (``synthetic_cohort(scans=...)``: the continuous shapes' exact partial volumes on grids repositioned
per scan, 1 mm brains, 0.365 × 0.365 × 0.7 mm oblique knees), once as thresholded **label maps** and once as
calibrated **probability maps** of the same scans, each measured by ``run_study``. Per structure and input: the
registration-based error, the direct error (difference of the surfaces' volumes), the plain voxel-count difference
of the label maps and the plain probability sum (on the same scans), and with ``--segmentation-noise`` the noise
floor (the error of the exact volumes of the same noisy maps). Written to
``atrophy_validation_images[_noiseX].{csv,md}``.

    python benchmarks/atrophy_validation.py --scans images [--subjects 2] [--years 0 1 2 3]
                                            [--structures hippocampus lateral_ventricles femoral_cartilage]
                                            [--segmentation-noise 0.1]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from geomed import __version__
from geomed.synthetic_cohort import STRUCTURES, synthetic_cohort
from geomed.study import run_study

GROUPS = ("control", "patient")
GOAL_MEDIAN_PP, GOAL_P90_PP, GOAL_ASYMMETRY_PP = 0.1, 0.3, 0.05
SIENA = (  # literature (issue #7): whole-brain PBVC of SIENA on MR images
    ("PBVC error vs known change", "~0.15–0.2 %"),
    ("same-day rescans, median |PBVC| (ADNI)", "0.35 %"),
    ("same-day rescans, 90th percentile |PBVC| (ADNI)", "1.37 %"),
)
# (column stem, unit) of the absolute spreads
SPREADS = (("error", "pp"), ("direct_error", "pp"), ("asymmetry", "pp"), ("naive_sum", "pp"), ("rescan", "percent"))
HEADER = ("structure", "intervals (rescans)", "\\|error\\| median / 90th (pp)", "\\|direct error\\| median / 90th (pp)",
          "\\|asymmetry\\| median / 90th (pp)", "\\|p_AB + p_BA\\| median / 90th (pp)",
          "rescan \\|PBVC\\| median / 90th (%)", "subjects' \\|rate error\\| median (%/yr)",
          "true rate control / patient (%/yr)", "measured control / patient (%/yr)", "difference measured (true)",
          "Welch p", "Cohen's d", "s / interval")

NOTE = ("Direct estimate: the difference of enclosed volumes, exact on meshes to float precision (the truth is "
        "computed the same way). s / interval: for a structure, its intervals' own measuring time (both ways, in "
        "workers running side by side); for all, the study's wall time per interval.")


def _abs_spread(values: pd.Series) -> tuple[float, float]:
    """Median and 90th percentile of the absolute values (NaN for none)."""
    values = np.abs(values.to_numpy(dtype=float))
    if not len(values):
        return float("nan"), float("nan")
    return float(np.median(values)), float(np.percentile(values, 90))


def _row(structure: str, validation: pd.DataFrame, rates: pd.DataFrame, truth: pd.DataFrame, groups: pd.DataFrame,
         seconds: float) -> dict:
    """One line of the results: accuracy, consistency, rescans, group detection and time of one structure (or all)."""
    changed, rescans = validation[~validation["rescan"]], validation[validation["rescan"]]
    sets = {"error": changed["error_pp"], "direct_error": changed["direct_error_pp"],
            "asymmetry": validation["consistency_pp"],
            "naive_sum": validation["forward_percent"] + validation["backward_percent"],
            "rescan": rescans["registration_percent"]}
    row = {"structure": structure, "intervals": len(changed), "rescans": len(rescans)}
    for stem, unit in SPREADS:
        row[f"{stem}_median_{unit}"], row[f"{stem}_p90_{unit}"] = _abs_spread(sets[stem])
    simulated = truth.drop_duplicates(["subject", "structure"]).set_index(["subject", "structure"])
    measured = rates.set_index(["subject", "structure"])["registration_rate"]
    errors = measured - simulated["annual_rate_percent"].loc[measured.index]
    row["rate_error_median_pp_per_year"] = _abs_spread(errors)[0]
    if structure != "all":
        true_rates = simulated.groupby("group")["annual_rate_percent"].mean()
        found = groups.set_index("group")
        for group in GROUPS:
            row[f"true_rate_{group}"] = true_rates.get(group, np.nan)
            row[f"measured_rate_{group}"] = found["mean_rate"].get(group, np.nan)
        patient = found.loc["patient"] if "patient" in found.index else pd.Series(dtype=float)
        row.update(difference=patient.get("difference", np.nan), true_difference=row["true_rate_patient"]
                   - row["true_rate_control"], p_value=patient.get("p_value", np.nan),
                   cohens_d=patient.get("cohens_d", np.nan))
    row.update(seconds=seconds, seconds_per_interval=seconds / max(1, len(validation)))
    return row


def _goals(table: pd.DataFrame) -> list[tuple[str, str, float, bool]]:
    """(goal, structure, measured, met) for each structure."""
    checks = []
    for row in table[table["structure"] != "all"].itertuples():
        checks += [(f"median |error| ≤ {GOAL_MEDIAN_PP} pp", row.structure, row.error_median_pp,
                    row.error_median_pp <= GOAL_MEDIAN_PP),
                   (f"90th percentile |error| ≤ {GOAL_P90_PP} pp", row.structure, row.error_p90_pp,
                    row.error_p90_pp <= GOAL_P90_PP),
                   (f"median |asymmetry| ≤ {GOAL_ASYMMETRY_PP} pp", row.structure, row.asymmetry_median_pp,
                    row.asymmetry_median_pp <= GOAL_ASYMMETRY_PP),
                   (f"90th percentile |asymmetry| ≤ {GOAL_ASYMMETRY_PP} pp", row.structure, row.asymmetry_p90_pp,
                    row.asymmetry_p90_pp <= GOAL_ASYMMETRY_PP)]
    return checks


def _pair(first: float, second: float, digits: int = 3) -> str:
    return f"{first:.{digits}f} / {second:.{digits}f}"


def _escaped(text: str) -> str:
    """Text for a markdown table cell (its bars escaped)."""
    return text.replace("|", "\\|")


def _markdown(table: pd.DataFrame, goals: list[tuple[str, str, float, bool]], machine: str, command: str,
              cohort_seconds: float) -> str:
    """The results as markdown: the command, the main table, the comparison with SIENA and the goals."""
    lines = [f"Command: `{command}` ({machine}; cohort written in {cohort_seconds:.0f} s).", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in table.itertuples():
        groups = ["—"] * 5 if row.structure == "all" else [
            _pair(row.true_rate_control, row.true_rate_patient, 2),
            _pair(row.measured_rate_control, row.measured_rate_patient, 2),
            f"{row.difference:.2f} ({row.true_difference:.2f})", f"{row.p_value:.2g}", f"{row.cohens_d:.1f}"]
        lines.append(" | ".join([
            f"| {row.structure}", f"{row.intervals} ({row.rescans})", _pair(row.error_median_pp, row.error_p90_pp),
            f"{row.direct_error_median_pp:.0e} / {row.direct_error_p90_pp:.0e}",
            _pair(row.asymmetry_median_pp, row.asymmetry_p90_pp), _pair(row.naive_sum_median_pp, row.naive_sum_p90_pp),
            _pair(row.rescan_median_percent, row.rescan_p90_percent), f"{row.rate_error_median_pp_per_year:.3f}",
            *groups, f"{row.seconds_per_interval:.1f} |"]))
    lines += ["", NOTE]
    every = table[table["structure"] == "all"].iloc[0]
    lines += ["", "| | SIENA (literature, whole-brain PBVC on MR images) | geomed here (all structures, meshes) |",
              "|---|---|---|",
              (f"| {_escaped(SIENA[0][0])} | {SIENA[0][1]} | median {every.error_median_pp:.3f} pp, 90th percentile "
               f"{every.error_p90_pp:.3f} pp |"),
              f"| {_escaped(SIENA[1][0])} | {SIENA[1][1]} | {every.rescan_median_percent:.3f} % |",
              f"| {_escaped(SIENA[2][0])} | {SIENA[2][1]} | {every.rescan_p90_percent:.3f} % |",
              "", "| goal (issue #7) | structure | measured (pp) | |", "|---|---|---|---|"]
    lines += [f"| {_escaped(goal)} | {structure} | {value:.3f} | {'met' if met else '**not met**'} |"
              for goal, structure, value, met in goals]
    return "\n".join(lines) + "\n"


def _print_tables(table: pd.DataFrame, goals: list[tuple[str, str, float, bool]]) -> None:
    shown = table.drop(columns=["cpus", "platform", "geomed"])
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(shown.set_index("structure").T.to_string(float_format=lambda v: f"{v:.4g}"))
    every = table[table["structure"] == "all"].iloc[0]
    print("\nSIENA (literature, not run; whole-brain PBVC on MR images) vs geomed here (meshes, all structures):")
    print(f"  {SIENA[0][0]:<48} SIENA {SIENA[0][1]:<12} geomed median {every.error_median_pp:.3f} pp, 90th "
          f"{every.error_p90_pp:.3f} pp")
    print(f"  {SIENA[1][0]:<48} SIENA {SIENA[1][1]:<12} geomed {every.rescan_median_percent:.3f} %")
    print(f"  {SIENA[2][0]:<48} SIENA {SIENA[2][1]:<12} geomed {every.rescan_p90_percent:.3f} %")
    print("\nGoals (issue #7):")
    for goal, structure, value, met in goals:
        print(f"  {goal:<38} {structure:<20} {value:8.4f}  {'met' if met else 'NOT MET'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", choices=("mesh", "images"), default="mesh",
                        help="meshes (default), or the same scans as label maps and as probability maps")
    parser.add_argument("--subjects", type=int, default=None, metavar="N",
                        help="subjects per group and anatomy (default: 4 for meshes, 2 for images)")
    parser.add_argument("--structures", nargs="+", choices=STRUCTURES, default=None, metavar="NAME",
                        help=f"structures to simulate (default: meshes all: {', '.join(STRUCTURES)}; images: "
                             f"{', '.join(IMAGE_STRUCTURES)})")
    parser.add_argument("--years", nargs="+", type=float, default=None, metavar="T",
                        help="scan times (default: meshes 0 1 2 and a rescan; images 0 1 2 3, no rescan)")
    parser.add_argument("--segmentation-noise", type=float, default=0.0, metavar="MM",
                        help="images: RMS of the smooth segmentation error of every scan (mm; default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic cohort")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="folder for atrophy_validation.csv and .md (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="subjects measured at once (default: run_study's)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the cohort and the study (default: a temporary folder, removed after); "
                             "subjects already measured there are reused, and the study's time is then not theirs")
    args = parser.parse_args()
    command = " ".join(["python", "benchmarks/atrophy_validation.py", *sys.argv[1:]])
    machine = f"{os.cpu_count()} CPUs, {platform.platform()}, geomed {__version__}"
    if args.scans == "images":
        _images(args, command, machine)
        return
    args.subjects = args.subjects or 4
    args.structures = args.structures or list(STRUCTURES)
    with tempfile.TemporaryDirectory(prefix="atrophy-validation-") as temporary:
        work = args.work or Path(temporary)
        start = time.perf_counter()
        cohort = synthetic_cohort(work / "cohort", subjects_per_group=args.subjects,
                                  structures=tuple(args.structures), seed=args.seed,
                                  **({"years": tuple(args.years)} if args.years else {}))
        cohort_seconds = time.perf_counter() - start
        statuses: Counter[str] = Counter()
        result = run_study(cohort.table, work / "study", workers=args.workers, report=False,
                           on_subject=lambda subject, status: statuses.update([status]))
        validation = cohort.validate(result.changes)
        truth = pd.read_csv(cohort.truth)
    if statuses["cached"]:
        print(f"note: {statuses['cached']} subject(s) were measured by an earlier run in {work}: the study's wall "
              "time does not include them", file=sys.stderr)
    if len(result.failures):
        print(f"warning: {len(result.failures)} subject(s) failed and are left out:\n"
              f"{result.failures.to_string(index=False)}", file=sys.stderr)
    changes = result.changes
    rows = [_row(name, validation[validation["structure"] == name], result.rates[result.rates["structure"] == name],
                 truth[truth["structure"] == name], result.groups[result.groups["structure"] == name],
                 float(changes.loc[changes["structure"] == name, "seconds"].sum()))
            for name in args.structures]
    rows.append(_row("all", validation, result.rates, truth, result.groups, result.timings["total"]))
    table = pd.DataFrame(rows).assign(cpus=os.cpu_count(), platform=platform.platform(), geomed=__version__)
    goals = _goals(table)
    _print_tables(table, goals)
    print(f"\ncohort written in {cohort_seconds:.1f} s; study {result.timings['total']:.1f} s for {len(validation)} "
          f"intervals ({machine})")
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "atrophy_validation.csv", index=False)
    (args.out / "atrophy_validation.md").write_text(_markdown(table, goals, machine, command, cohort_seconds),
                                                    encoding="utf-8")


IMAGE_STRUCTURES = ("hippocampus", "lateral_ventricles", "femoral_cartilage")
INPUTS = ("probability", "label_map")
# (column of SyntheticCohort.validate, stem in the results)
IMAGE_ERRORS = (("error_pp", "registration"), ("direct_error_pp", "direct"), ("voxel_count_error_pp", "voxel_count"),
                ("probability_sum_error_pp", "probability_sum"), ("floor_error_pp", "noise_floor"))
GOAL_PROBABILITY_PP, STRETCH_PROBABILITY_PP = 0.15, 0.1


def _images(args, command: str, machine: str) -> None:
    """Label maps and probability maps of the same scans, measured by the study: errors per structure and input."""
    structures = tuple(args.structures or IMAGE_STRUCTURES)
    years = tuple(args.years or (0.0, 1.0, 2.0, 3.0))
    rows, seconds = [], {}
    with tempfile.TemporaryDirectory(prefix="atrophy-validation-images-") as temporary:
        work = args.work or Path(temporary)
        for kind in INPUTS:
            start = time.perf_counter()
            cohort = synthetic_cohort(work / kind / "cohort", subjects_per_group=args.subjects or 2,
                                      structures=structures, years=years, rescan=False, scans=kind,
                                      segmentation_noise=args.segmentation_noise, seed=args.seed)
            seconds[f"{kind} cohort"] = time.perf_counter() - start
            result = run_study(cohort.table, work / kind / "study", workers=args.workers, report=False,
                               progress=False)
            seconds[f"{kind} study"] = result.timings["total"]
            if len(result.failures):
                print(f"warning: {len(result.failures)} subject(s) failed and are left out:\n"
                      f"{result.failures.to_string(index=False)}", file=sys.stderr)
            validation = cohort.validate(result.changes).assign(seconds=result.changes["seconds"].to_numpy())
            validation = validation[~validation["rescan"]]
            for structure in structures:
                chosen = validation[validation["structure"] == structure]
                row = {"structure": structure, "input": kind, "segmentation_noise_mm": args.segmentation_noise,
                       "intervals": len(chosen),
                       "true_change_min_percent": float(chosen["true_percent"].abs().min()),
                       "true_change_max_percent": float(chosen["true_percent"].abs().max())}
                for column, stem in IMAGE_ERRORS:
                    if column in chosen and (kind == "probability" or stem != "probability_sum"):
                        values = chosen[column].abs().to_numpy(dtype=float)
                        row.update({f"{stem}_median_pp": float(np.median(values)),
                                    f"{stem}_p90_pp": float(np.percentile(values, 90)),
                                    f"{stem}_max_pp": float(values.max())})
                row["seconds_per_interval"] = float(chosen["seconds"].mean())
                rows.append(row)
    table = pd.DataFrame(rows).assign(cpus=os.cpu_count(), platform=platform.platform(), geomed=__version__)
    goals = _image_goals(table)
    suffix = f"_noise{args.segmentation_noise:g}" if args.segmentation_noise else ""
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(table.drop(columns=["cpus", "platform", "geomed"]).set_index(["structure", "input"]).T
              .to_string(float_format=lambda v: f"{v:.4g}"))
    print("\nGoals (issue #21):")
    for goal, structure, value, met in goals:
        print(f"  {goal:<60} {structure:<20} {value:8.4f}  {'met' if met else 'NOT MET'}")
    print("\n" + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()) + f" ({machine})")
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / f"atrophy_validation_images{suffix}.csv", index=False)
    (args.out / f"atrophy_validation_images{suffix}.md").write_text(
        _image_markdown(table, goals, machine, command, seconds), encoding="utf-8")


def _image_goals(table: pd.DataFrame) -> list[tuple[str, str, float, bool]]:
    """(goal, structure, measured, met): the issue's goals for probability maps and label maps."""
    checks = []
    for structure, rows in table.groupby("structure", sort=False):
        by_input = rows.set_index("input")
        probability, label = by_input.loc["probability"], by_input.loc["label_map"]
        median = probability["registration_median_pp"]
        checks += [(f"probability maps: median |error| ≤ {GOAL_PROBABILITY_PP} pp", structure, median,
                    median <= GOAL_PROBABILITY_PP),
                   (f"probability maps: median |error| ≤ {STRETCH_PROBABILITY_PP} pp (stretch)", structure, median,
                    median <= STRETCH_PROBABILITY_PP),
                   ("probability maps: median ≤ ⅓ of the label maps' (ratio)", structure,
                    median / label["registration_median_pp"], median <= label["registration_median_pp"] / 3),
                   ("label maps: median |error| ≤ voxel count's (ratio)", structure,
                    label["registration_median_pp"] / label["voxel_count_median_pp"],
                    label["registration_median_pp"] <= label["voxel_count_median_pp"]),
                   ("label maps: max |error| ≤ voxel count's (ratio)", structure,
                    label["registration_max_pp"] / label["voxel_count_max_pp"],
                    label["registration_max_pp"] <= label["voxel_count_max_pp"])]
    return checks


def _image_markdown(table: pd.DataFrame, goals, machine: str, command: str, seconds: dict[str, float]) -> str:
    """The image results as markdown: command, one row per structure and input, the goals."""
    noisy = bool(table["segmentation_noise_mm"].iloc[0])
    header = ["structure", "input", "intervals (\\|true change\\| %)",
              "registration-based \\|error\\| median / 90th / max (pp)", "direct (surface volumes)",
              "voxel count of the label maps", "probability sum"]
    if noisy:
        header.append("noise floor (exact volume of the noisy maps)")
    header.append("s / interval")
    lines = [f"Command: `{command}` ({machine}; " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ").",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def spread(row, stem: str) -> str:
        if f"{stem}_median_pp" not in row or pd.isna(row[f"{stem}_median_pp"]):
            return "—"
        return " / ".join(f"{row[f'{stem}_{part}_pp']:.3f}" for part in ("median", "p90", "max"))

    for _, row in table.iterrows():
        cells = [row["structure"], row["input"].replace("_", " "),
                 f"{row['intervals']} ({row['true_change_min_percent']:.2f}–{row['true_change_max_percent']:.2f})",
                 spread(row, "registration"), spread(row, "direct"), spread(row, "voxel_count"),
                 spread(row, "probability_sum")]
        if noisy:
            cells.append(spread(row, "noise_floor"))
        cells.append(f"{row['seconds_per_interval']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| goal (issue #21) | structure | measured | |", "|---|---|---|---|"]
    lines += [f"| {_escaped(goal)} | {structure} | {value:.3f} | {'met' if met else '**not met**'} |"
              for goal, structure, value, met in goals]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
