"""Join a Ray cluster, or start the embedded single-machine one, the same way in every gq job.

A cluster named by an address (``--ray-address`` or ``RAY_ADDRESS``) is joined as it is. Otherwise gq starts a local
instance for this process bound to 127.0.0.1: a tokenization run on a laptop or a shared server must not expose a
Ray cluster, which executes arbitrary code for whoever reaches it, on the network.

Ray picks the node address from ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, which it reads from
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is first imported; ``ray.init(_node_ip_address=...)`` alone
still left the GCS and raylet listening on the external address (measured with ``ss -ltnp``, Ray 2.60). So a local
start turns that flag off for the duration of ``ray.init`` (unless the user set the variable to 1 to want a
reachable node), whenever ``ray`` was imported.
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["init_ray"]


def init_ray(address: str | None = None, **local_kwargs: Any) -> bool:
    """Connect or start Ray unless it is already initialized; True if this call started or joined it (so the caller
    should ``ray.shutdown()`` when done). ``local_kwargs`` (num_cpus, object_store_memory, ...) apply only to a
    local start, except ``log_to_driver``, which applies to both."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=local_kwargs.get("log_to_driver", True))
        return True
    local_kwargs.setdefault("include_dashboard", False)
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0") in ("1", "true", "True"):
        ray.init(address="local", **local_kwargs)  # the user asked for a node reachable from other machines
        return True
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # address="local": without it ray.init joins whatever cluster /tmp/ray/ray_current_cluster names (the last
        # `ray start` on this machine, possibly someone else's or long dead).
        ray.init(address="local", _node_ip_address="127.0.0.1", **local_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    return True
