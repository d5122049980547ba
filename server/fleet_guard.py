"""Who may make the SuperLink read a body: a guard in front of Flower's Fleet API, before any of it runs.

Flower 1.41 reads a Fleet request's whole body (to parse its protobuf) before it checks the node's
signature, and nothing bounds the body: one unauthenticated 256 MiB POST grew the SuperLink by 740 MB,
for good. This guard is the outermost layer of the SuperLink's web app (`server/superlink.py` installs
it) and looks at the request's headers only:

- a body larger than `MAX_FLEET_BODY` is refused (413) unread, and a chunked body is cut there;
- with node authentication on, a request is let in only when it is signed, within Flower's time window,
  by a node key the operator registered (`fedretina server add-site`); anything else is refused (401)
  before a byte of its body is read. Flower's own check (which also matches the key to the node id in
  the body) still follows. A node's first call (activation) needs only a valid signature, with a body
  of at most `MAX_ACTIVATION_BODY`: Flower itself then tells an unregistered node why it is refused.

The largest legitimate Fleet body is one chunk of an array (Flower splits every array into chunks of
`FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`, `shared/federation/wire.py:CHUNK_BYTES`, and our weights travel packed
in one array) plus its framing, whatever the model's size; messages' own records (specs, metrics) are
kilobytes. The proxy (`server/deploy.py`) bounds bodies at the same size, and the site daemon pins the chunk
size its SuperNode uses.
"""

from __future__ import annotations

import binascii
import datetime
from base64 import b64decode
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
from starlette.concurrency import run_in_threadpool

from shared.federation.wire import CHUNK_BYTES

FLEET_PREFIX = "/v1/fleet/"  # all a SuperNode ever calls (flwr/supernode/fleet_http_client.py)
MAX_FLEET_BODY = CHUNK_BYTES + (3 << 20)  # one array chunk and its framing, with room to spare: 8 MiB
SIGNATURE_HEADER = FLEET_HTTP_SIGNATURE_HEADER  # present on every call of an authenticating SuperNode
# A node introducing itself (its key and heartbeat interval): Flower answers an unregistered key itself.
ACTIVATION = frozenset({f"{FLEET_PREFIX}activate-node", f"{FLEET_PREFIX}register-node"})
MAX_ACTIVATION_BODY = 64 << 10

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class FleetGuard:
    """ASGI middleware: Fleet requests past it are bounded in size and, under node authentication, signed
    by a registered node; others are refused from their headers alone."""

    def __init__(self, app: App, max_body: int = MAX_FLEET_BODY) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(FLEET_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        activation = scope["path"] in ACTIVATION
        limit = MAX_ACTIVATION_BODY if activation else self.max_body
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > limit:
            await _refuse(send, 413, f"this Fleet request's body is at most {limit} bytes")
            return
        if scope["app"].state.enable_supernode_auth and not await run_in_threadpool(
            signed, scope["app"], headers, registered=not activation
        ):
            await _refuse(send, 401, "Invalid SuperNode authentication")
            return
        await self.app(scope, _bounded(receive, limit), send)


def signed(app: Any, headers: dict[str, str], *, registered: bool) -> bool:
    """The request carries a valid signature, made within Flower's window, by a key the SuperLink knows
    (or, not `registered`, by any key: a node's activation, which Flower checks itself)."""
    try:
        public_key = b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER], validate=True)
        signature = b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER], validate=True)
        stamp = headers[TIMESTAMP_HEADER]
        age = (datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(stamp)).total_seconds()
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            return False
        if not verify_signature(bytes_to_public_key(public_key), stamp.encode("ascii"), signature):
            return False
    except (KeyError, ValueError, TypeError, UnicodeError, binascii.Error):
        return False
    return (
        not registered
        or app.state.linkstate_factory.state().get_node_id_by_public_key(public_key) is not None
    )


def _bounded(receive: Receive, limit: int) -> Receive:
    """`receive` that ends the request as a disconnect once its body passes `limit` bytes (a chunked body
    declares no length up front)."""
    seen = 0

    async def bounded() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                return {"type": "http.disconnect"}
        return message

    return bounded


async def _refuse(send: Send, status: int, reason: str) -> None:
    body = reason.encode()
    headers = [
        (b"content-type", b"text/plain"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
