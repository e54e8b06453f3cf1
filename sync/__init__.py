"""Defender XDR ⇄ Microsoft Sentinel incident sync engine."""
