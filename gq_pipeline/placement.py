"""Where a tokenization run processes its units, and with how much: the placement policy, Ray's start, the pool.

``Resources`` (gq_pipeline.options) says what the user asked for; this module turns it into a ``Placement`` for the
cluster at hand: the driver placement (this process runs the model; Ray is not started at all when nothing asks for
a cluster) or Ray actors (one per ``gpus_per_worker`` GPUs, or one per CPU node), how many workers, and the GPUs, CPUs
and decode threads of each. ``worker_pool`` builds the pool the scheduler feeds for that placement. The reasons and
measurements: docs/architecture.md ("Placement") and docs/benchmarks.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterator

from gq_pipeline.options import PLACEMENTS, Resources

__all__ = ["Placement", "place", "needs_ray", "ensure_ray", "choose_placement", "cluster_placement",
           "local_placement", "worker_pool", "DRIVER_DECODE_THREADS"]

DRIVER_DECODE_THREADS = 2  # decode threads beside a model in the driver (2 cores: measured in docs/benchmarks.md)


@dataclass(frozen=True)
class Placement:
    """The run's placement and the cluster it was chosen for (``as_dict()`` is the summary's
    ``throughput.resources``)."""

    cluster_cpus: float
    cluster_gpus: float
    nodes: int
    model_placement: str  # "driver" or "actors"
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    decode_threads: int
    ray: bool  # whether the run uses Ray at all

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def torch_threads(self) -> int:
        """torch's threads in each model process: its reserved CPUs, rounded up."""
        return max(1, int(math.ceil(self.cpus_per_worker - 1e-9)))

    @property
    def decode_niceness(self) -> int:
        """Decode threads beside a CPU model are niced, so torch's threads keep the cores; beside a GPU they are not."""
        return 10 if self.gpus_per_worker == 0 else 0

    def check_precision(self, precision: str) -> None:
        if precision == "bf16" and self.gpus_per_worker == 0:
            raise ValueError("--precision bf16 runs the encoder in bf16 on GPU actors, but this run has none "
                             "(no GPUs in the cluster, or --gpus-per-worker 0); use --precision fp32")

    def describe(self) -> list[str]:
        """The progress lines that say where the model runs."""
        if self.model_placement == "driver":
            return [f"model in this process ({self.cpus_per_worker:g} CPU threads, {self.decode_threads} decode "
                    f"threads)"]
        lines = [f"{self.workers} model worker(s), {self.gpus_per_worker:g} GPU / {self.cpus_per_worker:g} CPU / "
                 f"{self.decode_threads} decode threads each; cluster {self.cluster_cpus:g} CPU "
                 f"{self.cluster_gpus:g} GPU"]
        if self.gpus_per_worker > 0 and self.cluster_gpus == 0:
            lines.append("no GPU node has joined the cluster yet: the workers wait for one (autoscaling)")
        return lines


@contextlib.contextmanager
def place(res: Resources, verbose: bool = False) -> Iterator[Placement]:
    """The placement of a run, with Ray started or joined when it needs one (and shut down afterwards if this call
    started it). Without a cluster named or joined, a GPU or an actor setting, Ray is never imported."""
    started = False
    try:
        if needs_ray(res):
            started = ensure_ray(res, verbose)
            placement = cluster_placement(res)
        else:
            placement = local_placement(res)
        yield placement
    finally:
        if started:
            import ray

            ray.shutdown()


def ensure_ray(res: Resources, verbose: bool = False) -> bool:
    """Connect to ``ray_address``/``RAY_ADDRESS`` if given, else start a local cluster. True if we started it.
    Unless ``verbose``, Ray's own start-up messages and its workers' log lines stay out of the user's terminal:
    they are nothing a CLI user can act on (the workers' errors reach the summary as error records)."""
    import logging

    from gq_pipeline.ray_init import init_ray

    kwargs: dict[str, Any] = {"log_to_driver": bool(verbose)}
    if not verbose and not res.ray_address:
        kwargs["logging_level"] = logging.ERROR  # e.g. the token-auth and /dev/shm notices: nothing to act on
    if res.num_cpus:
        kwargs["num_cpus"] = int(res.num_cpus)
    if res.object_store_memory:
        kwargs["object_store_memory"] = int(res.object_store_memory)
    return init_ray(res.ray_address, **kwargs)


def needs_ray(res: Resources) -> bool:
    """False when the run can only be the driver placement on this machine: no cluster named or joined, no GPU, no
    actor settings. Then no Ray instance is started at all (3-8 s and ~1 GB saved on a laptop)."""
    import os

    if res.model_placement == "actors" or res.ray_address or os.environ.get("RAY_ADDRESS"):
        return True
    if res.gpus_per_worker not in (None, 0, 0.0) or res.workers not in (None, 1) or res.cpus_per_worker is not None:
        return True
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def choose_placement(requested: str, gpw: float, n_nodes: int, workers: int | None,
                     cpus_per_worker: float | None) -> str:
    """``driver``: this process runs the encoder and search on the units; ``actors``: a Ray actor pool does.

    ``auto`` picks the driver on a single CPU-only node, with no actor settings asked for. There an actor buys nothing
    and costs a process start, a second torch import and the weights' transfer, so on a small CPU machine the actor
    pool is measurably slower than the driver (the numbers: docs/benchmarks.md, "Tokenization pipeline"). GPUs and
    several nodes take actors: one per GPU.
    """
    if requested not in PLACEMENTS:
        raise ValueError(f"model placement must be one of {PLACEMENTS}, got {requested!r}")
    if requested == "driver" and gpw > 0:
        raise ValueError("--model-placement driver runs the model on this process's CPU, but the run asks for GPU "
                         "actors (the cluster has GPUs): use --model-placement actors, or --gpus-per-worker 0")
    if requested == "driver" and workers not in (None, 1):
        raise ValueError(f"--model-placement driver runs one model, in this process; --workers {workers} asks for "
                         f"an actor pool")
    if requested != "auto":
        return requested
    return "driver" if gpw == 0 and n_nodes <= 1 and workers in (None, 1) and cpus_per_worker is None else "actors"


def cluster_placement(res: Resources) -> Placement:
    """Where the model runs, how many workers, and CPUs/GPUs/decode threads per worker, for the connected cluster.

    GPU intent comes from the settings: ``gpus_per_worker=1`` on a cluster that has no GPU node *yet* (an autoscaler
    adds them for the pending actors) is honoured; only the default (``None``) looks at what the cluster has now."""
    import ray

    cluster = ray.cluster_resources()
    n_gpu, n_cpu = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
    gpw = (1.0 if n_gpu > 0 else 0.0) if res.gpus_per_worker is None else float(res.gpus_per_worker)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    # A driver outside the cluster (Ray Client) would pull every decoded image over the network: it counts as a
    # second node, so auto keeps the model on the cluster.
    on_cluster = ray.get_runtime_context().get_node_id() in [n["NodeID"] for n in nodes]
    placement = choose_placement(res.model_placement, gpw, len(nodes) + (0 if on_cluster else 1), res.workers,
                                 res.cpus_per_worker)
    per_node = min((n["Resources"]["CPU"] for n in nodes), default=1.0)
    workers, cpus_per_worker, decode_threads = res.workers, res.cpus_per_worker, res.decode_threads
    if placement == "driver":
        workers, cpus_per_worker = 1, cpus_per_worker or n_cpu
        decode_threads = decode_threads or DRIVER_DECODE_THREADS
    elif gpw > 0:
        workers = workers or max(1, int(n_gpu // gpw))
        # CPUs to decode for one GPU: what the cluster has per GPU, within [2, 8]; 4 when no GPU node has joined yet.
        per_gpu = n_cpu / n_gpu if n_gpu else 4.0
        cpus_per_worker = cpus_per_worker or float(min(8, max(2, int(per_gpu * gpw))))
        decode_threads = decode_threads or max(1, int(cpus_per_worker))
    else:  # CPU-only cluster: one actor per node holding the node's cores; its decode threads run niced beside torch
        workers = workers or max(1, len(nodes))
        cpus_per_worker = cpus_per_worker or max(1.0, per_node)
        decode_threads = decode_threads or 2
    return Placement(cluster_cpus=n_cpu, cluster_gpus=n_gpu, nodes=len(nodes), model_placement=placement,
                     workers=int(workers), gpus_per_worker=gpw, cpus_per_worker=float(cpus_per_worker),
                     decode_threads=int(decode_threads), ray=True)


def local_placement(res: Resources) -> Placement:
    """The driver placement on this machine without starting Ray: nothing in it needs Ray."""
    import os

    n_cpu = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    return Placement(cluster_cpus=n_cpu, cluster_gpus=0.0, nodes=1, model_placement="driver", workers=1,
                     gpus_per_worker=0.0, cpus_per_worker=n_cpu,
                     decode_threads=int(res.decode_threads or DRIVER_DECODE_THREADS), ray=False)


@contextlib.contextmanager
def worker_pool(gq, spec, placement: Placement, precision: str, latents: bool, res: Resources):
    """The pool the scheduler feeds: threads of this process around the loaded model (driver placement, with
    torch's thread count set for the run and put back), or an elastic pool of Ray actors that keeps between
    ``res.min_workers`` (waiting up to ``res.worker_timeout_s`` for them) and ``placement.workers`` alive."""
    from gq_pipeline.scheduler import ActorPool, LocalPool
    from gq_pipeline.worker import ModelRunner, UnitProcessor, UnitWorkerActor, model_payload

    if placement.model_placement == "driver":
        import torch

        saved = torch.get_num_threads()
        torch.set_num_threads(placement.torch_threads)
        proc = UnitProcessor(spec, ModelRunner(gq.eval(), batch_size=spec.batch_size, precision="fp32",
                                               latents=latents))
        pool = LocalPool(proc.process, concurrency=2, cancel=proc.cancel, stats=proc.stats, live=proc.live_counts)
        try:
            yield pool
        finally:
            pool.close()
            proc.close()
            torch.set_num_threads(saved)
        return
    import ray

    payload_ref = ray.put(model_payload(gq))
    options: dict[str, Any] = {"num_cpus": placement.cpus_per_worker, "max_restarts": 0, "max_concurrency": 2}
    if placement.gpus_per_worker > 0:
        options["num_gpus"] = placement.gpus_per_worker
    actor_cls = ray.remote(UnitWorkerActor).options(**options)

    def make_actor():
        return actor_cls.remote([payload_ref], spec, use_gpu=placement.gpus_per_worker > 0,
                                cpu_threads=placement.torch_threads, precision=precision, latents=latents)

    pool = ActorPool(make_actor, placement.workers, per_actor=2, min_ready=res.min_workers,
                     start_timeout_s=res.worker_timeout_s)
    try:
        yield pool
    finally:
        pool.close()
