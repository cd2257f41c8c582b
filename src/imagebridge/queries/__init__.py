"""Query/retrieve across the network: the hub's tasks for gateways, and their answers."""
