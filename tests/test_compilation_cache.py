"""The persistent compilation cache: a directory turns it on, '' or None leaves it off."""
import jax
import pytest

from jslora import compilation_cache


@pytest.fixture
def config_updates(monkeypatch):
    updates = {}  # recorded, not applied: the suite's own process keeps its settings
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.__setitem__(name, value))
    return updates


def test_a_directory_turns_it_on(config_updates, tmp_path):
    assert compilation_cache.enable(str(tmp_path / "xla")) == str(tmp_path / "xla")
    assert config_updates["jax_compilation_cache_dir"] == str(tmp_path / "xla")
    assert (tmp_path / "xla").is_dir()


@pytest.mark.parametrize("off", ["", None])
def test_empty_turns_it_off(config_updates, off):
    assert compilation_cache.enable(off) is None and not config_updates
