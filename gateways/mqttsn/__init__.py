"""MQTT-SN 1.2 gateway (issue 3): sensors over UDP and serial links as broker sessions."""
