r"""Longitudinal cohort studies: how fast each structure changes, and where, for every subject of a cohort, on Dask.

Input is a table (CSV or Parquet) with one row per scan:

=========== ==========================================================================================
subject     subject id (letters, digits, ``-``, ``_``, ``.``; it names the subject's output folder)
timepoint   years from any origin (numbers) or a date (ISO ``2021-03-15``; years from the subject's first)
path        a mesh (.vtp .vtk .stl .ply .obj .gii) or label map / mask (.nii.gz .nrrd .mha …); relative
            paths are relative to the table's folder
label       optional: the structure; for label maps, the label id or name to extract
group       optional: e.g. "control" / "patient" (group rates and their difference)
=========== ==========================================================================================

For each subject and structure the scans are sorted by time, and every consecutive pair is measured both ways:
a rigid Sinkhorn registration (:func:`geomed.register`) takes out the change of position, then the baseline
surface is carried along its normals onto the follow-up (:func:`geomed.morphometry.surface_change`). That gives
the **percent volume change** twice — *direct* (difference of enclosed volumes) and *registration-based*
(SIENA-like, the volume enclosed by the carried surface) — and a **change map** (normal displacement in mm, local
area change) on the baseline surface. The same is done backwards, follow-up onto baseline. A consistent method
has :math:`(1 + p_{AB}/100)(1 + p_{BA}/100) = 1`; the departure is reported as ``consistency_pp``
= :math:`p_{AB} + p_{BA} + p_{AB} p_{BA}/100` (the plain sum :math:`p_{AB} + p_{BA}` is not 0 even for exact
measurements: −3% then +3.09%). As SIENA measures in a halfway space, the reported ``registration_percent`` is
the symmetric estimate :math:`100(\sqrt{(1 + p_{AB}/100)/(1 + p_{BA}/100)} - 1)`, which is the same whichever
scan is called the baseline; ``forward_percent`` and ``backward_percent`` keep the two one-way estimates. Same-day
repeat scans (interval 0) give the rescan distribution.

Per subject and structure an **annualised rate** (% per year) is fitted to the log-volume trajectory, and per group
its mean with a 95% confidence interval; each group is compared with the reference group (Welch's t-test,
Cohen's d).

Subjects run as Dask tasks: in-process by default, or on an existing ``dask.distributed`` cluster
(``scheduler="tcp://host:8786"``; its workers must have geomed and see the input paths). A subject's results are
written as soon as it finishes, atomically, under ``output/subjects/<subject>``, keyed by the hash of its input
files, table rows and parameters: a re-run (after a crash, a kill or a new subject) skips finished subjects and
produces identical tables. Every per-subject step — checking its rows, reading, measuring, fitting, saving — turns
an error into a ``failures.csv`` row naming the subject, the file and the reason, and the others go on; only a
table no subject can be measured from (missing, unreadable, without the required columns or rows) stops a run.
Small holes of a scan's surface are closed and listed in ``warnings.csv``. One study at a time may use an output
folder (a lock); its tables and report are replaced together at the end.
"""

from .lock import OutputInUseError
from .measure import measure_subject
from .parameters import StudyParameters
from .run import StudyResult, run_study
from .statistics import annualised_rates, group_rates
from .table import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, read_study_table

__all__ = ["OPTIONAL_COLUMNS", "REQUIRED_COLUMNS", "OutputInUseError", "StudyParameters", "StudyResult",
           "annualised_rates", "group_rates", "measure_subject", "read_study_table", "run_study"]
