"""LwM2M gateway (issue 5): device registry and management through MQTT."""
