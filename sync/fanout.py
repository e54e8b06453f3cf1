"""Queue fan-out (``SYNC_FANOUT=queue``): one message per tenant, consumed by ``tenant_pull``."""

from __future__ import annotations

import json

from azure.core.exceptions import ResourceExistsError
from azure.storage.queue import QueueClient, TextBase64EncodePolicy

from .context import AppContext
from .http import transport_options


def queue_client(ctx: AppContext) -> QueueClient:
    """The fan-out queue in the state storage account (base64 text, as the Functions queue trigger expects)."""
    s = ctx.settings
    policy = TextBase64EncodePolicy()
    if s.storage.connection_string is not None:
        return QueueClient.from_connection_string(s.storage.connection_string, s.queue_name,
                                                  message_encode_policy=policy, **transport_options(s))
    if s.storage.queue_uri is None:
        raise ValueError("identity-based storage needs a queue service URI for SYNC_FANOUT=queue")
    return QueueClient(s.storage.queue_uri, s.queue_name, credential=ctx.credentials.storage(),
                       message_encode_policy=policy, **transport_options(s))


def enqueue_tenants(ctx: AppContext, direction: str) -> int:
    """Put one work message per configured tenant on ``SYNC_QUEUE``; returns the count."""
    client = queue_client(ctx)
    try:
        client.create_queue()
    except ResourceExistsError:
        pass
    for tenant in ctx.settings.tenants:
        client.send_message(json.dumps({"tenantId": tenant.tenant_id, "direction": direction}))
    return len(ctx.settings.tenants)
