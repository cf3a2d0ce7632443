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



def test_staged_metadata_stays_at_its_address_and_holds_each_steps_values(rng):
    """Each variant's buffers are written in place (same device address every step, so XLA need not
    re-record the step's CUDA graphs), and hold exactly the values of the step that staged them."""
    from jslora.model.packing import StagedMetadata

    staged = StagedMetadata()
    first = staged.stage((np.arange(6, dtype=np.int32), np.ones(3, np.float32)))
    address = first[0].unsafe_buffer_pointer()
    for _ in range(3):
        ints, floats = rng.integers(-9, 9, 6).astype(np.int32), rng.normal(size=3).astype(np.float32)
        got = staged.stage((ints, floats))
        np.testing.assert_array_equal(np.asarray(got[0]), ints)
        np.testing.assert_array_equal(np.asarray(got[1]), floats)
        assert got[0].unsafe_buffer_pointer() == address
    other = staged.stage((np.zeros(10, np.int32), np.zeros(2, np.float32)))  # another variant: its own pair
    assert other[0].shape == (10,) and np.asarray(staged.stage((ints, floats))[0]).tolist() == ints.tolist()
