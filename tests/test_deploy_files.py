"""deploy/ and docs/deployment.md agree with the server: flags, probe paths, the multi-host wiring.

Fast and CPU-only: nothing is built or served; the manifests' shell commands run with a stand-in
`python` that prints its arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml
from sglang_router.launch_router import parse_router_args
from sglang_router.router_args import RouterArgs

from minisgl_jax.server import ipc
from minisgl_jax.server.api import APIConfig, build_app
from minisgl_jax.server.cli import build_parser, parse_args
from minisgl_jax.server.client import EngineClient
from minisgl_jax.server.metrics import ServerMetrics
from minisgl_jax.server.middleware import OPEN_PATHS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
SCRIPT = DEPLOY / "launch_multihost.sh"
SINGLE = DEPLOY / "k8s.yaml"
MULTI = DEPLOY / "k8s-multihost.yaml"
REPLICAS = DEPLOY / "k8s-replicas.yaml"
DOCS = ROOT / "docs" / "deployment.md"

# Flags of the other tools these files use (docker, pip, useradd, kubectl); every other --flag
# must be one of `python -m minisgl_jax` or of sglang-router's.
OTHER_TOOLS_FLAGS = {
    "--create-home", "--uid",                                        # useradd
    "--no-cache-dir",                                                # pip
    "--interval", "--timeout", "--start-period", "--retries",        # HEALTHCHECK
    "--gpus", "--shm-size",                                          # docker run
    "--from-literal",                                                # kubectl (its --replicas is also ours)
}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
LOCAL_URL = re.compile(r"http://127\.0\.0\.1:1919(/[\w/]*)")


def server_flags() -> set[str]:
    return {option for action in build_parser()._actions for option in action.option_strings}


def router_flags() -> set[str]:
    parser = argparse.ArgumentParser()
    RouterArgs.add_cli_args(parser, use_router_prefix=False)
    return {option for action in parser._actions for option in action.option_strings}


def manifests(path: Path) -> dict[str, dict]:
    """The objects of a manifest file by kind/name."""
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c["env"]}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per instruction, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [tuple(line.split(None, 1)) for line in joined.splitlines() if line.strip()]


def dockerfile(instruction: str) -> list[str]:
    return [rest for name, rest in dockerfile_instructions() if name == instruction]


def probe_urls(probe: dict) -> list[str]:
    """The paths a probe checks: an httpGet's path, or the local URLs in an exec probe's command."""
    if "httpGet" in probe:
        return [probe["httpGet"]["path"]]
    return LOCAL_URL.findall(" ".join(probe["exec"]["command"]))


def all_probes(c: dict) -> dict[str, dict]:
    return {kind: c[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}


# ---- parsing ---------------------------------------------------------------------------------------


def test_manifests_parse():
    assert set(manifests(SINGLE)) == {"Deployment/minisgl-jax", "Service/minisgl-jax"}
    assert set(manifests(MULTI)) == {"Service/minisgl-jax-mh-hosts", "StatefulSet/minisgl-jax-mh",
                                     "Service/minisgl-jax-mh"}


def test_launch_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert "set -euo pipefail" in SCRIPT.read_text()


# ---- flags -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [DOCKERFILE, SCRIPT, SINGLE, MULTI, REPLICAS, DOCS], ids=lambda p: p.name)
def test_every_flag_is_a_server_flag(path):
    flags = server_flags() | router_flags()
    assert not OTHER_TOOLS_FLAGS & flags, "a server or router flag must not be excused as another tool's"
    unknown = set(FLAG.findall(path.read_text())) - flags - OTHER_TOOLS_FLAGS
    assert not unknown, (f"{path.name} uses flags that neither python -m minisgl_jax nor sglang-router accepts: "
                         f"{sorted(unknown)}")


def test_image_command_line_parses():
    (entrypoint,), (cmd,) = dockerfile("ENTRYPOINT"), dockerfile("CMD")
    entrypoint, cmd = json.loads(entrypoint), json.loads(cmd)
    assert entrypoint[:3] == ["python", "-m", "minisgl_jax"]
    engine, server = parse_args(entrypoint[3:] + cmd)
    assert (server.host, server.port, engine.compile_cache_dir) == ("0.0.0.0", 1919, "/cache/xla")


def test_single_host_args_parse_after_the_entrypoint():
    c = container(manifests(SINGLE)["Deployment/minisgl-jax"])
    entrypoint = json.loads(dockerfile("ENTRYPOINT")[0])
    engine, _ = parse_args(entrypoint[3:] + c["args"])
    assert engine.tp == c["resources"]["limits"]["nvidia.com/gpu"]


# ---- probes ----------------------------------------------------------------------------------------


def test_probe_paths_are_open_routes_of_the_app():
    """Every path a probe or the HEALTHCHECK asks for is a route, and open without the API key."""
    run_dir = tempfile.mkdtemp(prefix="minisgl-")  # short: ipc socket paths are limited to ~100 bytes
    client = EngineClient(ipc.RunDir(run_dir), ServerMetrics())  # sockets only; no worker behind them
    try:
        routes = {route.path for route in build_app(client, APIConfig(served_model_name="test")).routes}
    finally:
        client.inbox.close()
        client.to_tokenizer.close()
        shutil.rmtree(run_dir)
    used = set(LOCAL_URL.findall(" ".join(dockerfile("HEALTHCHECK"))))
    for path, name in ((SINGLE, "Deployment/minisgl-jax"), (MULTI, "StatefulSet/minisgl-jax-mh")):
        probes = all_probes(container(manifests(path)[name]))
        for kind, probe in probes.items():
            assert probe_urls(probe), f"{path.name} {kind} checks no URL"
            used.update(probe_urls(probe))
        # /health: a request would be served now (vLLM's and SGLang's meaning); /health/live: the API answers.
        assert probe_urls(probes["startupProbe"]) == ["/health"]
        assert probe_urls(probes["readinessProbe"]) == ["/health"]
        assert probe_urls(probes["livenessProbe"]) == ["/health/live"]
    assert LOCAL_URL.findall(" ".join(dockerfile("HEALTHCHECK"))) == ["/health"]
    assert used == {"/health", "/health/live"}
    assert used <= routes
    assert used <= set(OPEN_PATHS)


def test_multihost_probes_are_no_ops_on_followers():
    c = container(manifests(MULTI)["StatefulSet/minisgl-jax-mh"])
    for kind, probe in all_probes(c).items():
        run = subprocess.run(probe["exec"]["command"], env=dict(os.environ, HOSTNAME="minisgl-jax-mh-1"),
                             capture_output=True, timeout=30, check=False)
        assert run.returncode == 0, f"{kind} fails on a follower: {run.stderr.decode()}"


# ---- multi-host wiring -----------------------------------------------------------------------------


def fake_python(tmp_path: Path) -> dict[str, str]:
    """An environment whose `python` prints its arguments (one per line) and NCCL_NVLS_ENABLE."""
    (tmp_path / "python").write_text(textwrap.dedent("""\
        #!/bin/sh
        printf '%s\\n' "$@"
        echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
    """))
    (tmp_path / "python").chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "COORDINATOR",
                                                              "NCCL_NVLS_ENABLE")}
    return dict(clean, PATH=f"{tmp_path}:{os.environ['PATH']}")


def test_launch_script_requires_a_coordinator_for_several_hosts(tmp_path):
    run = subprocess.run([str(SCRIPT), "--model", "m"], env=dict(fake_python(tmp_path), NNODES="2"),
                         capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode != 0 and "COORDINATOR" in run.stderr


def test_launch_script_passes_the_node_flags(tmp_path):
    environment = dict(fake_python(tmp_path), NNODES="2", NODE_RANK="1", COORDINATOR="host0:8476")
    run = subprocess.run([str(SCRIPT), "--model", "m", "--tp", "16"], env=environment, capture_output=True,
                         text=True, timeout=30, check=True)
    *argv, nvls = run.stdout.splitlines()
    assert argv == ["-m", "minisgl_jax", "--nnodes", "2", "--node-rank", "1", "--coordinator", "host0:8476",
                    "--model", "m", "--tp", "16"]
    assert nvls == "NCCL_NVLS_ENABLE=0"
    engine, _ = parse_args(argv[2:])
    assert (engine.nnodes, engine.node_rank, engine.coordinator) == (2, 1, "host0:8476")


def test_multihost_statefulset_wiring(tmp_path):
    objects = manifests(MULTI)
    sts = objects["StatefulSet/minisgl-jax-mh"]
    headless = objects[f"Service/{sts['spec']['serviceName']}"]
    api = objects["Service/minisgl-jax-mh"]
    c = container(sts)
    name, replicas = sts["metadata"]["name"], sts["spec"]["replicas"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True

    # NNODES, --tp and the coordinator match the StatefulSet, its Services and its ports.
    variables = env(c)
    assert int(variables["NNODES"]["value"]) == replicas
    coordinator = variables["COORDINATOR"]["value"]
    host, port = coordinator.rsplit(":", 1)
    assert host == f"{name}-0.{headless['metadata']['name']}"
    assert int(port) in {p["port"] for p in headless["spec"]["ports"]}
    assert int(port) in {p["containerPort"] for p in c["ports"]}
    assert api["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == f"{name}-0"

    # The image puts the script where the command calls it.
    copies = [shlex.split(rest) for rest in dockerfile("COPY")]
    assert ["deploy/launch_multihost.sh", "/app/deploy/launch_multihost.sh"] in copies
    assert "/app/deploy/launch_multihost.sh" in c["command"][2]

    # Run the pod's command for each pod name, with the repo's script in place of the image's.
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    command = [part.replace("/app/deploy/launch_multihost.sh", str(SCRIPT)) for part in c["command"]]
    for rank in range(replicas):
        environment = dict(fake_python(tmp_path), HOSTNAME=f"{name}-{rank}",
                           **{k: v["value"] for k, v in variables.items() if "value" in v})
        run = subprocess.run(command + c["args"], env=environment, capture_output=True, text=True, timeout=30,
                             check=True)
        *argv, nvls = run.stdout.splitlines()
        engine, server = parse_args(argv[2:])
        assert (engine.nnodes, engine.node_rank, engine.coordinator) == (replicas, rank, coordinator)
        assert engine.tp == replicas * gpus
        assert (server.host, server.port) == ("0.0.0.0", 1919)
        assert nvls == "NCCL_NVLS_ENABLE=0"


# ---- replicas behind the router --------------------------------------------------------------------


def test_replicas_manifest_wiring(tmp_path):
    objects = manifests(REPLICAS)
    assert set(objects) == {"ServiceAccount/minisgl-jax-router", "Role/minisgl-jax-router",
                            "RoleBinding/minisgl-jax-router", "Deployment/minisgl-jax-replica",
                            "Deployment/minisgl-jax-router", "Service/minisgl-jax-router",
                            "NetworkPolicy/minisgl-jax-replica"}
    replicas, router = objects["Deployment/minisgl-jax-replica"], objects["Deployment/minisgl-jax-router"]
    replica, proxy = container(replicas), container(router)
    replica_labels = replicas["spec"]["template"]["metadata"]["labels"]
    router_labels = router["spec"]["template"]["metadata"]["labels"]

    # The replicas: the single-host server, ready on /health, taking no API key (the router checks it).
    engine, server = parse_args(json.loads(dockerfile("ENTRYPOINT")[0])[3:] + replica["args"])
    assert engine.tp == replica["resources"]["limits"]["nvidia.com/gpu"]
    assert server.api_key is None and "MINISGL_API_KEY" not in env(replica)
    assert [probe_urls(p) for p in all_probes(replica).values()] == [["/health"], ["/health/live"], ["/health"]]

    # The router's command, run with a stand-in python, parses as sglang-router's and finds the replicas.
    (port,) = [p["containerPort"] for p in replica["ports"] if p["name"] == "http"]
    for key in (None, "sesame"):
        environment = dict(fake_python(tmp_path), POD_NAMESPACE="serving")
        if key:
            environment["MINISGL_API_KEY"] = key
        run = subprocess.run(proxy["command"] + proxy["args"], env=environment, capture_output=True, text=True,
                             timeout=30, check=True)
        *argv, _ = run.stdout.splitlines()
        assert argv[:2] == ["-m", "sglang_router.launch_router"]
        args = parse_router_args(argv[2:])
        assert args.service_discovery and args.selector == replica_labels and args.service_discovery_port == port
        assert (args.service_discovery_namespace, args.api_key) == ("serving", key)
        assert args.port in {p["containerPort"] for p in proxy["ports"]}

    # It may watch the pods, its Service selects it, and only it reaches the replicas.
    assert router["spec"]["template"]["spec"]["serviceAccountName"] == "minisgl-jax-router"
    assert objects["RoleBinding/minisgl-jax-router"]["subjects"][0]["name"] == "minisgl-jax-router"
    (rule,) = objects["Role/minisgl-jax-router"]["rules"]
    assert rule["resources"] == ["pods"] and {"list", "watch"} <= set(rule["verbs"])
    assert objects["Service/minisgl-jax-router"]["spec"]["selector"] == router_labels
    policy = objects["NetworkPolicy/minisgl-jax-replica"]["spec"]
    assert policy["podSelector"]["matchLabels"] == replica_labels
    assert policy["ingress"] == [{"from": [{"podSelector": {"matchLabels": router_labels}}], "ports": [{"port": port}]}]


# ---- the image -------------------------------------------------------------------------------------


def test_dockerfile_copies_what_exists_and_sets_the_environment():
    for rest in dockerfile("COPY"):
        *sources, _ = shlex.split(rest)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repo"
    assert dockerfile("FROM") == ["python:3.11-slim"]
    assert any(rest.split()[0] != "root" for rest in dockerfile("USER"))
    environment = " ".join(dockerfile("ENV"))
    assert "NCCL_NVLS_ENABLE=0" in environment and "HF_HOME=/cache/hf" in environment
    assert dockerfile("EXPOSE") == ["1919"]
