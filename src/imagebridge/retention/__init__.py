"""Retention: delivered images are removed after their period, except under a legal hold."""
