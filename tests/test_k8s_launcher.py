"""The Kubernetes run launcher (resources/k8s_launcher.py) judges a practice's run held by a batch by
the batch's pod, so run monitoring leaves a syncing practice alone and fails one whose batch is gone.

A real Dagster instance on the embedded PostgreSQL, loaded from a dagster.yaml that names the
launcher with the Helm values' config, as the chart renders it; Dagster's own run monitoring
(`monitor_started_run`) acts on the launcher's answers. Kubernetes is the one stand-in
(`FakeKubernetes`, no cluster here): its API tells which Jobs exist and whether their pod runs.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter
from dagster._core.events import DagsterEvent
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._daemon.monitoring.run_monitoring import monitor_started_run
from dagster_k8s import K8sRunLauncher
from kubernetes.client import CoreV1EventList, V1Job, V1JobList, V1JobStatus, V1ObjectMeta, V1PodList
from kubernetes.client.rest import ApiException
from sqlalchemy.engine import make_url

from nvc_pipelines.store.db import ensure_database
from resources.batch import BATCH_TAG
from resources.k8s_launcher import BatchAwareK8sRunLauncher

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "nvc"  # the values' job_namespace


class FakeKubernetes:
    """What the launcher asks of Kubernetes' batch and core APIs, over a table of Jobs, each with its
    pod running or failed. No pods or events are listed. `asked` keeps the Jobs whose status was read."""

    def __init__(self) -> None:
        self.jobs: dict[str, V1JobStatus] = {}
        self.asked: list[str] = []
        self.failing: set[str] = set()  # Jobs whose status read fails (403: not retried by the client)

    def pod_running(self, run: DagsterRun) -> None:
        self.jobs[f"dagster-run-{run.run_id}"] = V1JobStatus(active=1, start_time=datetime.now(UTC))

    def pod_failed(self, run: DagsterRun) -> None:
        self.jobs[f"dagster-run-{run.run_id}"] = V1JobStatus(failed=1, start_time=datetime.now(UTC))

    def _job(self, name: str, namespace: str) -> V1Job | None:
        if namespace != NAMESPACE or name not in self.jobs:
            return None
        return V1Job(metadata=V1ObjectMeta(name=name, namespace=namespace), status=self.jobs[name])

    # BatchV1Api
    def read_namespaced_job_status(self, name: str, namespace: str, **_: Any) -> V1Job:
        self.asked.append(name)
        if name in self.failing:
            raise ApiException(status=403, reason="Forbidden")
        job = self._job(name, namespace)
        if job is None:
            raise ApiException(status=404, reason="Not Found")
        return job

    def list_namespaced_job(self, namespace: str, field_selector: str = "", **_: Any) -> V1JobList:
        job = self._job(field_selector.removeprefix("metadata.name="), namespace)
        return V1JobList(items=[job] if job else [])

    # CoreV1Api
    def list_namespaced_pod(self, namespace: str, **_: Any) -> V1PodList:
        return V1PodList(items=[])

    def list_namespaced_event(self, namespace: str, **_: Any) -> CoreV1EventList:
        return CoreV1EventList(items=[])


KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: not-a-real-token}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


@pytest.fixture
def instance(pg_server, tmp_path: Path) -> Iterator[DagsterInstance]:
    """A Dagster instance on its own database of the embedded PostgreSQL, whose run launcher is the
    one the Helm values name, with their config (outside a cluster: a kubeconfig that points nowhere)."""
    url = make_url(pg_server.get_uri()).set(drivername="postgresql+psycopg2", database=f"k8s_{uuid.uuid4().hex[:12]}")
    ensure_database(url)
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    custom = yaml.safe_load((ROOT / "deploy" / "helm" / "values.yaml").read_text())["runLauncher"]["config"][
        "customRunLauncher"
    ]
    config = {**custom["config"], "load_incluster_config": False, "kubeconfig_file": str(tmp_path / "kubeconfig")}
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        yaml.safe_dump(
            {
                "storage": {"postgres": {"postgres_url": url.render_as_string(hide_password=False)}},
                "run_launcher": {"module": custom["module"], "class": custom["class"], "config": config},
                "run_monitoring": {"enabled": True, "start_timeout_seconds": 300, "max_resume_run_attempts": 0},
                "telemetry": {"enabled": False},
            }
        )
    )
    with DagsterInstance.from_config(str(home)) as inst:
        yield inst


@pytest.fixture
def kubernetes(instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> FakeKubernetes:
    fake = FakeKubernetes()
    client = instance.run_launcher._api_client  # K8sRunLauncher's Kubernetes client: its two APIs are replaced
    monkeypatch.setattr(client, "batch_api", fake)
    monkeypatch.setattr(client, "core_api", fake)
    return fake


def started(instance: DagsterInstance, job_name: str, tags: dict[str, str] | None = None) -> DagsterRun:
    """A run as its worker leaves it once it starts: created, then RUN_START."""
    run = instance.add_run(DagsterRun(job_name=job_name, run_id=str(uuid.uuid4()), tags=tags or {}))
    instance.report_dagster_event(DagsterEvent(DagsterEventType.RUN_START.value, job_name=job_name), run.run_id)
    now = instance.get_run_by_id(run.run_id)
    assert now is not None and now.status == DagsterRunStatus.STARTED
    return now


def held_by(instance: DagsterInstance, batch_id: str, practice: str = "bright-eyes") -> DagsterRun:
    """A practice's run as `practice_sync_batch` starts it in its pod (schedules/jobs.py)."""
    return started(
        instance, "practice_sync", {BATCH_TAG: batch_id, "practice": practice, "dagster/partition": practice}
    )


def monitor(instance: DagsterInstance, run: DagsterRun) -> DagsterRun:
    """One pass of Dagster's run monitoring over `run` (as the daemon's, every 120 s); the run after it."""
    (record,) = instance.get_run_records(RunsFilter(run_ids=[run.run_id]))
    monitor_started_run(instance, None, record, logging.getLogger("test"))  # no workspace: it resumes no run
    now = instance.get_run_by_id(run.run_id)
    assert now is not None
    return now


def failure_message(instance: DagsterInstance, run: DagsterRun) -> str:
    (event,) = instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_FAILURE)
    return event.message


def test_the_instance_loads_the_launcher_the_helm_values_name(instance: DagsterInstance) -> None:
    launcher = instance.run_launcher
    assert type(launcher) is BatchAwareK8sRunLauncher and isinstance(launcher, K8sRunLauncher)
    assert launcher.supports_check_run_worker_health  # so run monitoring asks it
    assert (launcher.job_namespace, launcher.service_account_name) == (NAMESPACE, "dagster")
    assert launcher.env_secrets == ["nvc-pipelines"] and launcher.resources["limits"]["memory"] == "2Gi"


def test_a_practice_run_in_a_running_batch_is_as_healthy_as_the_batch_pod(
    instance: DagsterInstance, kubernetes: FakeKubernetes
) -> None:
    batch = started(instance, "practice_sync_batch", {"pms": "optix"})
    kubernetes.pod_running(batch)
    practice = held_by(instance, batch.run_id)

    health = instance.run_launcher.check_run_worker_health(practice)

    assert health.status == WorkerStatus.RUNNING
    # it looked for the practice's own Job (there is none), then at the batch's
    assert kubernetes.asked == [f"dagster-run-{practice.run_id}", f"dagster-run-{batch.run_id}"]
    # What dagster-k8s's launcher says of the same run, and why batches were off on Kubernetes before.
    plain = K8sRunLauncher.check_run_worker_health(instance.run_launcher, practice)
    assert plain == CheckRunHealthResult(WorkerStatus.UNKNOWN, f"Job dagster-run-{practice.run_id} could not be found")
    # Run monitoring leaves the practice's run (and its batch) going.
    assert monitor(instance, practice).status == DagsterRunStatus.STARTED
    assert monitor(instance, batch).status == DagsterRunStatus.STARTED


def _failed(instance: DagsterInstance, batch: DagsterRun) -> None:
    instance.report_run_failed(batch, "Run timed out")


def _succeeded(instance: DagsterInstance, batch: DagsterRun) -> None:
    instance.report_dagster_event(
        DagsterEvent(DagsterEventType.RUN_SUCCESS.value, job_name=batch.job_name), batch.run_id
    )


def _canceled(instance: DagsterInstance, batch: DagsterRun) -> None:
    instance.report_run_canceled(batch)


@pytest.mark.parametrize(
    "end, status",
    [(_failed, "FAILURE"), (_succeeded, "SUCCESS"), (_canceled, "CANCELED")],
    ids=["failed", "succeeded", "canceled"],
)
def test_a_practice_run_whose_batch_ended_is_failed_naming_the_batch(
    instance: DagsterInstance, kubernetes: FakeKubernetes, end, status: str
) -> None:
    batch = started(instance, "practice_sync_batch", {"pms": "optix"})
    kubernetes.pod_failed(batch)
    practice = held_by(instance, batch.run_id)
    end(instance, batch)

    health = instance.run_launcher.check_run_worker_health(practice)

    assert health == CheckRunHealthResult(
        WorkerStatus.FAILED,
        f"batch run {batch.run_id}, which held this run, is {status}: the process that ran it is gone",
    )
    after = monitor(instance, practice)
    assert after.status == DagsterRunStatus.FAILURE
    message = failure_message(instance, after)
    assert f"batch run {batch.run_id}, which held this run, is {status}" in message
    # the debug information is the batch's Job's, not a Job the practice's run never had
    assert f"This run was executed by batch run {batch.run_id}" in message
    assert f"Debug information for job dagster-run-{batch.run_id}" in message


def test_a_practice_run_whose_batch_is_not_in_the_instance_is_failed_naming_it(
    instance: DagsterInstance, kubernetes: FakeKubernetes
) -> None:
    gone = str(uuid.uuid4())
    practice = held_by(instance, gone)

    health = instance.run_launcher.check_run_worker_health(practice)

    assert health.status == WorkerStatus.FAILED
    assert (
        health.msg == f"batch run {gone}, which held this run, is not in the instance: the process that ran it is gone"
    )
    assert monitor(instance, practice).status == DagsterRunStatus.FAILURE


def test_a_practice_run_whose_batch_pod_died_is_failed_with_the_batch_pods_reason(
    instance: DagsterInstance, kubernetes: FakeKubernetes
) -> None:
    """The batch run still says STARTED, but its pod is gone (OOM-killed, node lost): dagster-k8s's
    check of the batch's Job, reported on the practice's run with the batch's id."""
    batch = started(instance, "practice_sync_batch", {"pms": "optix"})
    kubernetes.pod_failed(batch)
    practice = held_by(instance, batch.run_id)

    health = instance.run_launcher.check_run_worker_health(practice)

    assert health.status == WorkerStatus.FAILED
    assert health.msg == (
        f"held by batch run {batch.run_id}, whose worker is FAILED: 'Run has not completed but K8s job has no active pods'"
    )
    assert monitor(instance, practice).status == DagsterRunStatus.FAILURE
    assert monitor(instance, batch).status == DagsterRunStatus.FAILURE  # and the batch, by its own check


def test_a_practice_run_that_ended_while_checked_is_left_alone(
    instance: DagsterInstance, kubernetes: FakeKubernetes
) -> None:
    """Monitoring read the practice's run as STARTED; by the time the launcher looks, the batch has
    synced it and finished."""
    batch = started(instance, "practice_sync_batch", {"pms": "optix"})
    practice = held_by(instance, batch.run_id)
    _succeeded(instance, practice)
    _succeeded(instance, batch)

    health = instance.run_launcher.check_run_worker_health(practice)  # the STARTED copy

    assert health == CheckRunHealthResult(WorkerStatus.SUCCESS, f"ended (SUCCESS) in batch run {batch.run_id}")


def test_a_run_without_the_batch_tag_gets_k8s_run_launchers_check(
    instance: DagsterInstance, kubernetes: FakeKubernetes
) -> None:
    running = started(instance, "writeback", {"trigger": "writeback"})
    kubernetes.pod_running(running)
    lost = started(instance, "practice_sync", {"trigger": "sync_now", "practice": "bright-eyes"})
    dead = started(instance, "practice_sync_batch", {"pms": "optix"})
    kubernetes.pod_failed(dead)
    launcher = instance.run_launcher

    for run, status in ((running, WorkerStatus.RUNNING), (lost, WorkerStatus.UNKNOWN), (dead, WorkerStatus.FAILED)):
        health = launcher.check_run_worker_health(run)
        assert health == K8sRunLauncher.check_run_worker_health(launcher, run)
        assert health.status == status
    assert set(kubernetes.asked) == {f"dagster-run-{r.run_id}" for r in (running, lost, dead)}  # no batch looked up


def test_a_run_launched_with_a_practice_runs_tags_is_judged_by_its_own_job(
    instance: DagsterInstance, kubernetes: FakeKubernetes
) -> None:
    """A practice's run launched again from the UI's launchpad carries the tags it copied, `nvc/batch`
    too, but runs in a Job of its own: that Job is its worker, not the old batch's."""
    batch = started(instance, "practice_sync_batch", {"pms": "optix"})
    practice = held_by(instance, batch.run_id)
    _failed(instance, batch)
    _failed(instance, practice)
    again = started(instance, "practice_sync", dict(practice.tags))
    kubernetes.pod_running(again)
    launcher = instance.run_launcher

    assert launcher.check_run_worker_health(again).status == WorkerStatus.RUNNING
    assert monitor(instance, again).status == DagsterRunStatus.STARTED
    kubernetes.pod_failed(again)
    assert launcher.check_run_worker_health(again) == K8sRunLauncher.check_run_worker_health(launcher, again)
    assert f"batch run {batch.run_id}" not in (launcher.check_run_worker_health(again).msg or "")


def test_the_code_location_does_not_import_the_launcher() -> None:
    """Only the instance names the launcher: loading the definitions doesn't pay for dagster-k8s and
    the Kubernetes client."""
    modules = ("dagster_k8s", "kubernetes", "resources.k8s_launcher")
    code = f"import sys, nvc_pipelines.definitions; print([m for m in {modules!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _running_batch(instance: DagsterInstance, kubernetes: FakeKubernetes) -> tuple[DagsterRun, DagsterRun]:
    """A batch run whose pod runs, and a practice's run it holds."""
    batch = started(instance, "practice_sync_batch", {"pms": "optix"})
    kubernetes.pod_running(batch)
    return batch, held_by(instance, batch.run_id)


def test_a_failed_look_for_its_own_job_judges_a_held_run_by_its_batch(
    instance: DagsterInstance, kubernetes: FakeKubernetes
) -> None:
    """The API failing on the practice's own Job does not fail a run that syncs in a running batch."""
    _, practice = _running_batch(instance, kubernetes)
    kubernetes.failing.add(f"dagster-run-{practice.run_id}")

    assert instance.run_launcher.check_run_worker_health(practice).status == WorkerStatus.RUNNING
    assert monitor(instance, practice).status == DagsterRunStatus.STARTED


def test_terminating_a_held_run_is_refused_naming_its_batch(
    instance: DagsterInstance, kubernetes: FakeKubernetes
) -> None:
    batch, practice = _running_batch(instance, kubernetes)

    assert instance.run_launcher.terminate(practice.run_id) is False
    after = instance.get_run_by_id(practice.run_id)
    assert after is not None and after.status == DagsterRunStatus.STARTED  # not left CANCELING
    (event,) = [e for e in instance.all_logs(practice.run_id) if "Not terminated" in (e.message or "")]
    assert f"Terminate batch run {batch.run_id}" in event.message
