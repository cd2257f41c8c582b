"""Transport security: the network's certificate authority and the TLS contexts built on it."""
