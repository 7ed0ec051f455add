"""LwM2M over DTLS (``gateways.lwm2m.dtls``): a device registers (LwM2M 1.0 §5.3.1, ``POST /rd``) through
libcoap's ``coap-client-openssl``/``-gnutls`` with a pre-shared key and with an X.509 certificate generated
by the test; the application sees the registration on ``lwm2m/{ep}/up/register``. A wrong key or a
certificate of an unknown CA registers nothing and does not disturb another device."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import RunningBroker
from tests.integration.helpers import Clients
from tests.integration.test_coap_dtls import (
    DtlsPki,
    cert_credentials,
    coaps,
    dtls_core,
    dtls_options,
    dtls_pki,  # noqa: F401  (the "dtls_pki" fixture)
    psk_credentials,
)
from tests.integration.test_lwm2m_gateway import Application

StartBroker = Callable[..., RunningBroker]

LINKS = "</1/0>,</3/0>,</3303/0>"


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


@pytest.fixture
def broker(start_broker: StartBroker, dtls_pki: DtlsPki) -> RunningBroker:  # noqa: F811
    return start_broker(gateways={"lwm2m": {"dtls": dtls_options(dtls_pki)}})


@pytest.fixture
def app(broker: RunningBroker, clients: Clients) -> Application:
    port = broker.port
    assert port is not None
    return Application(clients.paho(port, "lwm2m-app", version=5))


def register(broker: RunningBroker, ep: str, credentials: list[str], **options: Any) -> str:
    """``POST /rd?ep=..&lt=60&lwm2m=1.0`` with a link-format body over DTLS; libcoap's output."""
    port: int = broker.app.listeners["lwm2m:dtls"].port  # type: ignore[attr-defined]
    args = ["-t", "40", *credentials]  # Content-Format: application/link-format
    result = coaps(port, "post", f"rd?ep={ep}&lt=60&lwm2m=1.0", credentials=args, payload=LINKS, **options)
    return result.stdout + result.stderr


def endpoints(broker: RunningBroker) -> set[str]:
    gateway = broker.app.listeners["lwm2m:dtls"].gateway  # type: ignore[attr-defined]
    result: set[str] = broker.call(lambda: set(gateway.devices))
    return result


@pytest.mark.parametrize("tool", ["coap-client-openssl", "coap-client-gnutls"])
def test_a_device_registers_over_dtls_with_a_pre_shared_key(
    broker: RunningBroker, app: Application, tool: str
) -> None:
    register(broker, "psk-dev", psk_credentials(), tool=tool)
    body = app.next("lwm2m/psk-dev/up/register", lambda b: b["msgType"] == "register")
    assert (body["data"]["ep"], body["data"]["lt"], body["data"]["lwm2m"]) == ("psk-dev", 60, "1.0")
    assert "/3303/0" in body["data"]["objectList"]
    assert "psk-dev" in endpoints(broker)


@pytest.mark.parametrize("tool", ["coap-client-openssl", "coap-client-gnutls"])
def test_a_device_registers_over_dtls_with_a_client_certificate(
    broker: RunningBroker,
    app: Application,
    dtls_pki: DtlsPki,  # noqa: F811
    tool: str,
) -> None:
    credentials = cert_credentials(dtls_pki.client_cert, dtls_pki.client_key, dtls_pki.ca)
    register(broker, "cert-dev", credentials, tool=tool)
    body = app.next("lwm2m/cert-dev/up/register", lambda b: b["msgType"] == "register")
    assert body["data"]["ep"] == "cert-dev"
    assert "cert-dev" in endpoints(broker)


def test_a_wrong_key_or_an_unknown_ca_registers_nothing_and_others_still_register(
    broker: RunningBroker,
    app: Application,
    dtls_pki: DtlsPki,  # noqa: F811
) -> None:
    register(broker, "bad-key", psk_credentials("wrong"), wait=1)
    rogue = ["-n", *cert_credentials(dtls_pki.rogue_cert, dtls_pki.rogue_key, dtls_pki.rogue_ca)]
    register(broker, "bad-ca", rogue, wait=1)
    assert broker.call(lambda: dtls_core(broker, "lwm2m:dtls").handshake_failures) == 2
    register(broker, "good-dev", psk_credentials())
    body = app.next("lwm2m/good-dev/up/register", lambda b: b["msgType"] == "register")
    assert body["data"]["ep"] == "good-dev"
    assert endpoints(broker) == {"good-dev"}
