"""benchmarks.common.copy_rates: a torch copy that cannot get its memory is reported, not fatal."""
import pytest

torch = pytest.importorskip("torch")


def test_a_torch_copy_out_of_memory_leaves_the_xla_rates(monkeypatch):
    from benchmarks import common

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "empty", no_memory)
    rates = common.copy_rates(gib=1 / 256)
    assert rates["torch_copy"].startswith("failed: OutOfMemoryError")
    assert all(isinstance(v, float) and v > 0 for k, v in rates.items() if k.startswith("xla_"))
