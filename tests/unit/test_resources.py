"""The resource plan of a config and the cluster check behind ``odpo validate [--cluster]``."""

import os
import subprocess
import sys

import pytest
import yaml

from orchestrator.config import ConfigError, load_config
from orchestrator.cli.resources import (
    check_cluster,
    format_plan,
    judge_runs_in_driver,
    read_cluster,
    resource_plan,
)
from tests.conftest import REPO

GSM8K = REPO / "configs" / "gsm8k-qwen2.5-0.5b.yaml"


def plan_of(path, overrides=()):
    config = load_config(path, list(overrides))
    return resource_plan(config, judge_in_driver=judge_runs_in_driver(config))


def test_gsm8k_recipe_asks_for_one_8_gpu_node():
    plan = plan_of(GSM8K)
    a = plan["actors"]
    assert (a["generator"]["count"], a["generator"]["gpus"], a["generator"]["cpus"]) == (4, 1.0, 4.0)
    assert (a["judge"]["count"], a["judge"]["gpus"], a["judge"]["cpus"]) == (2, 0.0, 1.0)
    assert (a["learner"]["count"], a["learner"]["gpus"], a["learner"]["cpus"]) == (4, 1.0, 4.0)
    assert plan["total"] == {"GPU": 8.0, "CPU": 4 * 4 + 2 * 1 + 4 * 4}
    assert plan["warnings"] == []
    assert format_plan(plan)[0] == (
        "# resources: generator 4 x 1 GPU, judge 2 x 0 GPU, learner 4 x 1 GPU; total 8 GPU, 34 CPU")


def test_reward_model_judge_takes_its_own_gpu():
    plan = plan_of(REPO / "configs" / "ultrafeedback-rm.yaml")
    assert plan["actors"]["judge"]["total_gpus"] == 1.0
    assert plan["total"]["GPU"] == 3 + 1 + 4


def test_self_rewarding_judge_runs_in_the_driver_and_asks_for_nothing():
    config = load_config(REPO / "configs" / "self-rewarding.yaml")
    assert judge_runs_in_driver(config) is True
    plan = resource_plan(config, judge_in_driver=True)
    assert plan["actors"]["judge"]["count"] == 0 and plan["actors"]["judge"]["total_cpus"] == 0
    assert plan["total"] == {"GPU": 8.0, "CPU": 32.0}
    # The same config read as if its judge had actors would count judge.num_actors of them.
    assert resource_plan(config)["actors"]["judge"]["count"] == config.judge.num_actors


def test_demo_cpu_totals_match_what_run_reserves_locally():
    config = load_config(REPO / "configs" / "demo.yaml")
    plan = resource_plan(config)
    c = config
    expected = (c.generator.num_actors * c.generator.num_cpus + c.judge.num_actors * c.judge.num_cpus
                + c.learner.num_workers * c.learner.num_cpus_per_worker)
    assert plan["total"] == {"GPU": 0.0, "CPU": expected} and expected == 2.5


def test_tensor_parallel_needs_as_many_gpus_per_generator():
    plan = plan_of(GSM8K, ["generator.tensor_parallel_size=2"])
    assert plan["warnings"] == [
        "generator.num_gpus (1) < generator.tensor_parallel_size (2): each tensor-parallel rank needs its own GPU"
        " inside the generator actor"]
    plan = plan_of(GSM8K, ["generator.tensor_parallel_size=2", "generator.num_gpus=2", "generator.num_actors=2"])
    assert plan["warnings"] == [] and plan["actors"]["generator"]["total_gpus"] == 4.0


def test_cpu_learner_next_to_gpu_generators_is_flagged():
    plan = plan_of(GSM8K, ["learner.num_gpus_per_worker=0"])
    assert any("learner trains on CPU" in w for w in plan["warnings"])
    plan = plan_of(GSM8K, ["learner.num_gpus_per_worker=0.5"])
    assert any("fractional" in w for w in plan["warnings"])


def test_check_cluster_fits_exactly():
    plan = plan_of(GSM8K)
    assert check_cluster(plan, {"GPU": 8.0, "CPU": 34.0}) == []
    assert check_cluster(plan, {"GPU": 8.0, "CPU": 34.0}, nodes=[{"GPU": 8.0, "CPU": 34.0}]) == []


def test_check_cluster_names_each_shortfall():
    plan = plan_of(GSM8K)
    assert check_cluster(plan, {"CPU": 16.0}) == [
        "GPU: the config asks for 8 (learner 4 x 1, generator 4 x 1) and the cluster has 0: the learner actors would"
        " wait forever; lower learner.num_gpus_per_worker, generator.num_gpus so that they ask for 8 GPU less,"
        " or add 8 GPU to the cluster",
        "CPU: the config asks for 34 (learner 4 x 4, generator 4 x 4, judge 2 x 1) and the cluster has 16: the"
        " generator actors would wait forever; lower learner.num_cpus_per_worker, generator.num_cpus, judge.num_cpus"
        " so that they ask for 18 CPU less, or add 18 CPU to the cluster",
    ]


def test_the_first_kind_that_overflows_in_start_order_is_named_with_the_value_that_fits():
    # The demo (learner 1 + generator 1 + judge 0.5 CPU) on a 2-CPU head: the learner and the
    # generator start first and take both CPUs, so the judge is the one that would wait forever.
    plan = plan_of(REPO / "configs" / "demo.yaml")
    assert check_cluster(plan, {"CPU": 2.0}, [{"CPU": 2.0}]) == [
        "CPU: the config asks for 2.5 (learner 1 x 1, generator 1 x 1, judge 1 x 0.5) and the cluster has 2: the"
        " judge actors would wait forever; lower judge.num_cpus to 0 (or learner.num_cpus_per_worker,"
        " generator.num_cpus), or add 0.5 CPU to the cluster"]
    assert check_cluster(plan_of(REPO / "configs" / "demo.yaml", ["judge.num_cpus=0"]), {"CPU": 2.0}, [{"CPU": 2.0}]) == []
    # 3 judges of 0.5 CPU on 2.75 CPUs: 0.75 left for 3 actors, so at most 0.25 each.
    plan = plan_of(REPO / "configs" / "demo.yaml", ["judge.num_actors=3"])
    assert "lower judge.num_cpus to 0.25 (or" in check_cluster(plan, {"CPU": 2.75})[0]
    # One CPU short with 4 generators of 1: the generator is the one left waiting, at 0.75 CPU each.
    plan = plan_of(REPO / "configs" / "demo.yaml", ["generator.num_actors=4", "judge.num_cpus=0"])
    assert check_cluster(plan, {"CPU": 4.0}) == [
        "CPU: the config asks for 5 (learner 1 x 1, generator 4 x 1) and the cluster has 4: the generator actors would"
        " wait forever; lower generator.num_cpus to 0.75 (or learner.num_cpus_per_worker), or add 1 CPU to the cluster"]


def test_custom_resources_are_planned_and_checked_like_gpus():
    plan = plan_of(GSM8K, ["generator.resources={a100_node: 1}", "learner.resources={a100_node: 1}"])
    assert plan["actors"]["generator"]["resources"] == {"GPU": 1.0, "CPU": 4.0, "a100_node": 1.0}
    assert plan["total"] == {"GPU": 8.0, "CPU": 34.0, "a100_node": 8.0}
    assert format_plan(plan)[:2] == [
        "# resources: generator 4 x 1 GPU, judge 2 x 0 GPU, learner 4 x 1 GPU; total 8 GPU, 34 CPU, 8 a100_node",
        "#   generator 4 x (1 GPU, 4 CPU, 1 a100_node) = 4 GPU, 16 CPU; tensor_parallel_size 1"]
    node = {"GPU": 8.0, "CPU": 64.0, "a100_node": 8.0}
    assert check_cluster(plan, node, [node]) == []
    plain = {"GPU": 8.0, "CPU": 64.0}
    assert check_cluster(plan, plain, [plain]) == [
        "a100_node: the config asks for 8 (learner 4 x 1, generator 4 x 1) and the cluster has 0: the learner actors"
        " would wait forever; lower learner.resources.a100_node, generator.resources.a100_node so that"
        " they ask for 8 a100_node less, or add 8 a100_node to the cluster",
        "learner: one actor needs 1 GPU, 4 CPU, 1 a100_node on a single node; the largest node has 8 GPU, 64 CPU,"
        " 0 a100_node: lower learner.resources.a100_node to 0, or add a node with 1 a100_node",
        "generator: one actor needs 1 GPU, 4 CPU, 1 a100_node on a single node; the largest node has 8 GPU, 64 CPU,"
        " 0 a100_node: lower generator.resources.a100_node to 0, or add a node with 1 a100_node",
    ]


def test_custom_resources_must_be_custom_and_not_negative():
    with pytest.raises(ConfigError) as e:
        load_config(GSM8K, ["generator.resources={GPU: 1}", "judge.resources={x: -1}"])
    assert e.value.problems == [
        "generator.resources: 'GPU' is not a custom resource (CPUs and GPUs have their own fields)",
        "judge.resources: x: must be >= 0, got -1"]


def test_check_cluster_per_node_an_actor_never_spans_nodes():
    # 2 engines of tensor parallel size 4 need 4 GPUs each on one node: 8 single-GPU nodes have
    # the total but no node can hold one engine.
    plan = plan_of(GSM8K, ["generator.num_actors=2", "generator.num_gpus=4", "generator.tensor_parallel_size=4"])
    nodes = [{"GPU": 1.0, "CPU": 16.0}] * 12
    totals = {"GPU": 12.0, "CPU": 192.0}
    assert check_cluster(plan, totals) == []
    assert check_cluster(plan, totals, nodes) == [
        "generator: one actor needs 4 GPU, 4 CPU on a single node; the largest node has 1 GPU, 16 CPU:"
        " lower generator.num_gpus to 1, or add a node with 4 GPU"]
    # Each resource fits some node, but no node has both.
    nodes = [{"GPU": 4.0, "CPU": 2.0}, {"GPU": 0.0, "CPU": 64.0}]
    assert check_cluster(plan, {"GPU": 8.0, "CPU": 66.0}, nodes)[-1] == (
        "generator: one actor needs 4 GPU, 4 CPU on a single node; the largest node has 4 GPU, 64 CPU:"
        " no single node has all of it: lower generator.num_gpus or generator.num_cpus")


def test_read_cluster_fails_fast_naming_the_address():
    with pytest.raises(ConnectionError, match="127.0.0.1:9"):
        read_cluster("127.0.0.1:9")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)


def test_validate_prints_the_resources_as_yaml_comments():
    out = cli("validate", "configs/gsm8k-qwen2.5-0.5b.yaml")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "# resources: generator 4 x 1 GPU, judge 2 x 0 GPU, learner 4 x 1 GPU; total 8 GPU, 34 CPU" in lines
    assert "#   generator 4 x (1 GPU, 4 CPU) = 4 GPU, 16 CPU; tensor_parallel_size 1" in lines
    assert "#   learner   4 x (1 GPU, 4 CPU) = 4 GPU, 16 CPU; strategy fsdp" in lines
    # stdout is still one YAML document: the resolved config.
    assert yaml.safe_load(out.stdout) == load_config(GSM8K).model_dump(mode="json")


def test_validate_cluster_unreachable_exits_2():
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    out = cli("validate", "configs/gsm8k-qwen2.5-0.5b.yaml", "--cluster", env=env)
    assert out.returncode == 2
    assert "error: cannot connect to a Ray cluster at 127.0.0.1:9" in out.stderr


@pytest.mark.parametrize("config", ["configs/gsm8k-qwen2.5-0.5b.yaml", "configs/self-rewarding.yaml"])
def test_validate_without_cluster_imports_no_ray_or_torch(config):
    code = (
        f"import sys; from orchestrator.cli.main import main; main(['validate', {config!r}]);"
        "heavy = [m for m in ('torch', 'ray', 'vllm', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
