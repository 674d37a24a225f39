"""Shared pytest set-up. Fixtures of each area live in their own module, loaded here."""

pytest_plugins = ["viz_fixtures"]  # Visdom server, dead/hung ports, Chromium (tests/test_viz*.py)
