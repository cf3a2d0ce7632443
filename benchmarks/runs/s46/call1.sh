#!/bin/bash
# For the forty-sixth session, call 1, either card (<= 520 s): the two calls the forty-fifth session owed, in one
# start (failed starts cost up to 180 s each): S1 as the engine now is (s45/call6.sh), then Llama-3-8B batch 256's
# small kernels by JAX source line (s45/call4.sh).
O=$OUT
mkdir -p $O/s1run $O/b256run
OUT=$O/s1run bash benchmarks/runs/s45/call6.sh
OUT=$O/b256run bash benchmarks/runs/s45/call4.sh
