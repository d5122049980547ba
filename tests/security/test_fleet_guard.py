"""The guard in front of the SuperLink's Fleet API (`server/fleet_guard.py`), attacked from its headers: an
oversized or unsigned request is refused before the app behind it reads a byte of the body, a chunked
body is cut at the bound, and only a fresh signature by a registered key (or, for a node's activation,
by any key, with a small body) gets through. The deployment tests attack it again through the real proxy
and SuperLink (memory flat under 50 unauthenticated 256 MiB posts)."""

from __future__ import annotations

import datetime
from base64 import b64encode
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes, sign_message
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from server.fleet_guard import MAX_ACTIVATION_BODY, MAX_FLEET_BODY, FleetGuard

pytestmark = pytest.mark.security
READ: list[int] = []  # body sizes the app behind the guard read


async def fleet(request: Request) -> PlainTextResponse:
    body = await request.body()
    READ.append(len(body))
    return PlainTextResponse(str(len(body)))


class Registered:
    """The SuperLink's node registry as the guard asks it (Flower's LinkState method)."""

    def __init__(self, *keys: bytes) -> None:
        self.keys = keys

    def get_node_id_by_public_key(self, key: bytes) -> int | None:
        return 7 if key in self.keys else None


KEY, PUBLIC = generate_key_pairs()
OTHER, OTHER_PUBLIC = generate_key_pairs()


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = Starlette(routes=[Route("/v1/fleet/{call}", fleet, methods=["POST"])])
    app.add_middleware(FleetGuard)
    registry = Registered(public_key_to_bytes(PUBLIC))
    app.state.enable_supernode_auth = True
    app.state.linkstate_factory = SimpleNamespace(state=lambda: registry)
    READ.clear()
    with TestClient(app) as test_client:
        yield test_client


def signed(key=KEY, public=PUBLIC, age_s: float = 0.0) -> dict[str, str]:
    stamp = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=age_s)).isoformat()
    return {
        "flwr-public-key": b64encode(public_key_to_bytes(public)).decode(),
        "flwr-signature": b64encode(sign_message(key, stamp.encode())).decode(),
        "flwr-timestamp": stamp,
    }


def test_a_registered_nodes_signed_request_gets_through(client: TestClient) -> None:
    reply = client.post("/v1/fleet/push-object", content=b"x" * 1000, headers=signed())
    assert reply.status_code == 200 and READ == [1000]


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "no signature"),
        (signed(OTHER, OTHER_PUBLIC), "a key nobody registered"),
        (signed(age_s=3600), "a stale timestamp"),
        ({**signed(), "flwr-signature": b64encode(b"\0" * 64).decode()}, "a forged signature"),
        ({**signed(), "flwr-public-key": "%%%"}, "a key that is not base64"),
    ],
)
def test_an_unsigned_or_forged_request_is_refused_unread(client: TestClient, headers: dict, why: str) -> None:
    reply = client.post("/v1/fleet/push-object", content=b"x" * 1000, headers=headers)
    assert reply.status_code == 401 and READ == [], why


def test_an_oversized_body_is_refused_unread_and_a_chunked_one_is_cut(client: TestClient) -> None:
    big = {"content-length": str(256 << 20), **signed()}
    assert client.post("/v1/fleet/push-object", headers=big, content=b"").status_code == 413
    assert READ == []

    def chunks() -> Iterator[bytes]:  # no length declared: the body streams past the bound
        for _ in range(MAX_FLEET_BODY // (1 << 20) + 4):
            yield b"\0" * (1 << 20)

    with pytest.raises(ClientDisconnect):  # what the app behind sees: the client went away at the bound
        client.post("/v1/fleet/push-object", content=chunks(), headers=signed())
    assert READ == []  # it never had the whole body


def test_a_node_activates_with_any_valid_signature_and_a_small_body_only(client: TestClient) -> None:
    """Flower itself answers an unregistered key's activation (with its own reason); the guard lets a
    signed activation through, but never a large one."""
    other = signed(OTHER, OTHER_PUBLIC)
    assert client.post("/v1/fleet/activate-node", content=b"k" * 100, headers=other).status_code == 200
    too_big = {**other, "content-length": str(MAX_ACTIVATION_BODY + 1)}
    assert (
        client.post(
            "/v1/fleet/activate-node", content=b"k" * (MAX_ACTIVATION_BODY + 1), headers=too_big
        ).status_code
        == 413
    )
    assert client.post("/v1/fleet/activate-node", content=b"k").status_code == 401
    assert READ == [100]
