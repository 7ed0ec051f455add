"""Protocol gateways (MQTT-SN, CoAP, LwM2M) that turn constrained devices into broker sessions.

Gateways reach the broker only through the interface in :mod:`gateways.base`.
"""
