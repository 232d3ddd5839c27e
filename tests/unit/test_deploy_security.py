"""The deploy files and the README keep Ray's dashboard / Jobs API off public interfaces and turn
on token authentication where a Ray port is reachable from other machines; the GPU recipes bind
metrics to loopback. (The token mechanism itself: tests/e2e/test_token_auth.py.)"""

import re

import yaml

from orchestrator.config import load_config
from tests.conftest import REPO

DEPLOY = REPO / "deploy"


def test_images_expose_no_port():
    for name in ("Dockerfile", "Dockerfile.cpu"):
        lines = (DEPLOY / name).read_text().splitlines()
        assert not [ln for ln in lines if ln.strip().upper().startswith("EXPOSE")], name


def test_cluster_launcher_keeps_the_dashboard_on_loopback_with_token_auth_on_every_node():
    cluster = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    head = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    workers = [c for c in cluster["worker_start_ray_commands"] if "ray start" in c]
    assert head and workers
    assert all("--dashboard-host=127.0.0.1" in c for c in head)
    assert all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=$HOME/ray_auth_token" in c for c in head + workers)
    assert cluster["file_mounts"] == {"~/ray_auth_token": "~/.ray/auth_token"}


def test_rayjob_uses_token_auth_and_resumes():
    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert " --resume " in job["spec"]["entrypoint"]
    assert "serviceType" not in str(job)  # no LoadBalancer / NodePort Service for the head


def test_readme_starts_no_public_dashboard_and_shows_token_auth():
    readme = (REPO / "README.md").read_text()
    starts = [ln for ln in readme.splitlines() if re.search(r"\bray start\b", ln)]
    assert starts and not [ln for ln in starts if "--dashboard-host=0.0.0.0" in ln.split("#")[0]]
    assert "export RAY_AUTH_MODE=token" in readme and "ray get-auth-token --generate" in readme


def test_gpu_recipes_bind_metrics_to_loopback():
    for recipe in ("gsm8k-qwen2.5-0.5b", "ultrafeedback-rm", "self-rewarding"):
        assert load_config(REPO / "configs" / f"{recipe}.yaml").metrics.host == "127.0.0.1", recipe


def test_submit_sh_never_echoes_the_token():
    text = (DEPLOY / "submit.sh").read_text()
    code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in code if "set -x" in ln or ("echo" in ln and "TOKEN" in ln)]
    assert 'export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in text
