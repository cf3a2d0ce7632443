"""jslora.bench.hlo_sources: a step's kernels traced back to the lines of JAX code XLA compiled them from."""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from jslora.bench.hlo_sources import instruction_sources, kernels_by_source, module_sources


def _two_fusions(x, y):
    joined = jnp.concatenate([x, y], axis=0)          # fused with the product and the sum below
    total = (joined * 2.0).sum(axis=0)
    return total, jnp.sin(x) @ y.T


def _optimized_hlo():
    args = jnp.ones((4, 8)), jnp.ones((4, 8))
    return jax.jit(_two_fusions).lower(*args).compile().as_text()


def test_a_fusion_names_every_line_fused_into_it():
    sources = instruction_sources(_optimized_hlo())
    first = inspect.getsourcelines(_two_fusions)[1]
    concat_line, sum_line = first + 1, first + 2
    # the fusion holding the concatenate also holds the product and the sum: all three lines are named
    fused = next(r["fused"] for r in sources.values() if any("concatenate" in f for f in r["fused"]))
    here = "test_hlo_sources.py"
    assert any(f"concatenate @ {here}:{concat_line} (_two_fusions)" in f for f in fused)
    assert any(f"mul @ {here}:{sum_line} (_two_fusions)" in f for f in fused)
    assert all("." not in name for name in sources)  # keyed as the kernels are named


def test_the_module_naming_the_profiled_kernels_is_chosen(tmp_path):
    text = _optimized_hlo()
    names = list(instruction_sources(text))
    (tmp_path / "module_0001.jit_other.after_optimizations.txt").write_text(
        "HloModule other\n\nENTRY %main (p: f32[1]) -> f32[1] {\n  ROOT %p = f32[1]{0} parameter(0)\n}\n")
    (tmp_path / "module_0002.jit_step.after_optimizations.txt").write_text(text)
    (tmp_path / "module_0002.jit_step.before_optimizations.txt").write_text("not read")
    assert set(module_sources(str(tmp_path), names)) == set(names)
    assert module_sources(str(tmp_path), names, module="nothing_like_it") == {}


def test_kernels_are_summed_per_step_and_the_known_ones_skipped():
    sources = {"loop_add_fusion_3": {"op": "jit(f)/add", "source": "llama.py:120 (f)", "fused": ["add @ x"]}}
    kernels = [{"name": "loop_add_fusion_3", "dur": 2.0}, {"name": "loop_add_fusion_3", "dur": 4.0},
               {"name": "input_slice_fusion", "dur": 1.0, "args": {"hlo_op": "input_slice_fusion.1"}},
               {"name": "gemm_fusion_dot_4", "dur": 50.0}, {"name": "lora_shrink", "dur": 9.0}]
    rows = kernels_by_source(kernels, sources, steps=2)
    assert rows[0] == ["loop_add_fusion_3", 3.0, 1.0, "jit(f)/add", "llama.py:120 (f)", ["add @ x"]]
    assert rows[1][:3] == ["input_slice_fusion_1", 0.5, 0.5] and rows[1][3:] == ["", "", []]
    assert len(rows) == 2
