"""Annualised rates per subject and structure, and group means with confidence intervals and comparisons."""

from __future__ import annotations

import math

import numpy as np


def annualised_rates(scans, changes):
    """Per subject and structure, the annual percent volume change, registration-based and direct.

    The registration-based trajectory chains the intervals' changes, v_k = Π (1 + p_i/100), and the direct one
    uses the volumes; each rate is 100·(exp(b) − 1) for the least-squares slope b of ln v against years, which is
    exact for a constant annual rate (V_t = V_0 (1 + r/100)^t).
    """
    import pandas as pd

    rows = []
    if changes.empty:
        return pd.DataFrame(columns=["subject", "structure", "group", "scans", "years", "registration_rate",
                                     "direct_rate", "consistency_pp"])
    for (subject, structure), chain in changes.groupby(["subject", "structure"], sort=True):
        chain = chain.sort_values(["from_timepoint", "to_timepoint"])
        times = np.concatenate([[chain["from_timepoint"].iloc[0]], chain["to_timepoint"].to_numpy()])
        registration = np.concatenate([[0.0], np.cumsum(np.log1p(chain["registration_percent"].to_numpy() / 100))])
        direct = np.concatenate([[0.0], np.cumsum(np.log1p(chain["direct_percent"].to_numpy() / 100))])
        rows.append({"subject": subject, "structure": structure, "group": chain["group"].iloc[0],
                     "scans": len(times), "years": float(times.max() - times.min()),
                     "registration_rate": _rate(times, registration), "direct_rate": _rate(times, direct),
                     "consistency_pp": float(chain["consistency_pp"].abs().max())})
    return pd.DataFrame(rows)


def _rate(times: np.ndarray, log_volume: np.ndarray) -> float:
    if np.ptp(times) == 0:
        return float("nan")
    slope = np.polyfit(times, log_volume, 1)[0]
    return float(100.0 * np.expm1(slope))


def group_rates(rates, reference: str | None = None):
    """Per structure and group: mean annual rate with its 95% confidence interval; each group against the
    reference group ("control" if present, else the first): difference, Welch's t-test p-value, Cohen's d."""
    import pandas as pd
    from scipy import stats

    rows = []
    if rates.empty:
        return pd.DataFrame(columns=["structure", "group", "n", "mean_rate", "ci_low", "ci_high", "sd"])
    for structure, per_structure in rates.groupby("structure", sort=True):
        names = sorted(per_structure["group"].unique())
        base = reference if reference in names else ("control" if "control" in names else names[0])
        values = {name: per_structure.loc[per_structure["group"] == name, "registration_rate"].dropna().to_numpy()
                  for name in names}
        for name in names:
            sample = values[name]
            n, mean = len(sample), float(np.mean(sample)) if len(sample) else float("nan")
            sd = float(np.std(sample, ddof=1)) if n > 1 else float("nan")
            half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
            row = {"structure": structure, "group": name, "n": n, "mean_rate": mean, "ci_low": mean - half,
                   "ci_high": mean + half, "sd": sd, "reference": base}
            if name != base and n > 1 and len(values[base]) > 1:
                other = values[base]
                pooled = math.sqrt(((n - 1) * sd**2 + (len(other) - 1) * np.var(other, ddof=1))
                                   / (n + len(other) - 2))
                row.update(difference=mean - float(np.mean(other)),
                           p_value=float(stats.ttest_ind(sample, other, equal_var=False).pvalue),
                           cohens_d=(mean - float(np.mean(other))) / pooled if pooled > 0 else float("nan"))
            rows.append(row)
    return pd.DataFrame(rows)
