"""How one run uses the Ray cluster: encoder actors, their device, threads and reservations, and decoders.

Every actor reserves in Ray what it uses, so Ray never places more actors on a node than it has cores
(the one deliberate exception: a default CPU encoder also runs a thread on its node's decoder core):

* **GPU encoders** (``--device cuda``, or by default when the cluster has GPUs): one actor per GPU, each
  reserving that GPU and no CPU: its host work (a batch's copy to pinned memory, its Arrow table) is a
  small part of a core (``benchmarks/bench_standin.py`` measures it), and a whole reserved CPU would be
  one decoder fewer, which is what a GPU node's throughput hangs on. Each works on two batches at once,
  so the next one is on its way to the device while the current one runs (`ResourcePlan.encoder_calls`).
* **CPU encoders** (``--device cpu``, or by default on a cluster without GPUs, which is logged as a
  warning): one actor per node that has room for it and a decoder. With ``--encoder-threads T`` each
  reserves T CPUs and runs T torch threads. By default it reserves a node's CPUs minus one (the node's
  decoder holds that one) and runs a thread on every core: on CPU the tower costs 10-100x what decoding
  does, so the decoder mostly waits for the encoder (back-pressure), and leaving its core idle costs more
  than sharing it (2 cores, ViT-B/14 at fp32: 85 s sharing, 128 s with 1 thread, the naive script 85 s).
* **Decoders**: one CPU each, decoding with one FFmpeg thread (`operators.decode`); by default every CPU
  the encoders leave.

``--device cuda`` on a cluster that has no GPU yet (an autoscaling cluster starts without GPU nodes) asks
the autoscaler for GPUs and waits up to ``--gpu-wait-s`` for them, then fails: it never encodes on CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

logger = logging.getLogger(__name__)

GPU_POLL_S = 5.0


class ResourcesUnavailable(Exception):
    """The cluster cannot hold the actors this run needs (no GPU came, or the sizes asked for do not fit)."""


@dataclass(frozen=True)
class ResourcePlan:
    """Actors and reservations of one run."""

    device: str  # "cpu", or a CUDA device kind ("cuda")
    encoders: int  # encoder actors
    encoder_gpus: float  # GPUs each encoder reserves (0 on CPU)
    encoder_cpus: int  # CPUs each encoder reserves
    encoder_threads: int | None  # torch threads of a CPU encoder (None on GPU)
    decoders: int  # decoder actors, one CPU each

    @property
    def encoder_calls(self) -> int:
        """Batches each encoder works on at once: on a GPU two, so that one batch's host work (its copy to
        pinned memory, its Arrow table) runs while the other's forward runs on the device; on CPU one."""
        return 2 if self.encoder_gpus else 1

    def describe(self) -> str:
        where = (f"{self.encoder_gpus:g} GPU" if self.encoder_gpus else
                 f"{self.encoder_cpus} CPU reserved, {self.encoder_threads} torch threads")
        return f"{self.encoders} encoder actor(s) on {self.device}, {where} each; {self.decoders} decoder actor(s), 1 CPU each"


def _alive_nodes() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def _cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def wait_for_gpus(timeout_s: float, count: int = 1, clock: Callable[[], float] = time.monotonic) -> int:
    """Ask the autoscaler (if any) for ``count`` GPUs and wait until the cluster has one; the request is
    withdrawn when the wait ends (the encoder actors then hold what came, and ask for the rest themselves).

    Returns the cluster's GPU count. Raises `ResourcesUnavailable` after ``timeout_s`` seconds without one."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * count)
    try:
        deadline = clock() + timeout_s
        while not (gpus := _cluster_gpus()):
            if clock() >= deadline:
                raise ResourcesUnavailable(
                    f"--device cuda: the cluster has no GPU after waiting {timeout_s:g} s (--gpu-wait-s); add GPU "
                    "nodes, or pass --device cpu to encode on CPU")
            time.sleep(min(GPU_POLL_S, max(0.0, deadline - clock())))
        return gpus
    finally:
        request_resources(bundles=[])  # a standing request would keep GPU nodes up after the run


def plan_resources(device: str | None, num_encoders: int | None, encoder_threads: int | None,
                   num_decoders: int | None, gpu_wait_s: float) -> ResourcePlan:
    """The `ResourcePlan` for the flags of the same names on the running Ray cluster (see the module
    docstring), after waiting for GPUs when ``device`` is CUDA and the cluster has none.

    Raises:
        ResourcesUnavailable: no GPU came within ``gpu_wait_s``, or see `size_plan`.
    """
    if device not in (None, "cpu") and not _cluster_gpus():
        wait_for_gpus(gpu_wait_s, num_encoders or 1)
    return size_plan(_alive_nodes(), device, num_encoders, encoder_threads, num_decoders)


def size_plan(nodes: list[dict[str, float]], device: str | None, num_encoders: int | None,
              encoder_threads: int | None, num_decoders: int | None) -> ResourcePlan:
    """The `ResourcePlan` for a cluster of ``nodes`` (each node's Ray resources: ``{"CPU": 16, "GPU": 1, ...}``).

    Raises:
        ResourcesUnavailable: the actors asked for do not fit the cluster's CPUs or GPUs (a fixed-size
            actor pool that cannot start would wait forever).
    """
    cpus = [int(node.get("CPU", 0)) for node in nodes]
    gpus = sum(int(node.get("GPU", 0)) for node in nodes)
    if device == "cpu" or (device is None and not gpus):
        if device is None:
            logger.warning("the cluster has no GPU: encoding on CPU (--device cuda waits for GPU nodes instead)")
        largest = max(cpus, default=1)
        if encoder_threads is not None and encoder_threads > largest:
            raise ResourcesUnavailable(f"--encoder-threads {encoder_threads}: no node has that many CPUs ({largest} at most)")
        # a 1-CPU machine: the encoder reserves none, the decoder holds the one CPU and they share it
        encoder_cpus = encoder_threads or (max(1, largest - 1) if sum(cpus) > 1 else 0)
        threads = encoder_threads or largest
        encoders = num_encoders or max(1, sum(count // (encoder_cpus + 1) for count in cpus))
        fit = sum(count // encoder_cpus for count in cpus) if encoder_cpus else encoders
        if encoders > fit:
            raise ResourcesUnavailable(f"{encoders} encoder(s) of {encoder_cpus} CPUs each: the nodes ({cpus} CPUs) "
                                       f"hold {fit}; lower --num-encoders or --encoder-threads")
        device, encoder_gpus = "cpu", 0.0
    else:
        if encoder_threads is not None:
            logger.warning("--encoder-threads %d is for CPU encoders: ignored on %s", encoder_threads, device or "cuda")
        encoders = num_encoders or gpus
        if encoders > gpus:
            raise ResourcesUnavailable(f"--num-encoders {encoders} needs as many GPUs; the cluster has {gpus}")
        device, encoder_gpus, encoder_cpus, threads = device or "cuda", 1.0, 0, None
    free = sum(cpus) - encoders * encoder_cpus
    decoders = num_decoders or max(1, free)
    if decoders > free:
        raise ResourcesUnavailable(
            f"the cluster has {sum(cpus)} CPUs: {encoders} encoder(s) x {encoder_cpus} CPU leave {max(free, 0)} "
            f"for {decoders} decoder(s); lower --encoder-threads, --num-encoders or --num-decoders")
    return ResourcePlan(device, encoders, encoder_gpus, encoder_cpus, threads, decoders)
