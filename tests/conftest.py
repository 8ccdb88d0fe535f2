from tests.daemon_fixtures import start_daemon  # noqa: F401 - fixture
