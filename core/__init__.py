"""mqgate core: the embedded MQTT 3.1.1/5.0 broker, its listeners, configuration and command line."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
