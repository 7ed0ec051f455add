"""Authentication and authorisation shared by every protocol (MQTT, MQTT-SN, CoAP, LwM2M).

:class:`AccessControl` is what the broker owns: ``authenticate`` at connect, ``check_publish`` and
``check_subscribe`` (topic rewrite first, then the ACL) per message and subscription.
"""

from __future__ import annotations

from core.auth.access import AccessControl, peer_host

__all__ = ["AccessControl", "peer_host"]
