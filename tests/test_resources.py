"""How a run sizes its actors from the cluster: what each reserves is what it uses, and --device cuda never
falls back to CPU."""

from __future__ import annotations

import logging
import time

import pytest

from pipeline.resources import ResourcePlan, ResourcesUnavailable, plan_resources, size_plan


def test_gpu_nodes_get_one_encoder_per_gpu_and_every_cpu_decodes():
    nodes = [{"CPU": 16, "GPU": 2}, {"CPU": 16, "GPU": 2}]
    assert size_plan(nodes, None, None, None, None) == ResourcePlan("cuda", 4, 1.0, 0, None, 32)
    assert size_plan(nodes, "cuda", 2, None, 8) == ResourcePlan("cuda", 2, 1.0, 0, None, 8)
    with pytest.raises(ResourcesUnavailable, match="--num-encoders 5 needs as many GPUs; the cluster has 4"):
        size_plan(nodes, "cuda", 5, None, None)


def test_cpu_encoders_one_per_node_sharing_a_core_with_its_decoder():
    nodes = [{"CPU": 16}, {"CPU": 16}, {"CPU": 8}]
    # 15 CPUs reserved, 16 threads: room on the two 16-CPU nodes (an encoder and a decoder), not on the 8-CPU one
    assert size_plan(nodes, None, None, None, None) == ResourcePlan("cpu", 2, 0.0, 15, 16, 40 - 30)
    assert size_plan([{"CPU": 2}], None, None, None, None) == ResourcePlan("cpu", 1, 0.0, 1, 2, 1)
    assert size_plan([{"CPU": 1}, {"CPU": 1}], None, None, None, None) == ResourcePlan("cpu", 1, 0.0, 1, 1, 1)
    # a 1-CPU machine: the encoder reserves nothing and shares the decoder's CPU
    assert size_plan([{"CPU": 1}], None, None, None, None) == ResourcePlan("cpu", 1, 0.0, 0, 1, 1)


def test_cpu_encoders_given_threads_reserve_exactly_those():
    nodes = [{"CPU": 16}, {"CPU": 16}, {"CPU": 8}]
    assert size_plan(nodes, "cpu", None, 7, None) == ResourcePlan("cpu", 5, 0.0, 7, 7, 40 - 35)
    assert size_plan([{"CPU": 2}], "cpu", None, 1, None) == ResourcePlan("cpu", 1, 0.0, 1, 1, 1)
    # GPUs in the cluster but --device cpu: CPU encoders
    assert size_plan([{"CPU": 8, "GPU": 1}], "cpu", None, None, None).device == "cpu"


def test_cpu_only_cluster_says_it_encodes_on_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.resources"):
        size_plan([{"CPU": 4}], None, None, None, None)
    assert "the cluster has no GPU: encoding on CPU" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.resources"):
        size_plan([{"CPU": 4}], "cpu", None, None, None)
    assert not caplog.text, "asked for: nothing to warn about"


@pytest.mark.parametrize("device, encoders, threads, decoders, message", [
    ("cpu", None, 3, None, "--encoder-threads 3: no node has that many CPUs"),
    ("cpu", 2, 2, None, "the cluster has 4 CPUs: 2 encoder"),
    ("cpu", None, None, 3, "leave 2 for 3 decoder"),
])
def test_sizes_that_cannot_fit_are_refused_rather_than_left_waiting(device, encoders, threads, decoders, message):
    nodes = [{"CPU": 2}, {"CPU": 2}]
    with pytest.raises(ResourcesUnavailable, match=message):
        size_plan(nodes, device, encoders, threads, decoders)


def test_encoders_must_fit_on_nodes_not_only_in_the_cpu_total():
    with pytest.raises(ResourcesUnavailable, match=r"2 encoder\(s\) of 3 CPUs each: the nodes \(\[4, 2, 2\] CPUs\) hold 1"):
        size_plan([{"CPU": 4}, {"CPU": 2}, {"CPU": 2}], "cpu", 2, 3, None)


def test_gpu_flags_for_cpu_encoders_are_said_to_be_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.resources"):
        size_plan([{"CPU": 4, "GPU": 1}], None, None, 2, None)
    assert "--encoder-threads 2 is for CPU encoders: ignored on cuda" in caplog.text


def test_cuda_on_a_cluster_without_gpus_waits_then_fails(ray_local):
    started = time.monotonic()
    with pytest.raises(ResourcesUnavailable, match=r"no GPU after waiting 1 s \(--gpu-wait-s\)"):
        plan_resources("cuda", None, None, None, gpu_wait_s=1.0)
    assert 1.0 <= time.monotonic() - started < 30
    assert plan_resources(None, None, None, None, gpu_wait_s=0).device == "cpu"  # the default: CPU, warned
