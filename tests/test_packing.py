"""A step's metadata packed into two buffers (jslora.model.packing) comes back leaf for leaf."""
from __future__ import annotations

import jax
import numpy as np

from jslora import LLM, SamplingParams
from jslora.loading.peft_adapter import dummy_adapter
from jslora.model.packing import pack_batch, unpack_batch


def test_a_step_batch_round_trips_through_two_buffers(rng):
    llm = LLM("dummy:tiny", engine=dict(max_batch=8, max_num_batched_tokens=64), max_model_len=256)
    llm.add_adapter("a", dummy_adapter(llm.config, 8, ("q", "v"), seed=1))
    engine = llm.engine
    seen = []
    run = engine.runner.run
    engine.runner.run = lambda batch, filtered=False: (seen.append(batch), run(batch, filtered))[1]
    sp = SamplingParams(max_tokens=3, temperature=0.7, top_p=0.9, logit_bias={5: 1.5})
    for adapter in ("a", None):
        engine.add_request(rng.integers(3, 100, 40).tolist(), sp, adapter)
    while engine.has_unfinished():
        engine.step()
    assert any(b.prefill is not None for b in seen) and any(b.prefill is None for b in seen)
    for batch in seen:
        buffers, layout = pack_batch(batch)
        assert [b.dtype for b in buffers] == [np.int32, np.float32]
        got = jax.jit(unpack_batch, static_argnums=1)(buffers, layout)
        want_leaves, want_tree = jax.tree_util.tree_flatten(batch)
        got_leaves, got_tree = jax.tree_util.tree_flatten(got)
        assert got_tree == want_tree
        for w, g in zip(want_leaves, got_leaves):
            w = np.asarray(w)
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_array_equal(np.asarray(g), w)
