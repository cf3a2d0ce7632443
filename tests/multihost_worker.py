"""One process of the multi-host tensor-parallel test (tests/test_tensor_parallel.py starts two):
2 CPU devices each, jax.distributed joins them into one 4-device mesh, and a TP=4 engine generates."""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process_id, model_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
assert jax.device_count() == 4 and jax.local_device_count() == 2

from jslora import LLM, SamplingParams  # noqa: E402

llm = LLM(model_dir, dtype="float32", max_model_len=128,
          engine=dict(max_batch=8, num_pages=2048, max_num_batched_tokens=128, tensor_parallel_size=4))
prompts = [[5, 9, 33, 2, 71], [100, 3, 3, 8]]
tokens = [o.token_ids for o in llm.generate(prompts, sampling=SamplingParams(max_tokens=6, temperature=0.0))]
with open(out, "w") as f:
    json.dump(tokens, f)
jax.distributed.shutdown()
