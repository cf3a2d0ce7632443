"""HF transformers + peft replaying the same S-LoRA trace as `jslora bench` (issue: benchmark CLI).

    PYTHONPATH=. python benchmarks/peft_trace.py --setting S1 --num-adapters 5 --rate 10 --duration 120
    PYTHONPATH=. python benchmarks/peft_trace.py --quick        # CPU smoke run on the tiny config

peft has no continuous batching: requests that have arrived are taken first come, first served, up to
--batch at a time, as one mixed-adapter batch (`adapter_names=`, peft's multi-adapter inference),
left-padded, generating the longest output length of the batch (EOS never stops it); a request
finishes with its batch. First-token latency is when its batch's generate call returns its first
token, approximated by the batch's start plus one prefill (a forward of the padded prompts, timed
per batch). Same metrics and JSON rows as `jslora bench` (system "hf-peft"), written to
$OUT/peft_trace.json.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import write_json
from jslora.bench.metrics import RequestRecord, summarize
from jslora.bench.replay import prompt_ids
from jslora.bench.trace import TraceConfig, adapter_ranks, generate_trace
from jslora.config import CONFIG_DIR, slora_setting


def build_model(model_name: str, ranks: dict[str, int], device, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_json_file(str(CONFIG_DIR / "models" / f"{model_name}.json"))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    names = list(ranks)

    def lora(r):
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          init_lora_weights=False)

    model = get_peft_model(model, lora(ranks[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora(ranks[name]))
    return model.to(device=device, dtype=dtype).eval(), config


def replay(model, config, trace, prompts, batch: int, device,
           max_wall: float = float("inf")) -> tuple[list[RequestRecord], float]:
    """Serve the trace; after max_wall seconds no new batch starts and the rest count as not served
    (peft is slow enough that a full trace can outlast a GPU call)."""
    records: list[RequestRecord | None] = [None] * len(trace)
    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival)
    start, cursor = time.monotonic(), 0
    while cursor < len(order) and time.monotonic() - start < max_wall:
        now = time.monotonic() - start
        ready = [i for i in order[cursor: cursor + batch] if trace[i].arrival <= now]
        if not ready:
            time.sleep(max(0.0, min(0.05, trace[order[cursor]].arrival - now)))
            continue
        cursor += len(ready)
        width = max(len(prompts[i]) for i in ready)
        ids = torch.zeros((len(ready), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(ready):  # left padding, as generation needs
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i], device=device)
            mask[row, width - len(prompts[i]):] = 1
        new = max(trace[i].output_len for i in ready)
        names = [trace[i].adapter for i in ready]
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, adapter_names=names)  # one prefill: the first-token time
            if device == "cuda":
                torch.cuda.synchronize()
            first = time.monotonic() - start
            model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
        end = time.monotonic() - start
        for i in ready:
            t = trace[i]
            records[i] = RequestRecord(t.arrival, t.adapter, t.adapter, t.prompt_len, t.output_len,
                                       first, end)
    for i in order[cursor:]:
        t = trace[i]
        records[i] = RequestRecord(t.arrival, t.adapter, t.adapter, t.prompt_len, 0, None, None,
                                   error=f"not served within --max-wall {max_wall:g} s")
    return records, time.monotonic() - start


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", default="S1")
    ap.add_argument("--num-adapters", type=int, default=5)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--cv", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--slo", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-wall", type=float, default=float("inf"),
                    help="stop starting batches after this many seconds; the rest count as not served")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    setting = slora_setting(args.setting)
    model_name, ranks = setting["model"], setting["ranks"]
    input_range = output_range = (8, 512)
    if args.quick:
        model_name, ranks, args.duration, args.num_adapters = "tiny", [4, 8], 2.0, 3
        input_range, output_range = (4, 16), (2, 8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    trace = generate_trace(TraceConfig(num_adapters=args.num_adapters, rate=args.rate, cv=args.cv,
                                       duration=args.duration, input_range=input_range,
                                       output_range=output_range, seed=args.seed))
    model, config = build_model(model_name, adapter_ranks(args.num_adapters, ranks), device, dtype)
    prompts = prompt_ids(trace, config.vocab_size, args.seed)
    replay(model, config, trace[:2], prompts[:2], args.batch, device)  # warm-up
    records, wall = replay(model, config, trace, prompts, args.batch, device, args.max_wall)
    row = {"system": "hf-peft", "num_adapters": args.num_adapters, "rate": args.rate, "cv": args.cv,
           "duration": args.duration, "batch": args.batch, "max_wall": args.max_wall,
           **summarize(records, wall, args.slo)}
    import peft
    import transformers

    payload = {"setting": args.setting, "model": model_name, "device": torch.cuda.get_device_name() if device == "cuda"
               else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
               "peft": peft.__version__, "rows": [row]}
    path = write_json("peft_trace.json", payload)
    print(f"\n{'system':>8} {'n':>5} {'rate':>5} {'req/s':>6} {'tok/s':>7} {'lat avg':>7} {'ttft avg':>8} {'SLO':>5}")
    print(f"{'hf-peft':>8} {args.num_adapters:>5} {args.rate:>5g} {row['throughput_req_s']:6.2f} "
          f"{row['throughput_tok_s']:7.0f} {row['latency_avg_s']:7.2f} {row['first_token_avg_s']:8.2f} "
          f"{row['slo_attainment']:5.2f}")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
