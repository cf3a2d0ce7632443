"""The scheduler's block tables by batch slot (jslora.memory.BlockTables) mirror each running request's
block lists through admission, growth, preemption and release, and a step's batch gathered from them
equals the one built from the lists."""
import jax
import numpy as np

from jslora.bench.trace import TraceConfig, generate_trace
from jslora.engine.batch import BatchShapes, step_batch
from jslora.memory import BlockTables
from jslora.scheduler import make_policy
from jslora.scheduler.simulator import Simulator

WIDTH = 64


class Checked(Simulator):
    """Checks the tables against the lists after every plan, and both batches against each other."""

    def __init__(self, **kwargs):
        super().__init__(make_policy("fcfs"), max_blocks=WIDTH, **kwargs)
        self.shapes = BatchShapes(16, WIDTH, self.scheduler.max_batch, ())
        self.plans = self.checked_rows = 0

    def schedule(self):
        plan = super().schedule()
        tables = self.scheduler.block_tables
        for r in self.scheduler.running:
            n = len(r.k_blocks)
            assert tables.k[r.batch_slot, :n].tolist() == r.k_blocks and not tables.k[r.batch_slot, n:].any()
            assert tables.v[r.batch_slot, :n].tolist() == r.v_blocks and not tables.v[r.batch_slot, n:].any()
            self.checked_rows += 1
        if plan:
            rows = 16 * (-(-len(plan.decode) // 16)) + sum(16 * (-(-c.length // 16)) for c in plan.chunks)
            n = 1 << max(4, (rows - 1).bit_length())
            args = (plan.decode, plan.chunks, n, self.shapes, self.residency)
            kw = dict(with_prefill=bool(plan.chunks))
            by_slot, by_list = step_batch(*args, **kw, block_tables=tables), step_batch(*args, **kw)
            assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(by_slot),
                                                            jax.tree_util.tree_leaves(by_list)))
            self.plans += 1
        return plan


def test_tables_follow_the_lists_through_preemption():
    # a pool too small for the batch: requests grow into it and the newest are preempted and readmitted
    sim = Checked(num_blocks=300, max_batch=24, max_num_batched_tokens=256, max_adapters=16, adapter_pages=16)
    trace = generate_trace(TraceConfig(num_adapters=8, rate=40, duration=2, input_range=(8, 200),
                                       output_range=(60, 300)))
    result = sim.run(trace)
    assert result.preemptions > 20 and result.adapter_loads > 8 and sim.plans > 500 and sim.checked_rows > 5000
    assert all(r.finish_reason == "length" for r in result.requests)


def test_assign_clears_a_reused_slot_and_rows_pads_with_zeros():
    tables = BlockTables(3, 6)
    tables.assign(1, [7, 8, 9], [17, 18, 19])
    tables.extend(1, 3, [10], [20])
    tables.assign(1, [4], [5])  # the slot goes to another request: nothing of the first stays
    assert tables.k[1].tolist() == [4, 0, 0, 0, 0, 0] and tables.v[1].tolist() == [5, 0, 0, 0, 0, 0]
    tables.assign(0, [1, 2], [3, 6])
    k, v = tables.rows([1, 0], 4)
    assert k.tolist() == [[4, 0, 0, 0, 0, 0], [1, 2, 0, 0, 0, 0], [0] * 6, [0] * 6]
    assert v[:2].tolist() == [[5, 0, 0, 0, 0, 0], [3, 6, 0, 0, 0, 0]] and not v[2:].any()
