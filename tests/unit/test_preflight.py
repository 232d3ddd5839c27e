"""The check `odpo run` makes before starting any actor (orchestrator/cli/preflight.py): a cluster
that cannot hold the actors is an error at once, or after `--wait-for-resources` seconds during
which the autoscaler is asked for the missing shapes and the wait is reported every 30 s.

The cluster reads, the autoscaler request and the clock are injected here (a simulated cluster
that grows); tests/e2e/test_submit.py runs the same check against a real `ray start` head."""

import logging

import pytest

from actors.hardware import cpu_info, native_bf16_cpu, resolve_dtype
from orchestrator.config import ConfigError, load_config
from orchestrator.cli.preflight import INTERVAL_S, POLL_S, ResourceShortfall, actor_bundles, await_fit, bf16_warnings
from tests.conftest import DEMO_MODEL, REPO

DEMO = REPO / "configs" / "demo.yaml"
SMALL = [{"CPU": 2.0, "memory": 1e9}]
LARGE = [{"CPU": 2.0}, {"CPU": 4.0}]


class FakeCluster:
    """Node lists served in turn (the last one forever), a clock that moves only when slept."""

    def __init__(self, *states, grow_after_reads: int = 0):
        self.states, self.grow_after = states, grow_after_reads
        self.reads, self.now, self.requests = 0, 1000.0, []

    def read_nodes(self):
        self.reads += 1
        return self.states[0] if self.reads <= self.grow_after or len(self.states) == 1 else self.states[1]

    def kwargs(self):
        return {"read_nodes": self.read_nodes, "request": self.requests.append, "clock": lambda: self.now,
                "sleep": self.sleep}

    def sleep(self, seconds):
        self.now += seconds


def test_a_cluster_that_fits_passes_at_once_and_asks_the_autoscaler_for_nothing():
    cluster = FakeCluster(LARGE)
    plan = await_fit(load_config(DEMO), 0, **cluster.kwargs())
    assert plan["total"]["CPU"] == 2.5 and cluster.reads == 1 and cluster.requests == []


def test_a_shortfall_is_one_error_per_problem_naming_the_field_with_no_wait():
    cluster = FakeCluster(SMALL)
    with pytest.raises(ResourceShortfall) as e:
        await_fit(load_config(DEMO), 0, **cluster.kwargs())
    assert isinstance(e.value, ConfigError)  # so `odpo run` prints `error:` lines and exits 2
    assert e.value.problems == [
        "CPU: the config asks for 2.5 (learner 1 x 1, generator 1 x 1, judge 1 x 0.5) and the cluster has 2: the"
        " judge actors would wait forever; lower judge.num_cpus to 0 (or learner.num_cpus_per_worker,"
        " generator.num_cpus), or add 0.5 CPU to the cluster"]
    assert cluster.reads == 1 and cluster.now == 1000.0 and cluster.requests == []


def test_waiting_for_a_cluster_that_grows_asks_the_autoscaler_and_reports_every_30_s(caplog):
    # The cluster gets its second node on the 40th read, i.e. after 39 polls of POLL_S seconds.
    cluster = FakeCluster(SMALL, LARGE, grow_after_reads=39)
    with caplog.at_level(logging.WARNING, logger="odpo"):
        plan = await_fit(load_config(DEMO), 600, **cluster.kwargs())
    assert plan["total"]["CPU"] == 2.5
    assert cluster.reads == 40 and cluster.now == 1000.0 + 39 * POLL_S
    # The actors' shapes were requested from the autoscaler, then the request was withdrawn.
    assert cluster.requests == [[{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 0.5}], []]
    waits = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(waits) == 1 + int(39 * POLL_S // INTERVAL_S) == 3  # at 0 s, 30 s, 60 s
    assert waits[0].startswith("the cluster cannot hold the run's actors yet; waiting up to 600 s more")
    assert all("lower judge.num_cpus to 0" in w for w in waits)


def test_a_wait_that_runs_out_fails_as_without_one_and_withdraws_the_request(caplog):
    cluster = FakeCluster(SMALL)
    with caplog.at_level(logging.WARNING, logger="odpo"), pytest.raises(ResourceShortfall) as e:
        await_fit(load_config(DEMO), 45, **cluster.kwargs())
    assert cluster.now == 1045.0
    assert len(e.value.problems) == 1 and "lower judge.num_cpus to 0" in e.value.problems[0]
    assert cluster.requests == [[{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 0.5}], []]
    assert "did not grow to fit the run within 45 s" in caplog.records[-1].getMessage()


def test_bundles_follow_the_start_order_and_leave_out_actors_that_ask_for_nothing():
    config = load_config(DEMO, ["generator.num_actors=2", "judge.num_cpus=0", "generator.resources={fast: 1}"])
    from orchestrator.cli.resources import resource_plan

    assert actor_bundles(resource_plan(config)) == [{"CPU": 1.0}, {"CPU": 1.0, "fast": 1.0}, {"CPU": 1.0, "fast": 1.0}]


def test_a_cpu_without_bf16_instructions_is_named_with_the_fields_to_change(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n")
    avx2 = cpu_info(info)
    assert avx2 == ("AMD EPYC 7B13", {"fpu", "sse2", "avx", "avx2", "fma"}) and not native_bf16_cpu(avx2[1])
    assert native_bf16_cpu({"avx2", "avx512_bf16"}) and native_bf16_cpu({"amx_bf16"})
    assert resolve_dtype("bfloat16_if_native", gpu_bf16=False) == "float16"
    assert resolve_dtype("bfloat16_if_native", gpu_bf16=True) == "bfloat16" and resolve_dtype("float32") == "float32"

    shipped = load_config("configs/rehearsal-0.5b.yaml", [f"model.path={DEMO_MODEL}"])
    assert bf16_warnings(shipped, avx2) == [
        "generator.dtype: bfloat16_if_native runs float32 here (this CPU (AMD EPYC 7B13) has no bf16 instructions "
        "(none of avx512_bf16, amx_bf16 in /proc/cpuinfo)): the generators' weights and matmuls at full speed, in "
        "twice bf16's memory",
        "learner.ref_dtype: bfloat16_if_native runs float32 here (this CPU (AMD EPYC 7B13) has no bf16 instructions "
        "(none of avx512_bf16, amx_bf16 in /proc/cpuinfo)): the reference's forward at full speed, in twice bf16's "
        "memory"]
    old = load_config("configs/rehearsal-0.5b.yaml", [f"model.path={DEMO_MODEL}", "generator.dtype=bfloat16"])
    assert bf16_warnings(old, avx2)[0].startswith(
        "generator.dtype: bfloat16, and this CPU (AMD EPYC 7B13) has no bf16 instructions")
    assert bf16_warnings(old, avx2)[0].endswith("set generator.dtype: bfloat16_if_native (bf16 only where native) "
                                                "or float32")
    assert bf16_warnings(old, ("Xeon", {"avx512_bf16"})) == []
