"""The update engine: a primary, a scheduler, serving replicas and health checks.

It takes the trainer's sparse updates through the compiled fused update
kernels on the primary and carries their values to live serving replicas in
packets (see docs/engine.md). `ekko.Engine` and `ekko.Packet` are the
public names.
"""

from .engine import Engine
from .inputs import Gathered
from .packet import Packet, PacketError
from .replica import ReplicaDiverged
from .scheduler import POLICIES, ManualClock, SchedulerConfig
from .state import HealthConfig, Rollback

__all__ = ["Engine", "Gathered", "HealthConfig", "ManualClock", "POLICIES", "Packet", "PacketError",
           "ReplicaDiverged", "Rollback", "SchedulerConfig"]
