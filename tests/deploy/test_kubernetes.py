"""deploy/kubernetes: valid against Kubernetes' schemas offline, and wired together.

The manifests are plain YAML (``kubectl apply -f deploy/kubernetes/``): nothing to render, so
what is validated here is exactly what a cluster receives.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from proxy.config import load_config
from tests.deploy.dockerfile import parse
from tests.deploy.files import (
    ALERTS,
    DEPLOY,
    IMAGE,
    IMAGE_VLLM,
    INSTALL_HINT,
    ROOT,
    git_ignored,
    keygen,
    model_proxy,
)

MANIFESTS = DEPLOY / "kubernetes"
#: the GPU variant: its Deployment and ConfigMap take the place of the CPU ones
VLLM_MANIFESTS = MANIFESTS / "vllm"
#: a Function Network node: a set of its own (model-proxy-node), beside or instead of the rest
NODE_MANIFESTS = MANIFESTS / "node"
#: Oldest and newest Kubernetes the manifests must be valid for.
KUBERNETES_VERSIONS = ("1.28.0", "1.37.0")
#: Prometheus Operator kinds: their schemas come with the operator, not with Kubernetes.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def documents(variant: Path | None = None) -> dict[str, dict[str, Any]]:
    """The manifests by kind; with ``variant``, that folder's in place of the same kinds."""
    found = {}
    # secret.yaml.example: copied to secret.yaml with a real key, never applied as shipped
    paths = sorted(p for p in [*MANIFESTS.rglob("*.yaml"), *MANIFESTS.rglob("*.yaml.example")]
                   if not p.is_relative_to(VLLM_MANIFESTS) and not p.is_relative_to(NODE_MANIFESTS))
    for path in [*paths, *(sorted(variant.glob("*.yaml")) if variant else [])]:
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found[document["kind"]] = document
    return found


def node_manifests() -> list[Path]:
    """The node's set, the Secret's example among them."""
    return sorted([*NODE_MANIFESTS.glob("*.yaml"), *NODE_MANIFESTS.glob("*.yaml.example")])


def node_documents() -> dict[str, dict[str, Any]]:
    found = {}
    for path in node_manifests():
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


def container(variant: Path | None = None) -> dict[str, Any]:
    (proxy,) = documents(variant)["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(proxy)


def test_every_kind_is_there() -> None:
    assert set(documents()) == {"ConfigMap", "Secret", "Deployment", "Service",
                                "PodDisruptionBudget", "HorizontalPodAutoscaler",
                                "ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_valid_against_kubernetes_schemas(version: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason=f"kubernetes-validate not installed ({INSTALL_HINT})")
    for kind, document in documents().items():
        if kind not in OPERATOR_KINDS:
            kubernetes_validate.validate(document, version, strict=True)
    for path in [*sorted(VLLM_MANIFESTS.glob("*.yaml")), *node_manifests()]:
        for document in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(document, version, strict=True)
    broken = documents()["Deployment"]
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_probes_ports_and_selectors() -> None:
    docs = documents()
    proxy = container()
    assert proxy["image"] == IMAGE
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    image = parse(ROOT / "Dockerfile")[-1]
    assert [str(p) for p in port_names.values()] == image.expose
    assert proxy["args"] == image.cmd
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service",):
        assert docs[kind]["spec"]["selector"].items() <= pod_labels.items()
    for kind in ("PodDisruptionBudget", "ServiceMonitor"):
        assert docs[kind]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (service_port,) = docs["Service"]["spec"]["ports"]
    assert service_port["targetPort"] in port_names
    monitor = docs["ServiceMonitor"]["spec"]
    service_labels = docs["Service"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= service_labels.items()
    assert [e["port"] for e in monitor["endpoints"]] == [service_port["name"]]
    annotations = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) in port_names.values()
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    deployment = docs["Deployment"]["metadata"]["name"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment)


def test_security_context_matches_the_image() -> None:
    pod = documents()["Deployment"]["spec"]["template"]["spec"]
    uid, _, gid = (parse(ROOT / "Dockerfile")[-1].user or "").partition(":")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        int(uid), int(gid))
    context = container()["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # a read-only root needs somewhere to write: the image's HOME
    tmp = parse(ROOT / "Dockerfile")[-1].env["HOME"]
    assert tmp in {m["mountPath"] for m in container()["volumeMounts"]}


def test_the_state_dir_is_a_writable_volume() -> None:
    # the nonce journal lives there; the root file system is read-only
    state = parse(ROOT / "Dockerfile")[-1].env["MODEL_PROXY_STATE_DIR"]
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    assert state in mounts and not mounts[state].get("readOnly", False)
    compose = yaml.safe_load((ROOT / "deploy/compose/docker-compose.yml").read_text())
    volumes = compose["services"]["proxy"]["volumes"]
    assert any(v.split(":")[1] == state and not v.endswith(":ro") for v in volumes)


def mounted(tmp_path: Path) -> tuple[Path, Any]:
    """The ConfigMap's file and the Secret's files where the pod would see them, under tmp."""
    docs = documents()
    volumes = {v["name"]: v for v in docs["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    config_dir = tmp_path / mounts["config"].lstrip("/")
    secret_dir = tmp_path / mounts["secrets"].lstrip("/")
    assert volumes["config"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert volumes["secrets"]["secret"]["secretName"] == docs["Secret"]["metadata"]["name"]
    config_dir.mkdir(parents=True)
    secret_dir.mkdir(parents=True)
    for name, text in docs["ConfigMap"]["data"].items():
        (config_dir / name).write_text(text.replace(mounts["secrets"], str(secret_dir)))
    for name, text in docs["Secret"]["stringData"].items():
        (secret_dir / name).write_text(text)
    env = {e["name"]: e["value"] for e in container()["env"]}
    config_file = tmp_path / env["MODEL_BACKEND_CONFIG"].lstrip("/")
    assert env["MODEL_BACKEND_CONFIG"] == parse(ROOT / "Dockerfile")[-1].env["MODEL_BACKEND_CONFIG"]
    return config_file, load_config(config_file, env={})


def test_config_map_loads_with_the_secret_mounted(tmp_path: Path) -> None:
    _, config = mounted(tmp_path)
    keys = [key.get_secret_value() for key in config.auth.api_keys]
    assert keys == [documents()["Secret"]["stringData"]["api_keys"].strip()]
    assert config.watch is True  # the ConfigMap is a mounted folder, updated in place
    assert not any("subPath" in m for m in container()["volumeMounts"])


def test_grace_period_covers_pre_stop_and_shutdown_grace(tmp_path: Path) -> None:
    _, config = mounted(tmp_path)
    pod = documents()["Deployment"]["spec"]["template"]["spec"]
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + config.server.shutdown_grace
    assert needed < pod["terminationGracePeriodSeconds"] <= needed + 15


def test_replicas_fit_the_disruption_budget_and_autoscaler() -> None:
    docs = documents()
    replicas = docs["Deployment"]["spec"]["replicas"]
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert 1 < hpa["minReplicas"] <= replicas <= hpa["maxReplicas"]
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] < hpa["minReplicas"]
    assert docs["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_prometheus_rule_holds_the_alert_rules() -> None:
    rule = documents()["PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    assert rule["metadata"]["name"] == documents()["Deployment"]["metadata"]["name"]


def uncommented(text: str, first: str) -> str:
    """``text`` with the commented block that starts ``# first`` made live."""
    lines, out, inside = text.splitlines(), [], False
    for line in lines:
        body = line.lstrip()
        indent = line[: len(line) - len(body)]
        inside = body.startswith("# " + first) or (inside and body.startswith("#   "))
        out.append(indent + body[2:] if inside else line)
    return "\n".join(out) + "\n"


def test_the_shared_nonce_store_lines_load_when_uncommented(tmp_path: Path) -> None:
    config_file, _ = mounted(tmp_path)
    config_file.write_text(uncommented(config_file.read_text(), "fxn_signatures:"))
    secret = documents()["Secret"]
    assert "nonce_store" not in secret["stringData"]  # shipped commented: no Redis by default
    (line,) = [raw for raw in (MANIFESTS / "secret.yaml.example").read_text().splitlines()
               if raw.lstrip().startswith("# nonce_store:")]
    url = line.split(":", 1)[1].strip()
    mount = next(m["mountPath"] for m in container()["volumeMounts"] if m["name"] == "secrets")
    (tmp_path / mount.lstrip("/") / "nonce_store").write_text(url + "\n")
    signatures = load_config(config_file, env={}).auth.fxn_signatures
    assert signatures is not None and signatures.nonce_store is not None
    assert signatures.nonce_store.get_secret_value().startswith("redis://")


def test_vllm_variant_has_a_gpu_shared_memory_and_a_model_cache(tmp_path: Path) -> None:
    docs = documents(VLLM_MANIFESTS)
    assert {p.name for p in VLLM_MANIFESTS.glob("*.yaml")} == {
        "deployment.yaml", "configmap.yaml", "pvc.yaml"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    proxy = container(VLLM_MANIFESTS)
    assert proxy["image"] == IMAGE_VLLM and proxy["args"] == parse(ROOT / "Dockerfile")[-1].cmd
    assert proxy["resources"]["limits"]["nvidia.com/gpu"] == 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e["value"] for e in proxy["env"]}
    hf_home = PurePosixPath(env["HF_HOME"])
    cache = next(path for path in mounts if hf_home.is_relative_to(path))
    claim = volumes[mounts[cache]]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert not hf_home.is_relative_to(parse(ROOT / "Dockerfile")[-1].env["HOME"])
    # the same Service, disruption budget and Secret select and serve this pod
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["Deployment"]["spec"]["strategy"]["type"] == "Recreate"
    # the ConfigMap loads with the Secret mounted, and its engine fits the GPUs
    config_dir, secret_dir = tmp_path / "config", tmp_path / "secrets"
    config_dir.mkdir()
    secret_dir.mkdir()
    secret_mount = next(p for p, name in mounts.items() if name == "secrets")
    for name, text in docs["ConfigMap"]["data"].items():
        (config_dir / name).write_text(text.replace(secret_mount, str(secret_dir)))
    (secret_dir / "api_keys").write_text(docs["Secret"]["stringData"]["api_keys"])
    config = load_config(config_dir / "model_backend.yaml", env={})
    assert config.backend_provider == "vllm" and config.engine is not None
    assert config.engine.tensor_parallel_size == proxy["resources"]["limits"]["nvidia.com/gpu"]
    pre_stop = float(proxy["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config.server.shutdown_grace


def test_a_node_has_one_pod_its_key_in_a_secret_and_its_journal_on_a_volume(
    tmp_path: Path
) -> None:
    from proxy.auth.signing import Signer

    docs = node_documents()
    assert {p.name for p in node_manifests()} == {
        "deployment.yaml", "configmap.yaml", "service.yaml", "pvc.yaml", "secret.yaml.example"}
    assert set(docs) == {"Deployment", "ConfigMap", "Service", "PersistentVolumeClaim",
                         "Secret"}
    names = {doc["metadata"]["name"] for kind, doc in docs.items()
             if kind != "PersistentVolumeClaim"}
    assert names == {"model-proxy-node"}  # apart from the set in ../: both can run
    deployment = docs["Deployment"]["spec"]
    # one pod per key, the old one gone before the new one starts (the journal is its own)
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = deployment["template"]["spec"]
    (proxy,) = pod["containers"]
    image = parse(ROOT / "Dockerfile")[-1]
    assert proxy["image"] == IMAGE and proxy["args"] == image.cmd
    uid, _, gid = (image.user or "").partition(":")
    context = pod["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (
        int(uid), int(gid), int(gid))
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    # the key: the Secret's one file, read-only, readable by the group fsGroup sets, not by
    # others
    secret_volume = volumes["node-key"]["secret"]
    assert secret_volume["secretName"] == docs["Secret"]["metadata"]["name"]
    mode = secret_volume["defaultMode"]
    assert mode & 0o040 and not mode & 0o007
    assert mounts["node-key"]["readOnly"] is True
    (item,) = secret_volume["items"]
    assert item["key"] in docs["Secret"]["stringData"]
    key_file = f"{mounts['node-key']['mountPath']}/{item['path']}"
    # the journal: the image's state directory on the claim, writable
    state = image.env["MODEL_PROXY_STATE_DIR"]
    (journal,) = [m for m in proxy["volumeMounts"] if m["mountPath"] == state]
    assert not journal.get("readOnly", False)
    claim = volumes[journal["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    # the port the network reaches
    labels = deployment["template"]["metadata"]["labels"]
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    (port,) = service["ports"]
    assert port["targetPort"] in {p["name"] for p in proxy["ports"]}
    assert service["type"] == "LoadBalancer"
    # the example Secret holds no key, and the copy made from it is ignored by git
    placeholder = docs["Secret"]["stringData"][item["key"]]
    with pytest.raises(ValueError):
        Signer.from_text(placeholder)
    assert git_ignored("deploy/kubernetes/node/secret.yaml")
    # the ConfigMap passes check with a key made by keygen where the Secret puts it
    config_dir = tmp_path / mounts["config"]["mountPath"].lstrip("/")
    key_dir = tmp_path / mounts["node-key"]["mountPath"].lstrip("/")
    config_dir.mkdir(parents=True)
    key_dir.mkdir(parents=True)
    text = docs["ConfigMap"]["data"]["model_backend.yaml"]
    assert f"key_file: {key_file}\n" in text
    config_file = config_dir / "model_backend.yaml"
    config_file.write_text(text.replace(mounts["node-key"]["mountPath"], str(key_dir)))
    keygen(key_dir / item["path"])
    env = {e["name"]: e["value"] for e in proxy["env"]}
    assert env["MODEL_BACKEND_CONFIG"] == f"{mounts['config']['mountPath']}/{config_file.name}"
    checked = model_proxy("check", "-c", str(config_file), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    config = load_config(config_file, env={})
    assert config.node is not None and config.node.chain is not None and config.fxn_id
    pre_stop = float(proxy["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config.server.shutdown_grace
