"""deploy/helm/values.yaml uses only chart values we know, sets valid Kubernetes objects, renders a
valid Dagster instance that agrees with deploy/dagster.yaml, and matches deploy/Dockerfile and
docs/deploy.md.

No Helm and no network here, and nothing from the chart's repository is kept in this one. So:

- every key of the values file must be in CHART_VALUES, our own list of the chart values this
  deployment uses, each with its type (a misspelled key would be skipped by the chart's templates);
- the Kubernetes objects in it are checked against the Kubernetes client's models (field names,
  field types, required fields, quantities);
- the dagster.yaml the chart renders from it (its instance ConfigMap) is rebuilt here the way the
  chart's templates build it, and validated against Dagster's config schemas, the run launcher
  against dagster-k8s's, like tests/test_deploy.py does for deploy/dagster.yaml; what the two must
  agree on (queue limits, run retries, run monitoring, ...) is compared;
- the run launcher is ours (resources/k8s_launcher.py, batch-held runs judged by their batch), its
  config carries what the chart's template fills in for its own K8sRunLauncher, and the daemon and
  the webserver, which load it, run the code location's image.

Each check is a function returning its problems; every one has cases below that make it fail.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import importlib.metadata
import importlib.util
import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest
import yaml
from dagster._config import process_config
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import K8sRunLauncher
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from kubernetes.utils import parse_quantity

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
HELM = DEPLOY / "helm"
DOCS = ROOT / "docs" / "deploy.md"
RELEASE, NAMESPACE = "dagster", "nvc"  # as in docs/deploy.md's `helm upgrade --install`
APP_SECRET = "nvc-pipelines"
APP_SECRET_KEYS = ("NVC_DATABASE_URL", "NVC_SECRET_KEY", "NVC_SUPPRESSION_KEY")
# The store owner's login (migrations, administrative commands): the code server only, never a run pod.
OWNER_SECRET = "nvc-pipelines-owner"
OWNER_SECRET_KEY = "NVC_OWNER_DATABASE_URL"

CODE = "dagster-user-deployments.deployments[]"
CUSTOM = "runLauncher.config.customRunLauncher"
# The launcher's own config (dagster-k8s's K8sRunLauncher's, snake case), which the chart passes as it is.
K8S_CONFIG = f"{CUSTOM}.config"
QUEUED = "dagsterDaemon.runCoordinator.config.queuedRunCoordinator"
# A user deployment's readinessProbe: a Kubernetes Probe plus the chart's own `enabled` switch.
CHART_PROBE = "V1Probe with enabled"

# The chart values deploy/helm/values.yaml sets, and the type each takes. Written for this repository:
# it mirrors the documented values of Dagster's Helm chart (dagster/dagster) for 1.13.x (`helm show
# values dagster/dagster --version 1.13.27`), restricted to what this deployment uses. A key of the
# file that is not listed here fails the test (the chart's templates would ignore a misspelled key:
# an `envSecret` would silently drop the secrets), and so does an entry the file no longer sets. To
# use another chart value, look it up in the chart's values for the pinned version, add it here and,
# if it changes the instance, to render_instance below.
#
# `[]` is an item of a list. A type is one of the Kubernetes client's: `str`, `int`, `bool`,
# `list[...]`, `dict(str, ...)`, `object` (anything) or a model (`V1Probe`, checked field by field); a
# tuple lists the values this deployment supports (the renderer below handles only those).
CHART_VALUES: dict[str, str | tuple[str, ...]] = {
    "global.postgresqlSecretName": "str",
    # the code location (the dagster-user-deployments subchart)
    "dagster-user-deployments.enabled": "bool",
    "dagster-user-deployments.enableSubchart": "bool",
    f"{CODE}.name": "str",
    f"{CODE}.image.repository": "str",
    f"{CODE}.image.tag": "str",
    f"{CODE}.image.pullPolicy": ("Always", "IfNotPresent", "Never"),
    f"{CODE}.dagsterApiGrpcArgs": "list[str]",
    f"{CODE}.port": "int",
    f"{CODE}.includeConfigInLaunchedRuns.enabled": "bool",
    f"{CODE}.envSecrets": "list[V1SecretEnvSource]",
    f"{CODE}.volumes": "list[V1Volume]",
    f"{CODE}.volumeMounts": "list[V1VolumeMount]",
    f"{CODE}.resources": "V1ResourceRequirements",
    f"{CODE}.readinessProbe": CHART_PROBE,
    f"{CODE}.securityContext": "V1SecurityContext",
    # one Kubernetes Job per run, by our K8sRunLauncher (resources/k8s_launcher.py), named to the chart
    # as a custom launcher: the chart renders module, class and config as they are
    "runLauncher.type": ("CustomRunLauncher",),
    f"{CUSTOM}.module": "str",
    f"{CUSTOM}.class": "str",
    f"{K8S_CONFIG}.load_incluster_config": "bool",
    f"{K8S_CONFIG}.job_namespace": "str",
    f"{K8S_CONFIG}.image_pull_policy": ("Always", "IfNotPresent", "Never"),
    f"{K8S_CONFIG}.service_account_name": "str",
    f"{K8S_CONFIG}.dagster_home": "str",
    f"{K8S_CONFIG}.instance_config_map": "str",
    f"{K8S_CONFIG}.postgres_password_secret": "str",
    f"{K8S_CONFIG}.env_secrets": "list[str]",
    f"{K8S_CONFIG}.labels": "dict(str, str)",
    f"{K8S_CONFIG}.resources": "V1ResourceRequirements",
    f"{K8S_CONFIG}.security_context": "V1SecurityContext",
    # Dagster's storage: an external PostgreSQL
    "postgresql.enabled": "bool",
    "postgresql.postgresqlHost": "str",
    "postgresql.postgresqlUsername": "str",
    "postgresql.postgresqlPassword": "str",
    "postgresql.postgresqlDatabase": "str",
    "postgresql.postgresqlParams": "dict(str, object)",  # rendered, then checked by dagster-postgres
    "postgresql.service.port": "int",
    "generatePostgresqlPasswordSecret": "bool",
    # the daemon
    "dagsterDaemon.enabled": "bool",
    "dagsterDaemon.image.repository": "str",
    "dagsterDaemon.image.tag": "str",
    "dagsterDaemon.image.pullPolicy": ("Always", "IfNotPresent", "Never"),
    "dagsterDaemon.runCoordinator.enabled": "bool",
    "dagsterDaemon.runCoordinator.type": ("QueuedRunCoordinator",),
    f"{QUEUED}.maxConcurrentRuns": "int",
    f"{QUEUED}.dequeueIntervalSeconds": "int",
    f"{QUEUED}.tagConcurrencyLimits": "list[dict(str, object)]",  # rendered, then checked by Dagster
    "dagsterDaemon.runRetries.enabled": "bool",
    "dagsterDaemon.runRetries.maxRetries": "int",
    "dagsterDaemon.runRetries.retryOnAssetOrOpFailure": "bool",
    "dagsterDaemon.runMonitoring.enabled": "bool",
    "dagsterDaemon.runMonitoring.startTimeoutSeconds": "int",
    "dagsterDaemon.runMonitoring.pollIntervalSeconds": "int",
    "dagsterDaemon.runMonitoring.maxResumeRunAttempts": "int",
    "dagsterDaemon.sensors.useThreads": "bool",
    "dagsterDaemon.sensors.numWorkers": "int",
    "dagsterDaemon.schedules.useThreads": "bool",
    "dagsterDaemon.schedules.numWorkers": "int",
    "dagsterDaemon.resources": "V1ResourceRequirements",
    # the webserver
    "dagsterWebserver.replicaCount": "int",
    "dagsterWebserver.image.repository": "str",
    "dagsterWebserver.image.tag": "str",
    "dagsterWebserver.image.pullPolicy": ("Always", "IfNotPresent", "Never"),
    "dagsterWebserver.workspace.enabled": "bool",
    "dagsterWebserver.workspace.servers": "list[dict(str, object)]",  # see the code location test
    "dagsterWebserver.readinessProbe": "V1Probe",
    "dagsterWebserver.resources": "V1ResourceRequirements",
    "telemetry.enabled": "bool",
    "pythonLogs.pythonLogLevel": "str",
}

# The chart's defaults (same documented values) for what the rendering below reads and the values
# file leaves unset. Helm merges the values file over the defaults; so does with_chart_defaults.
CHART_DEFAULTS: dict[str, Any] = {
    "global": {"dagsterHome": "/opt/dagster/dagster_home", "serviceAccountName": ""},
    "serviceAccount": {"create": True, "name": ""},
    "scheduler": {"type": "DagsterDaemonScheduler"},
    "computeLogManager": {"type": "NoOpComputeLogManager"},
}


def our_values() -> dict:
    return yaml.safe_load((HELM / "values.yaml").read_text())


def at(values: dict, path: str) -> Any:
    """The value at a dotted path of CHART_VALUES (`[]` is the first, here the only, deployment)."""
    node: Any = values
    for key in path.split("."):
        node = node[key[:-2]][0] if key.endswith("[]") else node[key]
    return node


# ---------------------------------------------------------------------------------------------------
# Types: the Kubernetes client's type names, and its models field by field.

PRIMITIVES: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "object": lambda v: True,
    "datetime": lambda v: isinstance(v, str),
}


def type_problems(kind: str | tuple[str, ...], value: Any, where: str) -> list[str]:
    if isinstance(kind, tuple):
        return [] if value in kind else [f"{where}: {value!r} is not one of {kind}"]
    if kind == CHART_PROBE:
        if not isinstance(value, dict):
            return [f"{where}: expected a map, got {value!r}"]
        problems = type_problems("bool", value.get("enabled", False), f"{where}.enabled")
        return problems + type_problems("V1Probe", {k: v for k, v in value.items() if k != "enabled"}, where)
    if m := re.fullmatch(r"list\[(.+)\]", kind):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r}"]
        return [p for i, item in enumerate(value) for p in type_problems(m[1], item, f"{where}[{i}]")]
    if m := re.fullmatch(r"dict\(str, (.+)\)", kind):
        if not isinstance(value, dict):
            return [f"{where}: expected a map, got {value!r}"]
        return [p for key, item in value.items() for p in type_problems(m[1], item, f"{where}.{key}")]
    if kind in PRIMITIVES:
        return [] if PRIMITIVES[kind](value) else [f"{where}: expected {kind}, got {value!r}"]
    return model_problems(getattr(k8s, kind), value, where)


def model_problems(model: type, value: Any, where: str) -> list[str]:
    """`value` (the camelCase form, as in a manifest) against a Kubernetes client model: every key
    known, every field of its type, required fields present, resource quantities parseable."""
    if not isinstance(value, dict):
        return [f"{where}: expected a {model.__name__} map, got {value!r}"]
    fields = {json_name: attr for attr, json_name in model.attribute_map.items()}
    problems = [f"{where}: {model.__name__} has no field {key!r}" for key in value if key not in fields]
    for key, item in value.items():
        if key not in fields:
            continue
        if model is k8s.V1ResourceRequirements and key in ("requests", "limits"):
            problems += quantity_problems(item, f"{where}.{key}")
        else:
            problems += type_problems(model.openapi_types[fields[key]], item, f"{where}.{key}")
    if model is k8s.V1ResourceRequirements and not problems:
        for resource, request in (value.get("requests") or {}).items():
            limit = (value.get("limits") or {}).get(resource)
            if limit is not None and parse_quantity(request) > parse_quantity(limit):
                problems.append(f"{where}: {resource} request {request} is above its limit {limit}")
    if not problems:  # required fields, as the client builds the object (dagster-k8s's strict path)
        try:
            k8s_model_from_dict(model, k8s_snake_case_dict(model, value))
        except Exception as exc:  # noqa: BLE001 - dagster-k8s raises plain Exceptions
            problems.append(f"{where}: {exc}")
    return problems


def quantity_problems(quantities: Any, where: str) -> list[str]:
    if not isinstance(quantities, dict):
        return [f"{where}: expected a map of quantities, got {quantities!r}"]
    problems = []
    for resource, quantity in quantities.items():
        try:
            parse_quantity(quantity)
        except ValueError:
            problems.append(f"{where}.{resource}: {quantity!r} is not a Kubernetes quantity")
    return problems


# ---------------------------------------------------------------------------------------------------
# The values file's keys against CHART_VALUES.


def walk_values(values: dict) -> tuple[list[str], set[str]]:
    """The problems of the values file against CHART_VALUES, and the CHART_VALUES paths it sets."""
    problems: list[str] = []
    seen: set[str] = set()

    def walk(node: Any, path: str) -> None:
        if path in CHART_VALUES:
            seen.add(path)
            problems.extend(type_problems(CHART_VALUES[path], node, path))
        elif isinstance(node, dict) and node and any(p.startswith(f"{path}.") for p in CHART_VALUES):
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list) and node and any(p.startswith(f"{path}[]") for p in CHART_VALUES):
            for item in node:
                walk(item, f"{path}[]")
        else:
            problems.append(f"{path}: not a chart value this deployment uses (tests/test_helm.py CHART_VALUES)")

    for key, value in values.items():
        walk(value, key)
    return problems, seen


def value_problems(values: dict) -> list[str]:
    return walk_values(values)[0]


def unused_chart_values(values: dict) -> list[str]:
    return sorted(set(CHART_VALUES) - walk_values(values)[1])


def test_values_use_only_known_chart_values_with_their_types() -> None:
    assert value_problems(our_values()) == []


def test_every_listed_chart_value_is_set_by_the_file() -> None:
    assert unused_chart_values(our_values()) == []


def test_a_listed_chart_value_the_file_dropped_is_reported() -> None:
    values = our_values()
    del values["dagsterDaemon"]["runRetries"]["retryOnAssetOrOpFailure"]
    assert unused_chart_values(values) == ["dagsterDaemon.runRetries.retryOnAssetOrOpFailure"]


def _set(path: list, value: Any) -> Callable[[dict], None]:
    def change(values: dict) -> None:
        node = values
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


DEPLOYMENT = ["dagster-user-deployments", "deployments", 0]
LAUNCHER = ["runLauncher", "config", "customRunLauncher", "config"]
QUEUED_PATH = ["dagsterDaemon", "runCoordinator", "config", "queuedRunCoordinator"]


@pytest.mark.parametrize(
    "change",
    [
        # a misspelled top-level or section key
        _set(["dagsterDeamon"], {"enabled": True}),
        _set(["runLauncher", "config", "k8sLauncher"], {"envSecrets": [{"name": APP_SECRET}]}),
        _set(["dagsterDaemon", "runRetry"], {"enabled": True}),
        _set([*DEPLOYMENT, "includeConfigInLaunchedRun"], {"enabled": False}),
        # a misspelled key inside a section
        _set([*QUEUED_PATH, "maxConcurentRuns"], 40),
        _set([*LAUNCHER, "env_secret"], [APP_SECRET]),
        _set([*LAUNCHER, "envSecrets"], [{"name": APP_SECRET}]),  # the chart's K8sRunLauncher spelling
        _set([*DEPLOYMENT, "envSecret"], [{"name": APP_SECRET}]),
        _set(["dagsterDaemon", "runRetries", "retryOnOpFailure"], False),
        # a wrong type or an unsupported choice
        _set(["dagsterDaemon", "runRetries", "maxRetries"], "two"),
        _set(["dagsterDaemon", "runRetries", "retryOnAssetOrOpFailure"], "false"),
        _set([*DEPLOYMENT, "port"], "3030"),
        _set(["runLauncher", "type"], "K8sLauncher"),
        _set([*LAUNCHER, "image_pull_policy"], "IfNotPresnt"),
        _set(["runLauncher", "type"], "K8sRunLauncher"),  # would ignore customRunLauncher
        _set(["dagsterDaemon", "image", "pullPolicy"], "Allways"),
        # a Kubernetes object that the client's model rejects
        _set([*LAUNCHER, "resources"], {"request": {"memory": "1Gi"}}),
        _set([*DEPLOYMENT, "securityContext"], {"runAsNonRoot": "yes"}),
    ],
)
def test_a_misspelled_or_mistyped_value_is_caught(change: Callable[[dict], None]) -> None:
    values = our_values()
    change(values)
    assert value_problems(values) != []


# ---------------------------------------------------------------------------------------------------
# Kubernetes objects, against the Kubernetes client's models.


def test_kubernetes_objects_are_valid() -> None:
    values = our_values()
    checked = [path for path, kind in CHART_VALUES.items() if isinstance(kind, str) and re.search(r"V1\w+", kind)]
    assert len(checked) >= 11  # resources, probes, security contexts, volumes, secret refs
    for path in checked:
        assert type_problems(CHART_VALUES[path], at(values, path), path) == []


@pytest.mark.parametrize(
    "kind, value",
    [
        ("V1ResourceRequirements", {"request": {"memory": "1Gi"}}),
        ("V1ResourceRequirements", {"requests": {"memory": "lots"}}),
        ("V1ResourceRequirements", {"requests": "1Gi"}),
        ("V1ResourceRequirements", {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}),
        ("V1Probe", {"httpGet": {"path": "/server_info", "prot": 80}}),
        ("V1Probe", {"periodSeconds": "20"}),
        (CHART_PROBE, {"enabled": "yes", "periodSeconds": 20}),
        ("V1SecurityContext", {"runAsNonRoot": "yes"}),
        ("V1SecurityContext", {"runAsUser": "10001"}),
        ("list[V1Volume]", [{"configMap": {"name": "dagster-instance"}}]),  # no name
        ("list[V1VolumeMount]", [{"name": "dagster-instance", "mountpath": "/opt/nvc/instance"}]),
        ("list[V1SecretEnvSource]", [{"nam": APP_SECRET}]),
        ("list[V1EnvVar]", [{"name": "NVC_LOG_LEVEL", "value": 1}]),
    ],
)
def test_a_broken_kubernetes_object_is_caught(kind: str, value: Any) -> None:
    assert type_problems(kind, value, "here") != []


# ---------------------------------------------------------------------------------------------------
# The dagster.yaml the chart renders from the values (its instance ConfigMap).


def coalesce(defaults: dict, overrides: dict) -> dict:
    """Helm's merge of a values file over the chart's defaults: maps merge key by key, lists and
    scalars replace, and null deletes the default."""
    merged = copy.deepcopy(defaults)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = coalesce(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def with_chart_defaults(values: dict | None = None) -> dict:
    return coalesce(CHART_DEFAULTS, our_values() if values is None else values)


# The chart's `dagster.fullname` (no fullnameOverride or nameOverride in CHART_VALUES): the release
# name when it contains the chart's name `dagster`, as `dagster` does.
FULLNAME = RELEASE


def _names(sources: list[dict]) -> list[str]:
    return [source["name"] for source in sources if "name" in source]


def render_postgres(values: dict) -> dict:
    pg = values["postgresql"]
    assert pg["enabled"] is False, "only an external PostgreSQL is rendered here"
    return {
        "postgres_db": {
            "username": pg["postgresqlUsername"],
            "password": {"env": "DAGSTER_PG_PASSWORD"},
            "hostname": pg["postgresqlHost"],
            "db_name": pg["postgresqlDatabase"],
            "port": pg["service"]["port"],
            "params": pg["postgresqlParams"],
        }
    }


def chart_filled_launcher_config(values: dict) -> dict:
    """What the chart's K8sRunLauncher template writes into the launcher's config from the release and
    its global values (templates/helpers/instance/_run-launcher.tpl). A custom launcher's config is
    rendered as the values give it, so ours has to say each of these itself, with the same value."""
    account = values["global"]["serviceAccountName"] or values["serviceAccount"]["name"] or FULLNAME
    return {
        "job_namespace": NAMESPACE,  # jobNamespace unset: the release's namespace
        "service_account_name": account,
        # no `job_image`: run pods use the image of the code location that launched them
        "dagster_home": values["global"]["dagsterHome"],
        "instance_config_map": f"{FULLNAME}-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
    }


# Also in the launcher's config when it was the chart's K8sRunLauncher: what the template always writes
# (loadInclusterConfig, imagePullPolicy), and the run pods' settings this deployment gave it.
K8S_TEMPLATE_FIELDS = ("load_incluster_config", "image_pull_policy")
RUN_POD_FIELDS = ("env_secrets", "labels", "resources", "security_context")


def render_run_launcher(values: dict) -> dict:
    """The chart's CustomRunLauncher block: module, class and config as the values give them."""
    assert values["runLauncher"]["type"] == "CustomRunLauncher"
    custom = values["runLauncher"]["config"]["customRunLauncher"]
    return {"module": custom["module"], "class": custom["class"], "config": custom["config"]}


def render_run_coordinator(values: dict) -> dict:
    """The chart's QueuedRunCoordinator block (no `concurrency` block in the values)."""
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "QueuedRunCoordinator"
    queued = coordinator["config"]["queuedRunCoordinator"]
    rendered: dict[str, Any] = {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator"}
    if any(v is not None for v in queued.values()):
        limit = queued.get("maxConcurrentRuns")
        config: dict[str, Any] = {"max_concurrent_runs": -1 if limit is None else limit}
        if queued.get("tagConcurrencyLimits"):
            config["tag_concurrency_limits"] = queued["tagConcurrencyLimits"]
        if queued.get("dequeueIntervalSeconds"):
            config["dequeue_interval_seconds"] = queued["dequeueIntervalSeconds"]
        rendered["config"] = config
    return rendered


def render_instance(values: dict) -> dict:
    """The chart's instance ConfigMap (dagster.yaml) for this deployment's choices: daemon scheduler,
    custom run launcher, queued coordinator, no-op compute logs, external PostgreSQL."""
    daemon = values["dagsterDaemon"]
    assert values["scheduler"]["type"] == "DagsterDaemonScheduler"
    postgres = render_postgres(values)
    instance: dict[str, Any] = {
        "scheduler": {"module": "dagster.core.scheduler", "class": "DagsterDaemonScheduler"},
        "schedule_storage": {
            "module": "dagster_postgres.schedule_storage",
            "class": "PostgresScheduleStorage",
            "config": postgres,
        },
        "run_launcher": render_run_launcher(values),
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": postgres},
        "event_log_storage": {
            "module": "dagster_postgres.event_log",
            "class": "PostgresEventLogStorage",
            "config": postgres,
        },
    }
    if daemon["enabled"] and daemon["runCoordinator"]["enabled"]:
        instance["run_coordinator"] = render_run_coordinator(values)
    assert values["computeLogManager"]["type"] == "NoOpComputeLogManager"
    instance["compute_logs"] = {
        "module": "dagster.core.storage.noop_compute_log_manager",
        "class": "NoOpComputeLogManager",
    }
    monitoring = daemon.get("runMonitoring") or {}
    if daemon["enabled"] and monitoring.get("enabled"):
        instance["run_monitoring"] = {"enabled": True, "start_timeout_seconds": monitoring["startTimeoutSeconds"]}
        if monitoring.get("maxResumeRunAttempts") is not None:  # 0 is written out, not dropped
            instance["run_monitoring"]["max_resume_run_attempts"] = monitoring["maxResumeRunAttempts"]
        instance["run_monitoring"]["poll_interval_seconds"] = monitoring["pollIntervalSeconds"]
    retries = daemon.get("runRetries") or {}
    if daemon["enabled"] and retries.get("enabled"):
        instance["run_retries"] = {"enabled": True}
        if retries.get("maxRetries"):
            instance["run_retries"]["max_retries"] = retries["maxRetries"]
        if retries.get("retryOnAssetOrOpFailure") is not None:  # false is written out, not dropped
            instance["run_retries"]["retry_on_asset_or_op_failure"] = retries["retryOnAssetOrOpFailure"]
    for key in ("sensors", "schedules"):
        threads = daemon.get(key) or {}
        if daemon["enabled"] and threads.get("useThreads"):
            instance[key] = {"use_threads": True}
            if threads.get("numWorkers"):
                instance[key]["num_workers"] = threads["numWorkers"]
    instance["telemetry"] = {"enabled": values["telemetry"]["enabled"]}
    level = (values.get("pythonLogs") or {}).get("pythonLogLevel")
    if level:
        instance["python_logs"] = {"python_log_level": level}
    return instance


def instance_config(instance_yaml: dict, tmp_path: Path) -> dict:
    """Dagster's instance-level validation of a dagster.yaml (raises on a schema error)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml, sort_keys=False))
    config, _ = dagster_instance_config(str(tmp_path))
    return config


def check_configurable_class(section: dict) -> None:
    """Configurable classes are only checked when instantiated: check each against its own schema
    (the run launcher against dagster-k8s's K8sRunLauncher config)."""
    module = section["module"].replace("dagster.core.", "dagster._core.")  # Dagster's own alias
    cls = getattr(importlib.import_module(module), section["class"])
    checked = process_config(cls.config_type(), section.get("config") or {})
    assert checked.success, (section["class"], checked.errors)


CONFIGURABLE = (
    "scheduler",
    "schedule_storage",
    "run_launcher",
    "run_storage",
    "event_log_storage",
    "run_coordinator",
    "compute_logs",
)


def check_rendered_instance(values: dict, tmp_path: Path) -> dict:
    config = instance_config(render_instance(with_chart_defaults(values)), tmp_path)
    for key in CONFIGURABLE:
        check_configurable_class(config[key])
    return config


def test_rendered_instance_is_valid_dagster_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "not-a-real-password")
    config = check_rendered_instance(our_values(), tmp_path)
    launcher = config["run_launcher"]["config"]
    assert (config["run_launcher"]["module"], config["run_launcher"]["class"]) == (
        "resources.k8s_launcher",
        "BatchAwareK8sRunLauncher",
    )
    assert launcher["env_secrets"] == [APP_SECRET]
    assert launcher["instance_config_map"] == "dagster-instance"
    assert launcher["postgres_password_secret"] == "dagster-postgres"
    assert launcher["resources"]["limits"]["memory"] == "2Gi"
    db = config["run_storage"]["config"]["postgres_db"]
    assert db["password"] == {"env": "DAGSTER_PG_PASSWORD"} and db["params"]["sslmode"] == "require"
    assert config["run_retries"] == {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": False}


@pytest.mark.parametrize(
    "change",
    [
        # values that pass CHART_VALUES' types but not Dagster's schemas
        _set([*QUEUED_PATH, "tagConcurrencyLimits"], [{"key": "pms", "value": "optix", "limt": 10}]),
        _set([*QUEUED_PATH, "tagConcurrencyLimits"], [{"key": "pms", "value": "optix"}]),
        _set([*QUEUED_PATH, "tagConcurrencyLimits"], [{"key": "pms", "value": "optix", "limit": "10"}]),
        _set(
            [*QUEUED_PATH, "tagConcurrencyLimits"],
            [{"key": "pms", "value": {"applyLimitPerUniqueValue": "y"}, "limit": 1}],
        ),
    ],
)
def test_a_value_dagster_rejects_is_caught(tmp_path: Path, monkeypatch, change: Callable[[dict], None]) -> None:
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "not-a-real-password")
    values = our_values()
    change(values)
    with pytest.raises((AssertionError, DagsterInvalidConfigError)):
        check_rendered_instance(values, tmp_path)


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("run_launcher", "job_namespce", NAMESPACE),  # the K8sRunLauncher's schema, from dagster-k8s
        ("run_launcher", "image_pull_policy", 3),
        ("run_coordinator", "max_concurent_runs", 40),
        ("run_storage", "postgres", {}),
    ],
)
def test_a_broken_configurable_class_is_caught(section: str, key: str, value: Any) -> None:
    rendered = render_instance(with_chart_defaults())[section]
    rendered.setdefault("config", {})[key] = value
    with pytest.raises(AssertionError):
        check_configurable_class(rendered)


@pytest.mark.parametrize(
    "section, bad",
    [
        ("run_retries", {"retry_on_op_failure": False}),
        ("run_retries", {"retry_on_asset_or_op_failure": "no"}),
        ("run_monitoring", {"start_timeout_secs": 300}),
        ("sensors", {"num_workers": "four"}),
    ],
)
def test_a_broken_instance_setting_is_caught(tmp_path: Path, monkeypatch, section: str, bad: dict) -> None:
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "not-a-real-password")
    rendered = render_instance(with_chart_defaults())
    rendered[section].update(bad)
    with pytest.raises(DagsterInvalidConfigError):
        instance_config(rendered, tmp_path)


# ---------------------------------------------------------------------------------------------------
# The run launcher: ours, everywhere it is loaded, with all the chart would have given K8sRunLauncher.


def launcher_problems(values: dict, docs: str) -> list[str]:
    """The nightly's batches hold their practices' runs in the batch's pod, so run monitoring needs the
    launcher that judges those runs by their batch (resources/k8s_launcher.py). It is a custom launcher
    to the chart: its config must carry what the chart fills in for K8sRunLauncher, and the daemon and
    the webserver, which load it, must run the code location's image."""
    launcher = values["runLauncher"]
    if launcher["type"] != "CustomRunLauncher":
        return [f"runLauncher.type: {launcher['type']}, not resources.k8s_launcher's launcher: batches need it"]
    custom = launcher["config"]["customRunLauncher"]
    problems = []
    try:
        cls = getattr(importlib.import_module(custom["module"]), custom["class"])
    except (ImportError, AttributeError) as exc:
        return [f"{CUSTOM}: {custom['module']}.{custom['class']} can't be loaded: {exc}"]
    if not (isinstance(cls, type) and issubclass(cls, K8sRunLauncher)):
        problems.append(f"{CUSTOM}: {cls.__name__} is not a K8sRunLauncher")
    elif cls.check_run_worker_health is K8sRunLauncher.check_run_worker_health:
        problems.append(f"{CUSTOM}: {cls.__name__} checks a batch-held run as K8sRunLauncher does (no Job: failed)")
    config = custom.get("config") or {}
    for key, expected in chart_filled_launcher_config(with_chart_defaults(values)).items():
        if config.get(key) != expected:
            problems.append(f"{K8S_CONFIG}.{key}: {config.get(key)!r}, where the chart would give {expected!r}")
    problems += [f"{K8S_CONFIG}.{key}: missing" for key in (*K8S_TEMPLATE_FIELDS, *RUN_POD_FIELDS) if key not in config]
    code_image = at(values, f"{CODE}.image")
    for part in ("dagsterDaemon", "dagsterWebserver"):
        if values[part].get("image") != code_image:
            problems.append(f"{part}.image: not the code location's image, which holds the run launcher")
        problems += [
            f"docs/deploy.md doesn't set {part}.image.{key} on install"
            for key in ("repository", "tag")
            if f'--set "{part}.image.{key}=' not in docs
        ]
    return problems


def test_the_launcher_judges_batch_held_runs_and_has_what_the_chart_gave_k8s_run_launcher() -> None:
    assert launcher_problems(our_values(), DOCS.read_text()) == []


def _k8s_run_launcher(values: dict) -> None:
    values["runLauncher"] = {
        "type": "K8sRunLauncher",
        "config": {"k8sRunLauncher": {"envSecrets": [{"name": APP_SECRET}]}},
    }


@pytest.mark.parametrize(
    "change",
    [
        _k8s_run_launcher,  # a batch-held practice run would be marked failed while it syncs
        _set(["runLauncher", "config", "customRunLauncher", "module"], "dagster_k8s"),
        _set(["runLauncher", "config", "customRunLauncher", "class"], "K8sRunLauncher"),
        _set(["runLauncher", "config", "customRunLauncher", "class"], "BatchAwareLauncher"),
        _set([*LAUNCHER, "job_namespace"], "default"),  # K8sRunLauncher's default, not the release's
        _set([*LAUNCHER, "service_account_name"], "nvc"),
        _set([*LAUNCHER, "instance_config_map"], "nvc-instance"),
        _set([*LAUNCHER, "postgres_password_secret"], "dagster-pg"),
        lambda values: values["runLauncher"]["config"]["customRunLauncher"]["config"].pop("dagster_home"),
        lambda values: values["runLauncher"]["config"]["customRunLauncher"]["config"].pop("security_context"),
        _set(["dagsterDaemon", "image", "repository"], "dagster/dagster-celery-k8s"),  # the chart's: no launcher
        _set(["dagsterWebserver", "image", "tag"], "1.13.27"),
    ],
)
def test_a_launcher_that_would_fail_batches_or_lose_settings_is_caught(change: Callable[[dict], None]) -> None:
    values = our_values()
    change(values)
    assert launcher_problems(values, DOCS.read_text()) != []


def test_docs_that_leave_the_daemon_on_the_charts_image_are_caught() -> None:
    docs = DOCS.read_text()
    assert launcher_problems(our_values(), docs.replace('--set "dagsterDaemon.image.tag=', "")) != []


# ---------------------------------------------------------------------------------------------------
# The rendered instance agrees with deploy/dagster.yaml.


def policy(config: dict) -> dict:
    """What deploy/dagster.yaml and the chart must agree on, from Dagster's processed instance config
    (its defaults applied where a side leaves a field out)."""
    coordinator = config["run_coordinator"]
    queued = coordinator.get("config") or {}
    storage = config.get("run_storage") or {"config": config["storage"]["postgres"]}
    monitoring = config.get("run_monitoring") or {}
    retries = config.get("run_retries") or {}
    return {
        "run_coordinator": coordinator["class"],
        "max_concurrent_runs": queued.get("max_concurrent_runs"),
        "dequeue_interval_seconds": queued.get("dequeue_interval_seconds"),
        "tag_concurrency_limits": queued.get("tag_concurrency_limits"),
        "run_retries": (
            retries.get("enabled", False),
            retries.get("max_retries", 0),
            retries.get("retry_on_asset_or_op_failure", True),
        ),
        "run_monitoring": (
            monitoring.get("enabled", False),
            monitoring.get("start_timeout_seconds"),
            monitoring.get("max_resume_run_attempts", 0),  # Dagster's default when unset
        ),
        "sensors": config.get("sensors"),
        "schedules": config.get("schedules"),
        "telemetry": config.get("telemetry"),
        "python_log_level": (config.get("python_logs") or {}).get("python_log_level"),
        "postgres_params": storage["config"]["postgres_db"].get("params"),
    }


def deploy_policy(tmp_path: Path) -> dict:
    return policy(instance_config(yaml.safe_load((DEPLOY / "dagster.yaml").read_text()), tmp_path / "deploy"))


def drift(values: dict, tmp_path: Path) -> dict:
    """Where the chart's instance differs from deploy/dagster.yaml: {field: (helm, dagster.yaml)}."""
    helm = policy(instance_config(render_instance(with_chart_defaults(values)), tmp_path / "helm"))
    mine = deploy_policy(tmp_path)
    return {key: (helm[key], mine[key]) for key in helm if helm[key] != mine[key]}


def test_helm_and_deploy_dagster_yaml_agree(tmp_path: Path, pg_env) -> None:
    assert drift(our_values(), tmp_path) == {}
    limits = at(our_values(), f"{QUEUED}.tagConcurrencyLimits")
    assert {(lim["key"], lim.get("value")) for lim in limits} >= {
        ("pms", kind) for kind in ("optix", "acuitas", "optisoft", "sycle", "csv")
    }


def test_runs_are_retried_only_when_they_fail_outside_their_steps(tmp_path: Path, pg_env) -> None:
    """The decision both files carry: a run whose pod dies is retried twice; a run that failed in a
    step is not (PMS hiccups are retried inside the run; a wrong key would fail three times and
    raise three alerts in a row)."""
    assert deploy_policy(tmp_path)["run_retries"] == (True, 2, False)
    assert "retryOnAssetOrOpFailure: false" in DOCS.read_text()


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda q, d: q["tagConcurrencyLimits"][1].update(limit=9), "tag_concurrency_limits"),
        (lambda q, d: q["tagConcurrencyLimits"].pop(), "tag_concurrency_limits"),
        (lambda q, d: q.update(maxConcurrentRuns=50), "max_concurrent_runs"),
        (lambda q, d: q.update(dequeueIntervalSeconds=5), "dequeue_interval_seconds"),
        (lambda q, d: d["runRetries"].update(maxRetries=3), "run_retries"),
        (lambda q, d: d["runRetries"].update(retryOnAssetOrOpFailure=True), "run_retries"),
        (lambda q, d: d["runRetries"].pop("retryOnAssetOrOpFailure"), "run_retries"),  # Dagster's default: true
        (lambda q, d: d["runRetries"].update(enabled=False), "run_retries"),
        (lambda q, d: d["runMonitoring"].update(startTimeoutSeconds=600), "run_monitoring"),
        (lambda q, d: d["runMonitoring"].update(maxResumeRunAttempts=1), "run_monitoring"),
        (lambda q, d: d["sensors"].update(numWorkers=8), "sensors"),
        (lambda q, d: d["schedules"].update(useThreads=False), "schedules"),
    ],
)
def test_a_drift_from_deploy_dagster_yaml_is_caught(tmp_path: Path, pg_env, change, field: str) -> None:
    values = our_values()
    daemon = values["dagsterDaemon"]
    change(daemon["runCoordinator"]["config"]["queuedRunCoordinator"], daemon)
    assert value_problems(values) == []  # still a valid values file, just a different policy
    assert field in drift(values, tmp_path)


def test_a_drift_in_postgres_params_or_telemetry_is_caught(tmp_path: Path, pg_env) -> None:
    values = our_values()
    values["postgresql"]["postgresqlParams"] = {"sslmode": "prefer"}
    values["telemetry"]["enabled"] = True
    assert {"postgres_params", "telemetry"} <= set(drift(values, tmp_path))


# ---------------------------------------------------------------------------------------------------
# No secret in the values: they come from Kubernetes Secrets the docs create.

# A connection URL with a password, or a key as nvc_pipelines.crypto.generate_key writes it.
SECRET_LOOKING = re.compile(r"\w+://[^/@\s:]+:[^/@\s]+@|^[A-Za-z0-9+/_-]{43}=$")
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|DATABASE_URL|WEBHOOK", re.IGNORECASE)


def _strings(node: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in _strings(value, f"{path}.{key}".lstrip("."))]
    if isinstance(node, list):
        return [s for i, item in enumerate(node) for s in _strings(item, f"{path}[{i}]")]
    return [(path, node)] if isinstance(node, str) else []


def secret_problems(values: dict, code_text: str, docs: str) -> list[str]:
    problems = [f"{path}: looks like a secret" for path, text in _strings(values) if SECRET_LOOKING.search(text)]
    if values["generatePostgresqlPasswordSecret"] is not False:
        problems.append("generatePostgresqlPasswordSecret: the chart would hold the password in the values")
    if values["postgresql"]["postgresqlPassword"] != "":
        problems.append("postgresql.postgresqlPassword: set in the values")
    code = at(values, CODE)
    problems += [
        f"{CODE}.env: {e['name']} is written in the values"
        for e in code.get("env") or []
        if SECRET_NAMES.search(e.get("name", "")) and "value" in e
    ]
    # Both the code server (sensors, schedule) and every run pod get the app's secrets from the Secret;
    # the owner's login goes to the code server only (migrations, operators' commands), never to a run.
    if _names(at(values, f"{CODE}.envSecrets")) != [APP_SECRET, OWNER_SECRET]:
        problems.append(f"{CODE}.envSecrets: should be exactly the Secrets {APP_SECRET} and {OWNER_SECRET}")
    if at(values, f"{K8S_CONFIG}.env_secrets") != [APP_SECRET]:
        problems.append(f"{K8S_CONFIG}.env_secrets: should be exactly the Secret {APP_SECRET} (no owner login)")
    if code["includeConfigInLaunchedRuns"] != {"enabled": False}:
        problems.append("includeConfigInLaunchedRuns: run pods are sized by runLauncher, not the code server")
    # The names are the ones the code reads, and the docs create the Secrets with them.
    for name in (*APP_SECRET_KEYS, OWNER_SECRET_KEY):
        if f'"{name}"' not in code_text:
            problems.append(f"the code no longer reads {name}")
        if f"--from-file={name}=" not in docs:
            problems.append(f"docs/deploy.md doesn't create {name}")
    for secret, key in (
        (APP_SECRET, None),
        (OWNER_SECRET, OWNER_SECRET_KEY),
        (values["global"]["postgresqlSecretName"], "postgresql-password"),
    ):
        if f"kubectl create secret generic {secret}" not in docs or (key and f"--from-file={key}=" not in docs):
            problems.append(f"docs/deploy.md doesn't create the Secret {secret}")
    return problems


def _app_code() -> str:
    return "".join(p.read_text() for p in (ROOT / "nvc_pipelines").glob("*.py"))


def test_no_secret_is_written_in_the_values() -> None:
    assert secret_problems(our_values(), _app_code(), DOCS.read_text()) == []


@pytest.mark.parametrize(
    "change",
    [
        _set([*DEPLOYMENT, "env"], [{"name": "NVC_SECRET_KEY", "value": "not-a-real-key"}]),
        _set([*DEPLOYMENT, "env"], [{"name": "NVC_LOG", "value": "postgresql://nvc:hunter2@db/nvc"}]),
        _set([*DEPLOYMENT, "env"], [{"name": "NVC_KEY_COPY", "value": "5m+HU3LOf6ZKcQG5oCK5Im/eDgW85KqVEeYw9t+gXaM="}]),
        _set(["postgresql", "postgresqlPassword"], "hunter2"),
        _set(["generatePostgresqlPasswordSecret"], True),
        _set([*LAUNCHER, "env_secrets"], []),
        _set([*DEPLOYMENT, "envSecrets"], [{"name": "nvc"}]),
        _set([*DEPLOYMENT, "envSecrets"], [{"name": APP_SECRET}]),
        _set([*LAUNCHER, "env_secrets"], [APP_SECRET, OWNER_SECRET]),
        _set([*DEPLOYMENT, "includeConfigInLaunchedRuns"], {"enabled": True}),
        _set(["global", "postgresqlSecretName"], "dagster-pg"),  # not the Secret the docs create
    ],
)
def test_an_inline_or_missing_secret_is_caught(change: Callable[[dict], None]) -> None:
    values = our_values()
    change(values)
    assert secret_problems(values, _app_code(), DOCS.read_text()) != []


def test_secret_names_missing_from_the_code_or_docs_are_caught() -> None:
    docs = DOCS.read_text()
    assert secret_problems(our_values(), _app_code().replace('"NVC_SUPPRESSION_KEY"', ""), docs) != []
    assert secret_problems(our_values(), _app_code(), docs.replace("--from-file=NVC_SECRET_KEY=", "")) != []


def test_a_value_that_only_names_a_secret_is_not_flagged() -> None:
    values = our_values()
    values["dagster-user-deployments"]["deployments"][0]["env"] = [
        {"name": "NVC_ALERT_WEBHOOK_URL", "valueFrom": {"secretKeyRef": {"name": APP_SECRET, "key": "webhook"}}},
        {"name": "NVC_DATABASE_HOST", "value": "db.internal"},
    ]
    assert secret_problems(values, _app_code(), DOCS.read_text()) == []


# ---------------------------------------------------------------------------------------------------
# The values agree with the code location, the pins, the image and the docs.


def code_location_problems(values: dict) -> list[str]:
    problems = []
    code = at(values, CODE)
    args = code["dagsterApiGrpcArgs"]
    module, attribute = args[args.index("--module-name") + 1], args[args.index("--attribute") + 1]
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    if (module, attribute) != (workspace["module_name"], workspace["attribute"]):
        problems.append(f"the code server loads {module}:{attribute}, workspace.yaml another")
    if importlib.util.find_spec(module) is None:
        problems.append(f"{module} is not importable")
    # The webserver's workspace keeps the location's name (underscores aren't allowed in Kubernetes names).
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    expected = {"host": code["name"], "port": code["port"], "name": pyproject["tool"]["dagster"]["code_location_name"]}
    if values["dagsterWebserver"]["workspace"]["servers"] != [expected]:
        problems.append(f"dagsterWebserver.workspace.servers should be [{expected}]")
    if expected["name"] != workspace["location_name"]:
        problems.append("workspace.yaml and pyproject.toml name the code location differently")
    # The instance mounted for operator commands is the release's instance ConfigMap.
    mounted = [v["configMap"]["name"] for v in code["volumes"] if "configMap" in v]
    if mounted != [f"{FULLNAME}-instance"]:
        problems.append(f"the code server mounts {mounted}, not the release's instance ConfigMap")
    if f"helm upgrade --install {RELEASE} dagster/dagster" not in DOCS.read_text():
        problems.append(f"docs/deploy.md doesn't install the release {RELEASE}")
    return problems


def test_the_code_location_is_the_one_the_repo_defines() -> None:
    assert code_location_problems(our_values()) == []


@pytest.mark.parametrize(
    "change",
    [
        _set([*DEPLOYMENT, "dagsterApiGrpcArgs"], ["--module-name", "nvc_pipelines.defs", "--attribute", "defs"]),
        _set([*DEPLOYMENT, "dagsterApiGrpcArgs"], ["--module-name", "nvc_pipelines.definitions", "--attribute", "d"]),
        _set(["dagsterWebserver", "workspace", "servers"], [{"host": "nvc-pipelines", "port": 3030, "name": "nvc"}]),
        _set([*DEPLOYMENT, "port"], 4000),  # the webserver would call the old port
        _set([*DEPLOYMENT, "volumes"], [{"name": "dagster-instance", "configMap": {"name": "nvc-instance"}}]),
    ],
)
def test_a_wrong_code_location_is_caught(change: Callable[[dict], None]) -> None:
    values = our_values()
    change(values)
    assert code_location_problems(values) != []


def pins(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        if "==" in line:
            name, version = line.split("==")
            found[name.strip().lower().replace("_", "-")] = version.strip()
    return found


def version_problems(constraints: str, texts: dict[str, str]) -> list[str]:
    pinned = pins(constraints)
    problems = [
        f"{where} doesn't install the chart at the pinned dagster {pinned['dagster']}"
        for where, text in texts.items()
        if f"--version {pinned['dagster']}" not in text
    ]
    # dagster-k8s (run pods, these tests) is the integration release paired with the pinned dagster.
    if pinned.get("dagster-k8s") != pinned.get("dagster-postgres"):
        problems.append("dagster-k8s and dagster-postgres are from different Dagster releases")
    return problems


def _version_texts() -> dict[str, str]:
    return {"docs/deploy.md": DOCS.read_text(), "deploy/helm/values.yaml": (HELM / "values.yaml").read_text()}


def test_chart_version_matches_the_pinned_dagster() -> None:
    constraints = (ROOT / "constraints.txt").read_text()
    assert version_problems(constraints, _version_texts()) == []
    assert importlib.metadata.version("dagster") == pins(constraints)["dagster"]  # what these tests ran


def test_a_chart_version_drift_is_caught() -> None:
    constraints = (ROOT / "constraints.txt").read_text()
    assert version_problems(re.sub(r"^dagster==.*$", "dagster==1.13.28", constraints, flags=re.M), _version_texts())
    assert version_problems(re.sub(r"^dagster-k8s==.*$", "dagster-k8s==0.29.26", constraints, flags=re.M), {})


DEV_ONLY_PACKAGES = ("sandboxes",)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_problems(dockerfile: str, dockerignore: str, values: dict) -> list[str]:
    problems = []
    steps = dockerfile_instructions(dockerfile)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    base = next(arg for op, arg in steps if op == "FROM")
    if not re.fullmatch(r"python:3\.11[-.\w]*", base) or pyproject["project"]["requires-python"] != ">=3.11":
        problems.append(f"the base image {base} is not the Python the project requires")
    copied = [src for op, arg in steps if op == "COPY" for src in arg.split()[:-1]]
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    product = [p for p in packages if p not in DEV_ONLY_PACKAGES]
    for needed in ("pyproject.toml", "constraints.txt", pyproject["project"]["readme"], *product):
        if needed not in copied:
            problems.append(f"the Dockerfile doesn't copy {needed}")
    for dev_only in DEV_ONLY_PACKAGES:  # the PMS sandboxes stand beside the product, not in its image
        if any(src.strip("./") == dev_only for src in copied):
            problems.append(f"the image carries {dev_only}, which is for tests, the demo and benchmarks")
    if any(re.match(r"faker\b", dep, re.I) for dep in pyproject["project"]["dependencies"]):
        problems.append("Faker (the sandboxes' seed data) is a runtime dependency of the image")
    ignored = [line.strip() for line in dockerignore.splitlines() if line.strip() and not line.startswith("#")]
    for source in copied:
        if any(fnmatch.fnmatch(source, pattern) for pattern in ignored):
            problems.append(f"{source} is copied but excluded by Dockerfile.dockerignore")
    installs = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    if len(installs) != 1 or "-c constraints.txt" not in installs[0] or '".[k8s]"' not in installs[0]:
        problems.append("the image isn't installed once, with the constraints and the k8s extra")
    if pyproject["project"]["optional-dependencies"].get("k8s") != ["dagster-k8s"]:
        problems.append("the k8s extra isn't dagster-k8s")
    user = next((arg for op, arg in steps if op == "USER"), "0")
    if not user.isdigit() or user == "0":  # runAsNonRoot needs a numeric non-root user
        problems.append(f"USER {user}: not a numeric non-root user")
    cmd = json.loads(next(arg for op, arg in steps if op == "CMD"))
    code = at(values, CODE)
    args = code["dagsterApiGrpcArgs"]
    if cmd[:3] != ["dagster", "api", "grpc"]:
        problems.append("the image doesn't run `dagster api grpc`")
    for flag, value in [*zip(args[::2], args[1::2], strict=True), ("--port", str(code["port"]))]:
        if flag not in cmd or cmd[cmd.index(flag) + 1] != value:
            problems.append(f"the image's {flag} isn't {value}")
    return problems


def _docker_files() -> tuple[str, str]:
    return (DEPLOY / "Dockerfile").read_text(), (DEPLOY / "Dockerfile.dockerignore").read_text()


def test_dockerfile_installs_with_the_constraints_and_runs_the_module() -> None:
    assert "dagster-k8s" in pins((ROOT / "constraints.txt").read_text())
    assert dockerfile_problems(*_docker_files(), our_values()) == []


@pytest.mark.parametrize(
    "old, new, ignore",
    [
        ("FROM python:3.11-slim", "FROM python:3.10-slim", ""),
        ("COPY assets ./assets", "", ""),
        ("", "", "README.md"),
        ("", "", "nvc_*"),
        ("-c constraints.txt ", "", ""),
        ('".[k8s]"', ".", ""),
        ("USER 10001", "USER nvc", ""),
        ("USER 10001", "USER 0", ""),
        ('"--port", "3030"', '"--port", "4000"', ""),
        ('"nvc_pipelines.definitions"', '"nvc_pipelines.defs"', ""),
        ("COPY schedules ./schedules", "COPY schedules ./schedules\nCOPY sandboxes ./sandboxes", ""),
    ],
)
def test_a_dockerfile_that_drifted_is_caught(old: str, new: str, ignore: str) -> None:
    dockerfile, dockerignore = _docker_files()
    assert old in dockerfile
    broken = dockerfile.replace(old, new) if old else dockerfile
    assert dockerfile_problems(broken, f"{dockerignore}\n{ignore}", our_values()) != []
