"""The fault-injection suite: crashes of every process while a study crosses the network."""
