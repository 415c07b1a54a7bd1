"""Subjects as Dask tasks: an in-process cluster by default, or an existing ``dask.distributed``
scheduler; each subject saved as soon as it finishes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .cache import cached_outcome, save_subject
from .measure import measure_subject
from .parameters import StudyParameters

logger = logging.getLogger(__name__)


def measure_on_dask(pending: dict, output: Path, parameters: StudyParameters, scheduler: str | None,
                    workers: int | None, progress: bool, outcomes: dict, on_subject) -> list[dict]:
    """Run the pending subjects on Dask; save each as it finishes (a subject that cannot be saved fails). Returns
    the failures (``subject``, ``file``, ``error``)."""
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    failures = []
    cluster = None
    dask_logger = logging.getLogger("distributed")
    dask_level = dask_logger.level
    if not logger.isEnabledFor(logging.DEBUG):  # Dask's INFO chatter (cluster start and stop) only when debugging
        dask_logger.setLevel(logging.WARNING)
    if scheduler is None:
        threads = workers or max(1, min(2, os.cpu_count() or 1))
        # The scheduler and the worker always serve HTTP (health, dashboard): both on free loopback ports, never on
        # the shared :8787 or on every interface (the tasks talk in-process).
        cluster = LocalCluster(processes=False, n_workers=1, threads_per_worker=threads,
                               dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0")
        client = Client(cluster, set_as_default=False)
    else:
        client = Client(scheduler, set_as_default=False)
    try:
        futures = {client.submit(measure_subject, subject, records, parameters, pure=False,
                                 key=f"geomed-subject-{subject}-{key[:16]}"): (subject, key)
                   for subject, (records, key) in pending.items()}
        with tqdm(total=len(futures), desc="subjects", unit="subject", disable=not progress) as bar:
            for future in as_completed(futures, loop=client.loop):
                subject, key = futures[future]
                try:
                    outcome = future.result()
                except Exception as error:  # the task itself was lost (a worker died, a cluster went away)
                    outcome = {"error": f"{type(error).__name__}: {error}"}
                future.release()
                if "error" not in outcome:
                    try:
                        save_subject(output, subject, key, outcome)
                        saved = cached_outcome(output, subject, key)
                        if saved is None:
                            raise OSError("the saved result.json cannot be read back")
                        outcomes[subject] = saved
                    except Exception as error:  # a full disk, a file name the file system refuses
                        outcome = {"error": f"saving to {output / 'subjects' / subject}: {type(error).__name__}: "
                                            f"{error}"}
                if "error" in outcome:
                    failures.append({"subject": subject, "file": outcome.get("file", ""), "error": outcome["error"]})
                    logger.error("subject %s failed: %s", subject, outcome["error"])
                    status = "failed"
                else:
                    status = "done"
                bar.update()
                if on_subject:
                    on_subject(subject, status)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        dask_logger.setLevel(dask_level)
    return failures
