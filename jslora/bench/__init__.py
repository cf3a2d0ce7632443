"""`jslora bench`: S-LoRA's synthetic trace, replayed against the engine or a server, and its metrics."""
