"""Telling people that a transfer has arrived: e-mail and webhooks, after the commit."""
