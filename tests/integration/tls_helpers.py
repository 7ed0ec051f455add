"""Helpers for the TLS integration tests: certificates generated on the fly with the ``cryptography``
package (nothing committed, nothing that expires), and a paho-mqtt client over TLS or WebSocket that reports
CONNACK, SUBACK and PUBACK reason codes."""

from __future__ import annotations

import datetime
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from tests.integration.helpers import TIMEOUT

__all__ = ["TlsClient", "issue", "name", "write_pair"]


def name(common_name: str | None, organisation: str | None = None) -> x509.Name:
    """A subject or issuer name: CN and optionally O (either may be left out)."""
    attributes = []
    if organisation is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def issue(
    subject: str | x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: str | x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    sans: Sequence[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """A certificate valid from five minutes ago for one day, signed by ``issuer_key``."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject if isinstance(subject, x509.Name) else name(subject))
        .issuer_name(issuer if isinstance(issuer, x509.Name) else name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_pair(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """``stem.pem`` (the certificate) and ``stem.key`` (its unencrypted PKCS#8 key) in ``directory``."""
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


class TlsClient:
    """A paho client (network loop in a thread) over TLS, WebSocket or both, with the reason codes of its
    acknowledgements and a queue of the messages it receives. ``wait_connack`` returns the CONNACK code."""

    def __init__(
        self,
        port: int,
        client_id: str,
        *,
        version: int = 4,
        transport: Literal["tcp", "websockets"] = "tcp",
        context: Any = None,
        server_hostname: str | None = None,
        username: str | None = None,
    ) -> None:
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.reason_code: int | None = None
        self._acks: dict[int, int] = {}
        self._acked = threading.Condition()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if version == 5 else paho.MQTTv311,
            transport=transport,
            reconnect_on_failure=False,
        )
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        if context is not None:
            self.client.tls_set_context(context)
        if username is not None:
            self.client.username_pw_set(username)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda client, userdata, message: self.messages.put(message)
        self.client.on_subscribe = lambda c, u, mid, codes, props: self._ack(mid, int(codes[0].value))
        self.client.on_publish = lambda c, u, mid, code, props: self._ack(mid, int(code.value))
        self.client.connect(server_hostname or "127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.reason_code = int(rc.value)
        self.connected.set()

    def _ack(self, mid: int, code: int) -> None:
        with self._acked:
            self._acks[mid] = code
            self._acked.notify_all()

    def _wait_ack(self, mid: int) -> int:
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self._acks, TIMEOUT), f"no acknowledgement of {mid}"
            return self._acks.pop(mid)

    def wait_connack(self) -> int:
        assert self.connected.wait(TIMEOUT), "no CONNACK"
        assert self.reason_code is not None
        return self.reason_code

    def wait_connected(self) -> None:
        assert self.wait_connack() == 0

    def subscribe(self, topic: str, qos: int = 1) -> int:
        """SUBSCRIBE; the SUBACK code (granted QoS, or a v5 failure reason code)."""
        mid = self.client.subscribe(topic, qos)[1]
        assert mid is not None
        return self._wait_ack(mid)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """PUBLISH at QoS 1; the PUBACK reason code (always 0 in MQTT 3.1.1)."""
        return self._wait_ack(self.client.publish(topic, payload, qos).mid)

    def receive(self) -> paho.MQTTMessage:
        return self.messages.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets()  # paho keeps a socket pair for its loop; close it too
