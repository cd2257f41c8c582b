"""Data sharing agreements between each institution and the network."""
