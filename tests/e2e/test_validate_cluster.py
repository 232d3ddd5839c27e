"""`odpo validate --cluster` against a real Ray head started here (`ray start --head` on loopback,
own ports and temp dir) that advertises 2 logical GPUs and 2 CPUs: the GPU recipe does not fit
and each shortfall is named with the field to change; a shrunk version of it fits. Both address forms are used: the
dashboard URL (what `ray job submit` takes) and the GCS address."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e

CONFIG = "configs/gsm8k-qwen2.5-0.5b.yaml"


@pytest.fixture(scope="module")
def head(ray_head):
    return ray_head


def validate(head, address, *overrides):
    env = {**head["env"], "RAY_ADDRESS": address}
    args = [sys.executable, "-m", "orchestrator", "validate", CONFIG, "--cluster"]
    for o in overrides:
        args += ["--set", o]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_gpu_recipe_does_not_fit_and_each_shortfall_is_named(head):
    out = validate(head, head["dashboard"])
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: GPU: the config asks for 8 (learner 4 x 1, generator 4 x 1) and the cluster has 2: the learner actors"
        " would wait forever; lower learner.num_gpus_per_worker, generator.num_gpus so that they ask for 6 GPU less,"
        " or add 6 GPU to the cluster",
        "error: CPU: the config asks for 34 (learner 4 x 4, generator 4 x 4, judge 2 x 1) and the cluster has 2: the"
        " learner actors would wait forever; lower learner.num_cpus_per_worker, generator.num_cpus, judge.num_cpus so"
        " that they ask for 32 CPU less, or add 32 CPU to the cluster",
        "error: learner: one actor needs 1 GPU, 4 CPU on a single node; the largest node has 2 GPU, 2 CPU:"
        " lower learner.num_cpus_per_worker to 2, or add a node with 4 CPU",
        "error: generator: one actor needs 1 GPU, 4 CPU on a single node; the largest node has 2 GPU, 2 CPU:"
        " lower generator.num_cpus to 2, or add a node with 4 CPU",
    ]
    assert out.stdout.rstrip().endswith("# cluster: 2 GPU, 2 CPU on 1 node(s); does not fit")


def test_shrunk_recipe_fits_through_the_gcs_address(head):
    shrink = ["generator.num_actors=1", "generator.num_cpus=1", "judge.num_actors=1", "judge.num_cpus=0",
              "learner.num_workers=1", "learner.num_cpus_per_worker=1"]
    out = validate(head, head["gcs"], *shrink)
    assert out.returncode == 0, out.stderr
    assert "# resources: generator 1 x 1 GPU, judge 1 x 0 GPU, learner 1 x 1 GPU; total 2 GPU, 2 CPU" in out.stdout
    assert out.stdout.rstrip().endswith("# cluster: 2 GPU, 2 CPU on 1 node(s); fits")
    # One generator more than the cluster has room for: named with the value that would fit, exit 2.
    out = validate(head, head["gcs"], *shrink, "generator.num_actors=2")
    assert out.returncode == 2
    assert ("error: GPU: the config asks for 3 (learner 1 x 1, generator 2 x 1) and the cluster has 2: the generator"
            " actors would wait forever; lower generator.num_gpus to 0.5 (or learner.num_gpus_per_worker), or add 1 GPU"
            " to the cluster") in out.stderr.splitlines()


def test_an_actor_larger_than_any_node_is_named(head):
    out = validate(head, head["dashboard"], "generator.num_actors=1", "generator.num_gpus=2", "generator.num_cpus=3",
                   "judge.num_cpus=0", "learner.num_workers=1", "learner.num_gpus_per_worker=0",
                   "learner.num_cpus_per_worker=0")
    assert out.returncode == 2
    assert [line for line in out.stderr.splitlines() if line.startswith("error: ")] == [
        "error: CPU: the config asks for 3 (generator 1 x 3) and the cluster has 2: the generator actors would wait"
        " forever; lower generator.num_cpus to 2, or add 1 CPU to the cluster",
        "error: generator: one actor needs 2 GPU, 3 CPU on a single node; the largest node has 2 GPU, 2 CPU:"
        " lower generator.num_cpus to 2, or add a node with 3 CPU",
    ]
