#!/bin/bash
# For the forty-fourth session, call 1, H200 only (~570 s; carried from the forty-second and forty-third, whose H200
# requests found none): issue 22's S1 at 60 s with everything since the thirty-second session (quarter-octave
# buckets, packed heads, the cut, 384 running sequences), jslora n = 2000, FP8 cache, with FP8 weights and then bf16
# weights (issue 21's "S1 with FP8 vs bf16" on the issue's card), each with a 5-s profile.
exec bash benchmarks/runs/s43/call2.sh
