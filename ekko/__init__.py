"""ekko: compile sparse updates and serving lookups of recommendation models.

This module is the public Python API: re-exports only, no logic.
"""

__version__ = "0.1.0"
