"""The sizes ekko accepts, in one place, so every layer rejects the same inputs.

The model language checks them when it reads a model; the runtime and the
`ekko` CLI check their arguments against the same constants. Each limit is
far beyond real recommendation models, and far below where something else
breaks first (an i64 id, a kernel whose size grows with the dim, a process
running out of memory), so a mistake fails up front with a message naming
the limit instead of minutes later.
"""

from __future__ import annotations

MAX_ROWS = 1 << 40
"""Rows of one table: 1.1e12, a 4 TiB table at dim 1 in f32. Ids are i64."""

MAX_DIM = 1 << 14
"""Values per embedding row (16,384); real models use 16 to 1,024."""

MAX_BATCH = 1 << 31
"""Ids in one update or lookup call (2,147,483,648)."""

MAX_PARTITIONS = 1 << 12
"""Row partitions of one kernel call (4,096): each is a task on the executor."""

MAX_PREFETCH = 1 << 8
"""Positions ahead a CPU update asks for rows (256): the cores track a few dozen misses."""

MAX_REPLICAS = 1 << 10
"""Replicas of one engine (1,024): each holds a serving copy of every table."""

MAX_MLP_WIDTH = 1 << 20
"""Units in one layer of a model's dense part (metadata only)."""

LIMITS = {"rows": MAX_ROWS, "dim": MAX_DIM, "batch": MAX_BATCH, "mlp width": MAX_MLP_WIDTH}


def limit_error(what: str, value: int, limit: int) -> str | None:
    """A message if `value` is not in 1..`limit`, naming the limit; else None."""
    if value < 1:
        return f"{what} must be positive, got {value}"
    if value > limit:
        shown = f"{value:,}" if value.bit_length() <= 64 else "more than an i64 holds"
        return f"{what} must be at most {limit:,}, got {shown}"
    return None
