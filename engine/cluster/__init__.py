"""ekko.Engine across processes and hosts, on Ray: `Engine(model, replicas=N, cluster=...)`.

    with ekko.Engine(model, replicas=2, cluster="local") as engine:   # or "auto", "ray://h:p"
        engine.step("t_cat0", ids, grads)     # durable on its primary shard when it returns
        engine.flush()                        # every replica holds every committed update
        engine.replicas[0].lookup("cat0", ids, offsets)     # a copy, from that process
        engine.replicas[0].pid                # the replica's process id

The same API and semantics as the in-process engine. Primary shards
(`primary_shards=K`, tables split by contiguous row ranges) and replicas
(a full serving copy each) are Ray actors built in `engine/actors.py`; the
scheduler's links stay in this process (one per replica and shard, the
in-process `Link` with its policies and budget), and packets go from a
shard to a replica through Ray's object store without passing through here.

Faults: Ray restarts a killed actor (`max_restarts`). A replica restores
its snapshot and catches up from the shards' model-update caches before it
serves again; lookups go to the other replicas meanwhile. A primary shard
reloads its snapshot and replays its durable log; a step caught by the
restart is resent with the same sequence number and answered once. A link
whose send failed asks its replica to catch up with that shard before it
moves its watermark. See docs/engine.md, "Across processes and hosts".

The package, one file a job: `plumbing.py` (starting or joining Ray, calls
with the engine's error rules), `links.py` (the scheduler's links sending
through Ray), `proxies.py` (what users hold: engine.replicas[i],
engine.primary; each replica's port) and `transport.py` (building the
actors and links; the primary shards' port). The engine's logic is
`ekko.Engine`'s (engine/engine.py), the same as in process.
"""

from .plumbing import Unavailable, call, connect
from .proxies import PrimaryShards, RemoteReplica
from .transport import RayTransport, ShardsPort

__all__ = ["PrimaryShards", "RayTransport", "RemoteReplica", "ShardsPort", "Unavailable", "call",
           "connect"]
