"""What operators watch: liveness, readiness and Prometheus metrics."""
