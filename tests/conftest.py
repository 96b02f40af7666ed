"""Shared fixtures: one prepared tiny profile per test session (offline, CPU), in a temporary home."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory):
    """$AUTOBUSTER_HOME with the tiny profile prepared (synthetic clips, warm-started tiny model)."""
    home = os.environ.get("AUTOBUSTER_TEST_HOME") or str(tmp_path_factory.mktemp("home"))
    os.environ["AUTOBUSTER_HOME"] = home
    from autobuster.preparation import prepare
    prepare("tiny")
    return home
