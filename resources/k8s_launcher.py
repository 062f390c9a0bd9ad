"""The run launcher on Kubernetes: dagster-k8s's `K8sRunLauncher`, with batch-held runs judged by
their batch.

A `practice_sync_batch` run is one Kubernetes Job (one pod). It executes each practice's
`practice_sync` run inside that pod, tagged `nvc/batch` with the batch's run id, so a practice's
run has no Job of its own. Run monitoring asks the launcher about the worker of every STARTED run;
K8sRunLauncher would look for the Job `dagster-run-<run id>`, not find it, and the practice's run
would be marked failed while it syncs. Here a run with the tag and no Job of its own is as healthy
as its batch run's worker:

- batch run STARTED (or CANCELING): K8sRunLauncher's own check of the batch run's Job;
- batch run missing, or ended while the practice's run still says STARTED: FAILED, naming the batch
  run (the process that held the run is gone, and nothing else will end it).

Any other run gets K8sRunLauncher's check unchanged: one without the tag (a batch, `nvc sync-now`, a
writeback), and one that carries the tag but has a Job of its own (launched with a practice's run's
tags, as the UI's launchpad copies them). Launching, terminating and everything else are
K8sRunLauncher's.

Only the instance names this class (the Helm chart's `runLauncher`, deploy/helm/values.yaml): the
daemon and the webserver load it from the image. The code location never imports this module, so
it does not pay for dagster-k8s and the Kubernetes client (about 0.8 s and 50 MB on import).
"""

from __future__ import annotations

from dagster import DagsterRun, DagsterRunStatus
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster_k8s import K8sRunLauncher
from dagster_k8s.job import get_job_name_from_run_id

from resources.batch import BATCH_TAG

# A batch run in these statuses still has its process: K8sRunLauncher's check looks at its Job.
LIVE = (DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING)


class BatchAwareK8sRunLauncher(K8sRunLauncher):
    """K8sRunLauncher, except that a run held by a batch (tag `nvc/batch`, no Job of its own) is
    judged by its batch run's worker."""

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        batch_id = self._holding_batch(run)
        if batch_id is None:
            return super().check_run_worker_health(run)
        batch = self._instance.get_run_by_id(batch_id)
        if batch is not None and batch.status in LIVE:
            health = super().check_run_worker_health(batch)
            if health.status == WorkerStatus.RUNNING:
                return health
            return health._replace(msg=f"held by batch run {batch_id}, whose worker is {health}")
        now = self._instance.get_run_by_id(run.run_id)
        if now is not None and now.is_finished:  # ended since the caller read it: nothing to judge
            return CheckRunHealthResult(WorkerStatus.SUCCESS, f"ended ({now.status.value}) in batch run {batch_id}")
        if batch is None:
            reason = f"batch run {batch_id}, which held this run, is not in the instance"
        else:
            reason = f"batch run {batch_id}, which held this run, is {batch.status.value}"
        return CheckRunHealthResult(WorkerStatus.FAILED, f"{reason}: the process that ran it is gone")

    def terminate(self, run_id: str) -> bool:
        """A batch-held run has no Job to delete, and stopping it alone would leave its batch-mates'
        process half way: refused, with where to stop it (the batch run). Others: K8sRunLauncher's."""
        run = self._instance.get_run_by_id(run_id)
        batch_id = None if run is None or run.is_finished else self._holding_batch(run)
        if run is None or batch_id is None:
            return bool(super().terminate(run_id))
        self._instance.report_engine_event(
            f"Not terminated: this run executes inside batch run {batch_id}'s pod and has no Job of its own. "
            f"Terminate batch run {batch_id} to stop it (its other practices stop too).",
            run,
            cls=self.__class__,
        )
        return False

    def get_run_worker_debug_info(self, run: DagsterRun, include_container_logs: bool | None = True) -> str | None:
        """For a batch-held run, the batch's pod (the practice's run has no Job to describe)."""
        batch_id = self._holding_batch(run)
        if batch_id is None:
            return super().get_run_worker_debug_info(run, include_container_logs)
        batch = self._instance.get_run_by_id(batch_id)
        if batch is None:
            return None
        info = super().get_run_worker_debug_info(batch, include_container_logs)
        return f"This run was executed by batch run {batch_id}, in its pod.\n{info or ''}".rstrip()

    def _holding_batch(self, run: DagsterRun) -> str | None:
        """The id of the batch run executing `run` in its pod, or None for a run with a worker of its
        own: no `nvc/batch` tag, or a Job of its own (launched with the tags copied)."""
        batch_id = run.tags.get(BATCH_TAG)
        if not batch_id:
            return None
        namespace = self.get_container_context_for_run(run).namespace
        job_name = get_job_name_from_run_id(run.run_id, resume_attempt_number=self._get_resume_attempt_number(run))
        try:
            own_job = self._api_client.get_job_status(namespace=namespace, job_name=job_name)
        except Exception:  # noqa: BLE001 - judged by the batch: if the API is down, that check says so
            return batch_id  # (K8sRunLauncher's own check would find no Job and fail a healthy run)
        return None if own_job is not None else batch_id
