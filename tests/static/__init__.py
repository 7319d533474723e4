"""Static checks: files of the repository read and checked as they are (ops files: compose,
systemd units, Prometheus config and rules, Grafana dashboards), with no model and no mesh.
They run in `make test` with every other tier; `pytest tests/static` runs them alone in seconds."""
