"""The durable job queue: work queued in the transaction that justifies it, run by workers."""
