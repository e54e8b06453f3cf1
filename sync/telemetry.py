"""Telemetry: OpenTelemetry to Application Insights when ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is set."""

from __future__ import annotations

import logging

from .settings import telemetry_connection_string

log = logging.getLogger(__name__)
_configured = False


def configure_telemetry() -> bool:
    """Route logs, traces and metrics to Application Insights once per process; False when not configured."""
    global _configured
    if _configured:
        return True
    connection = telemetry_connection_string()
    if not connection:
        return False
    try:
        from azure.monitor.opentelemetry import configure_azure_monitor
    except ImportError:
        log.warning("APPLICATIONINSIGHTS_CONNECTION_STRING is set but azure-monitor-opentelemetry is not installed")
        return False
    configure_azure_monitor(connection_string=connection, logger_name="sync")
    _configured = True
    return True
