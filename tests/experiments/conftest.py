"""Fixtures shared by the study tests."""

import importlib

import pytest


@pytest.fixture(scope="session")
def quick_config():
    """``quick_config(name, results_dir, **overrides)``: ``configs/<name>.py``'s quick variant
    writing under ``results_dir``, with ``overrides`` applied by ``ConfigDict.update``.

    Session-scoped (it holds no state) so that module-scoped fixtures can use it too.
    """

    def load(name, results_dir, **overrides):
        config = importlib.import_module(f"configs.{name}").get_config("quick")
        config.results_dir = str(results_dir)
        config.update(overrides)
        return config

    return load
