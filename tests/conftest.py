"""Test-session wiring: real servers (SeaweedFS, PostgreSQL) started once per session."""

pytest_plugins = [
    "tests.fixtures.seaweedfs",
    "tests.fixtures.postgres",
    "tests.fixtures.orthanc",
    "tests.fixtures.node",
    "tests.fixtures.chart",
]
