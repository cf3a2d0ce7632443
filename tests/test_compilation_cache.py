"""The persistent compilation cache's default: on for the CPU, off on a GPU unless a directory is named."""
import jax
import pytest

from jslora import compilation_cache


@pytest.fixture
def config_updates(monkeypatch):
    updates = {}  # recorded, not applied: the suite's own process keeps its settings
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.__setitem__(name, value))
    return updates


def test_auto_caches_on_the_cpu(config_updates, tmp_path, monkeypatch):
    monkeypatch.setattr(compilation_cache, "DEFAULT_DIR", str(tmp_path / "xla"))
    assert compilation_cache.enable("auto") == str(tmp_path / "xla")
    assert config_updates["jax_compilation_cache_dir"] == str(tmp_path / "xla")


def test_auto_leaves_a_gpu_uncached_but_a_named_directory_caches(config_updates, tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert compilation_cache.enable("auto") is None and not config_updates
    assert compilation_cache.enable(str(tmp_path)) == str(tmp_path)
    assert config_updates["jax_compilation_cache_dir"] == str(tmp_path)


@pytest.mark.parametrize("off", ["", None])
def test_empty_turns_it_off(config_updates, off):
    assert compilation_cache.enable(off) is None and not config_updates
