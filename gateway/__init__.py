"""labelgrid's REST gateway: MONAI Label 0.8.5's HTTP API, answered by the gRPC services.

Stateless: every request becomes one or a few gRPC calls; volumes stream through in chunks.
"""

from __future__ import annotations

__version__ = "0.1.0"
