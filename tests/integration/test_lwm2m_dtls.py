"""LwM2M over DTLS (``gateways.lwm2m.dtls``): a device registers (LwM2M 1.0 §5.3.1, ``POST /rd``) through
libcoap's ``coap-client-openssl``/``-gnutls`` with a pre-shared key and with an X.509 certificate generated
by the test; the application sees the registration on ``lwm2m/{ep}/up/register``. A wrong key or a
certificate of an unknown CA registers nothing and does not disturb another device. The endpoint name must be
the identity the device authenticated with (``check_endpoint_name``, LwM2M 1.1 Transport §5.2.8): its PSK
identity or its certificate's common name."""

from __future__ import annotations

import logging
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
DEVICES = {"dev-1": "key-1", "dev-2": "key-2"}  # PSK identity -> key; the certificate's CN is device-7


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as owned:
        yield owned


@pytest.fixture
def broker(start_broker: StartBroker, dtls_pki: DtlsPki) -> RunningBroker:  # noqa: F811
    return start_broker(gateways={"lwm2m": {"dtls": dtls_options(dtls_pki, psk=DEVICES)}})


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


def location(broker: RunningBroker, ep: str) -> str:
    """The registration location of endpoint ``ep`` (a new one each time it registers)."""
    gateway = broker.app.listeners["lwm2m:dtls"].gateway  # type: ignore[attr-defined]
    result: str = broker.call(lambda: gateway.devices[ep].location)
    return result


def identity_mismatches(broker: RunningBroker) -> int:
    gateway = broker.app.listeners["lwm2m:dtls"].gateway  # type: ignore[attr-defined]
    result: int = broker.call(lambda: gateway.counters.get("registrations_identity_mismatch", 0))
    return result


def device(identity: str) -> list[str]:
    """``-u IDENTITY -k KEY`` of a device of :data:`DEVICES`."""
    return psk_credentials(DEVICES[identity], identity)


@pytest.mark.parametrize("tool", ["coap-client-openssl", "coap-client-gnutls"])
def test_a_device_registers_over_dtls_with_a_pre_shared_key(
    broker: RunningBroker, app: Application, tool: str
) -> None:
    register(broker, "dev-1", device("dev-1"), tool=tool)
    body = app.next("lwm2m/dev-1/up/register", lambda b: b["msgType"] == "register")
    assert (body["data"]["ep"], body["data"]["lt"], body["data"]["lwm2m"]) == ("dev-1", 60, "1.0")
    assert "/3303/0" in body["data"]["objectList"]
    assert "dev-1" in endpoints(broker)


@pytest.mark.parametrize("tool", ["coap-client-openssl", "coap-client-gnutls"])
def test_a_device_registers_over_dtls_with_a_client_certificate(
    broker: RunningBroker,
    app: Application,
    dtls_pki: DtlsPki,  # noqa: F811
    tool: str,
) -> None:
    credentials = cert_credentials(dtls_pki.client_cert, dtls_pki.client_key, dtls_pki.ca)
    register(broker, "device-7", credentials, tool=tool)
    body = app.next("lwm2m/device-7/up/register", lambda b: b["msgType"] == "register")
    assert body["data"]["ep"] == "device-7"
    assert "device-7" in endpoints(broker)


def test_a_wrong_key_or_an_unknown_ca_registers_nothing_and_others_still_register(
    broker: RunningBroker,
    app: Application,
    dtls_pki: DtlsPki,  # noqa: F811
) -> None:
    register(broker, "dev-1", psk_credentials("wrong", "dev-1"), wait=1)
    rogue = ["-n", *cert_credentials(dtls_pki.rogue_cert, dtls_pki.rogue_key, dtls_pki.rogue_ca)]
    register(broker, "bad-ca", rogue, wait=1)
    assert broker.call(lambda: dtls_core(broker, "lwm2m:dtls").handshake_failures) == 2
    register(broker, "dev-2", device("dev-2"))
    body = app.next("lwm2m/dev-2/up/register", lambda b: b["msgType"] == "register")
    assert body["data"]["ep"] == "dev-2"
    assert endpoints(broker) == {"dev-2"}


def test_a_psk_device_may_not_register_another_endpoint_name(
    broker: RunningBroker, app: Application, caplog: pytest.LogCaptureFixture
) -> None:
    register(broker, "dev-2", device("dev-2"))
    app.next("lwm2m/dev-2/up/register", lambda b: b["msgType"] == "register")
    registered = location(broker, "dev-2")
    with caplog.at_level(logging.INFO, logger="mqgate.lwm2m"):
        output = register(broker, "dev-2", device("dev-1"))  # dev-1's key, dev-2's name
    assert "4.03" in output
    assert (endpoints(broker), location(broker, "dev-2")) == ({"dev-2"}, registered)  # dev-2 untouched
    assert identity_mismatches(broker) == 1
    (line,) = [r.message for r in caplog.records if "DTLS identity" in r.message]
    assert "127.0.0.1" in line and "'dev-2'" in line and "'dev-1'" in line


def test_a_psk_device_may_not_update_or_end_another_devices_registration(
    broker: RunningBroker, app: Application
) -> None:
    """Knowing dev-1's registration location is not enough: an update (``POST /rd/{location}``) or a
    de-registration (``DELETE``) from a peer with another identity gets 4.03 and changes nothing."""
    register(broker, "dev-1", device("dev-1"))
    app.next("lwm2m/dev-1/up/register", lambda b: b["msgType"] == "register")
    registered = location(broker, "dev-1")
    port: int = broker.app.listeners["lwm2m:dtls"].port  # type: ignore[attr-defined]
    for method in ("post", "delete"):
        result = coaps(port, method, f"rd/{registered}?lt=5", credentials=device("dev-2"))
        assert "4.03" in result.stdout + result.stderr, (method, result.stdout, result.stderr)
    assert identity_mismatches(broker) == 2
    assert (endpoints(broker), location(broker, "dev-1")) == ({"dev-1"}, registered)
    gateway = broker.app.listeners["lwm2m:dtls"].gateway  # type: ignore[attr-defined]
    assert broker.call(lambda: gateway.devices["dev-1"].info.lifetime) == 60
    result = coaps(port, "post", f"rd/{registered}?lt=90", credentials=device("dev-1"))  # its own: 2.04
    assert "4.03" not in result.stdout + result.stderr
    update = app.next("lwm2m/dev-1/up/update", lambda b: b["msgType"] == "update")
    assert update["data"]["lt"] == 90


def test_a_certificate_device_may_not_register_a_name_other_than_its_common_name(
    broker: RunningBroker,
    app: Application,
    dtls_pki: DtlsPki,  # noqa: F811
) -> None:
    credentials = cert_credentials(dtls_pki.client_cert, dtls_pki.client_key, dtls_pki.ca)
    assert "4.03" in register(broker, "dev-9", credentials)
    assert identity_mismatches(broker) == 1
    register(broker, "device-7", credentials)
    app.next("lwm2m/device-7/up/register", lambda b: b["msgType"] == "register")
    assert endpoints(broker) == {"device-7"}


def test_any_endpoint_name_registers_with_check_endpoint_name_off(
    start_broker: StartBroker,
    clients: Clients,
    dtls_pki: DtlsPki,  # noqa: F811
) -> None:
    options = dtls_options(dtls_pki, psk=DEVICES, check_endpoint_name=False)
    broker = start_broker(gateways={"lwm2m": {"dtls": options}})
    port = broker.port
    assert port is not None
    app = Application(clients.paho(port, "lwm2m-app", version=5))
    register(broker, "dev-2", device("dev-1"))
    app.next("lwm2m/dev-2/up/register", lambda b: b["msgType"] == "register")
    register(broker, "dev-9", cert_credentials(dtls_pki.client_cert, dtls_pki.client_key, dtls_pki.ca))
    app.next("lwm2m/dev-9/up/register", lambda b: b["msgType"] == "register")
    assert (endpoints(broker), identity_mismatches(broker)) == ({"dev-2", "dev-9"}, 0)


def test_the_psk_identity_authenticates_the_device_with_psk_identity_as_username(
    start_broker: StartBroker,
    clients: Clients,
    dtls_pki: DtlsPki,  # noqa: F811
) -> None:
    options = dtls_options(dtls_pki, psk=DEVICES, psk_identity_as_username=True)
    broker = start_broker(auth={"allow_anonymous": False}, gateways={"lwm2m": {"dtls": options}})
    output = register(broker, "dev-1", device("dev-1"))  # no password: the handshake proved the identity
    assert "4." not in output
    # a certificate gives no user name here (auth.peer_cert_as_username is off): anonymous, refused
    certificate = cert_credentials(dtls_pki.client_cert, dtls_pki.client_key, dtls_pki.ca)
    assert "4.03" in register(broker, "device-7", certificate)
    assert endpoints(broker) == {"dev-1"}
