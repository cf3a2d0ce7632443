"""Does XLA launch a Pallas (Triton) kernel with programmatic dependent launch if it waits on its grid
dependencies itself? (issue 22: the LoRA kernels' fixed cost a launch)

    PYTHONPATH=. python benchmarks/pdl_probe.py            # GPU: $OUT/pdl_probe.json
    PYTHONPATH=. python benchmarks/pdl_probe.py --quick    # CPU smoke run (interpret mode)

XLA's own kernels start while the kernel before them drains (EngineConfig.pdl: 7-11% off a batch-1 step), each
waiting (`griddepcontrol.wait`) before it reads what the other wrote. A Pallas kernel has no such wait, so XLA
launches it after its predecessor has finished, and the LoRA kernels (128 launches a step at S1) each pay the
drain and the ramp. XLA decides per Triton kernel whether to launch it that way (a `use_pdl` it reads off the
compiled kernel); whether an inline `griddepcontrol.wait` is what it looks for is not documented. This probe
times a chain of small in-place Pallas kernels, each between two XLA fusions, with and without the wait at
its start, under XLA's PDL on and off. If the wait's chain runs faster with PDL on, XLA launches it early, and
the LoRA kernels can read their adapter rows (which no kernel of the step writes) before the wait. The final
values are checked: every kernel adds one to every element, so a launch that read before its predecessor
finished shows up as a lost increment.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from benchmarks.common import environment, wall_seconds_per_call, write_json
from pallas_kernels.triton_compat import after_grid_wait, pallas_call

ROWS_PER_PROGRAM = 8


def _add_one_kernel(x_ref, o_ref, *, wait: bool, interpret: bool):
    start = pl.program_id(0) * ROWS_PER_PROGRAM
    if wait:  # the wait's result is the rows' address, so the wait comes before the read (the LoRA kernels' way)
        start = after_grid_wait(start, interpret)
    rows = pl.ds(start, ROWS_PER_PROGRAM)
    o_ref[rows, :] = x_ref[rows, :] + 1


def add_one(x, wait: bool, interpret: bool = False):
    """x + 1 in place, one program per ROWS_PER_PROGRAM rows."""
    return pallas_call(functools.partial(_add_one_kernel, wait=wait, interpret=interpret),
                       out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(x.shape[0] // ROWS_PER_PROGRAM,),
                       input_output_aliases={0: 0}, interpret=interpret, num_warps=4,
                       name="add_one_waits" if wait else "add_one")(x)


def chain(kernels: int, wait: bool, interpret: bool):
    """x -> kernels x (XLA fusion, Pallas add_one, XLA fusion): each Pallas kernel reads what an XLA kernel just
    wrote and is read by the next one. The XLA fusions add and subtract y, so the result is x + kernels."""
    def fn(x, y):
        for _ in range(kernels):
            x = add_one(x + y, wait, interpret) - y
        return x
    return fn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", type=int, default=200)
    ap.add_argument("--rows", type=int, default=4096, help="rows of 128 float32: 2 MB, L2-resident")
    ap.add_argument("--quick", action="store_true", help="interpret mode, few kernels (CPU)")
    args = ap.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    if args.quick:
        args.kernels, args.rows = 4, 64
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.rows, 128)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((args.rows, 128)), jnp.float32)
    results = {}
    for pdl in (False, True) if on_gpu else (False,):
        for wait in (False, True):
            options = {"xla_gpu_enable_pdl": pdl} if on_gpu else None
            fn = jax.jit(chain(args.kernels, wait, interpret=not on_gpu), compiler_options=options)
            key = f"{'pdl' if pdl else 'no_pdl'}/{'wait' if wait else 'plain'}"
            try:
                out = np.asarray(fn(x, y))
            except Exception as e:  # noqa: BLE001 - a variant that does not lower is a result too
                results[key] = {"failed": f"{type(e).__name__}: {str(e)[:300]}"}
                print(key, results[key], flush=True)
                continue
            err = float(np.max(np.abs(out - (np.asarray(x) + args.kernels))))
            results[key] = {"us_per_kernel": wall_seconds_per_call(fn, x, y) / args.kernels * 1e6, "max_err": err}
            print(key, results[key], flush=True)
    path = write_json("pdl_probe.json", {"env": environment(), "args": vars(args), "results": results})
    print(f"wrote {path}\n\n{args.kernels} x (fusion, Pallas add_one, fusion) over {args.rows} x 128 float32")
    print(f"{'XLA PDL / kernel':>20} {'us a kernel':>12} {'max err':>8}")
    for key, r in results.items():
        print(f"{key:>20} " + (f"failed: {r['failed'][:90]}" if "failed" in r else
                               f"{r['us_per_kernel']:12.2f} {r['max_err']:8.1e}"))


if __name__ == "__main__":
    main()
