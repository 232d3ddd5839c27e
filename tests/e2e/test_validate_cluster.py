"""`odpo validate --cluster` against a real Ray head started here (`ray start --head` on loopback,
own ports and temp dir) that advertises 2 logical GPUs and 4 CPUs: the GPU recipe does not fit
and each shortfall is named; a shrunk version of it fits. Both address forms are used: the
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
        "error: GPU: the config asks for 8 (generator 4 x 1, learner 4 x 1), the cluster has 2",
        "error: CPU: the config asks for 34 (generator 4 x 4, judge 2 x 1, learner 4 x 4), the cluster has 4",
    ]
    assert out.stdout.rstrip().endswith("# cluster: 2 GPU, 4 CPU on 1 node(s); does not fit")


def test_shrunk_recipe_fits_through_the_gcs_address(head):
    shrink = ["generator.num_actors=1", "generator.num_cpus=1", "judge.num_actors=1", "judge.num_cpus=0.5",
              "learner.num_workers=1", "learner.num_cpus_per_worker=1"]
    out = validate(head, head["gcs"], *shrink)
    assert out.returncode == 0, out.stderr
    assert "# resources: generator 1 x 1 GPU, judge 1 x 0 GPU, learner 1 x 1 GPU; total 2 GPU, 2.5 CPU" in out.stdout
    assert out.stdout.rstrip().endswith("# cluster: 2 GPU, 4 CPU on 1 node(s); fits")
    # One GPU more than the cluster has: named, exit 2.
    out = validate(head, head["gcs"], *shrink, "generator.num_actors=2")
    assert out.returncode == 2
    assert "error: GPU: the config asks for 3 (generator 2 x 1, learner 1 x 1), the cluster has 2" in out.stderr


def test_an_actor_larger_than_any_node_is_named(head):
    out = validate(head, head["dashboard"], "generator.num_actors=1", "generator.num_gpus=2", "generator.num_cpus=6",
                   "judge.num_cpus=0", "learner.num_workers=1", "learner.num_gpus_per_worker=0",
                   "learner.num_cpus_per_worker=0")
    assert out.returncode == 2
    assert [line for line in out.stderr.splitlines() if line.startswith("error: ")] == [
        "error: CPU: the config asks for 6 (generator 1 x 6), the cluster has 4",
        "error: generator: one actor needs 2 GPU and 6 CPU on a single node; the largest node has 2 GPU, 4 CPU",
    ]
