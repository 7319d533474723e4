"""The test harness itself: leak guards (guards.py) and how tests start and end processes
(processes.py). Imported by tests/conftest.py; nothing here starts EdgeMesh."""
