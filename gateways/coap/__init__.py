"""CoAP gateway (issue 4): /mqtt/{topic} and /ps publish and observe-subscribe."""
