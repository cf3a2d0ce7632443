"""Which lines of jslora a step's small kernels come from: a profiler trace's kernels joined to the
optimized HLO that XLA dumped (`--xla_dump_to`), whose instructions carry the JAX source of what they
compute (op_name and stack frames). A profile says a step spends 0.45 ms in 200 fusions; this says which
lines of the model made them (benchmarks/engine.py --hlo-sources).

XLA names a fusion's GPU kernel after the instruction, '.' as '_' (loop_transpose_fusion.3 ->
loop_transpose_fusion_3); a fusion instruction carries its root's metadata, so each is reported with the
distinct sources of every instruction fused into it.
"""
from __future__ import annotations

import collections
import glob
import os
import re

_TABLE = re.compile(r"^(FileNames|FunctionNames|FileLocations|StackFrames)$")
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_SOURCE = re.compile(r'source_file="([^"]*)" source_line=(\d+)')  # older XLA: the location inline
_FIELD = re.compile(r"(\w+)=(\d+)")


def kernel_key(name: str) -> str:
    """A kernel's or an instruction's name as both are compared (XLA's '.' suffix as '_')."""
    return name.replace(".", "_")


def _frames(lines: list[str]) -> dict[int, str]:
    """stack_frame_id -> 'file:line (function)' of the innermost frame, and its caller after ' < '."""
    tables, current = collections.defaultdict(dict), None
    for line in lines:
        if line.startswith(("%", "ENTRY")):  # the tables come before the computations
            break
        if _TABLE.match(line) or not line.strip():
            current = line if line.strip() else None
            continue
        if current:
            key, _, rest = line.strip().partition(" ")
            tables[current][int(key)] = rest.strip('"') if current in ("FileNames", "FunctionNames") \
                else {k: int(v) for k, v in _FIELD.findall(rest)}
    files, functions, locations = tables["FileNames"], tables["FunctionNames"], tables["FileLocations"]

    def location(loc_id: int) -> str:
        loc = locations.get(loc_id, {})
        path = files.get(loc.get("file_name_id"), "?")
        return f"{os.path.basename(path)}:{loc.get('line', '?')} ({functions.get(loc.get('function_name_id'), '?')})"

    frames = {}
    for frame_id, frame in tables["StackFrames"].items():
        here = location(frame.get("file_location_id", 0))
        parent = frame.get("parent_frame_id", 0)
        caller = tables["StackFrames"].get(parent) if parent and parent != frame_id else None
        frames[frame_id] = here + (f" < {location(caller.get('file_location_id', 0))}" if caller else "")
    return frames


def _source(line: str, frames: dict[int, str]) -> str | None:
    frame = _FRAME.search(line)
    if frame:
        return frames.get(int(frame.group(1)))
    inline = _SOURCE.search(line)
    return f"{os.path.basename(inline.group(1))}:{inline.group(2)}" if inline else None


def instruction_sources(hlo_text: str) -> dict[str, dict]:
    """Every instruction of the module's entry computation -> {"op": its op_name, "source": its JAX source,
    "fused": the distinct "op_name @ source" of the instructions of the computation it calls (a fusion's
    body), in order}; keyed by kernel_key."""
    lines = hlo_text.splitlines()
    frames = _frames(lines)
    bodies, entry, name, is_entry = {}, {}, None, False
    for line in lines:
        head = _COMPUTATION.match(line)
        if head:
            is_entry, name = bool(head.group(1)), head.group(2)
            bodies[name] = []
            continue
        inst = _INSTRUCTION.match(line)
        if not inst or name is None:
            continue
        op = _OP_NAME.search(line)
        record = {"op": op.group(1) if op else "", "source": _source(line, frames)}
        if record["op"] and record["source"]:
            described = f"{record['op']} @ {record['source']}"
            if described not in bodies[name]:
                bodies[name].append(described)
        if is_entry:
            calls = _CALLS.search(line)
            entry[kernel_key(inst.group(1))] = {**record, "calls": calls.group(1) if calls else None}
    for record in entry.values():
        record["fused"] = bodies.get(record.pop("calls") or "", [])
    return entry


def module_sources(dump_dir: str, kernel_names, module: str = "") -> dict[str, dict]:
    """instruction_sources of the dumped optimized module (name containing `module`) that names the most of
    kernel_names (a run compiles several step variants; the profiled steps ran one of them)."""
    wanted = {kernel_key(n) for n in kernel_names}
    best, best_hits = {}, -1
    for path in glob.glob(os.path.join(dump_dir, f"*{module}*after_optimizations.txt")):
        with open(path) as f:
            sources = instruction_sources(f.read())
        hits = len(wanted & sources.keys())
        if hits > best_hits:
            best, best_hits = sources, hits
    return best


def kernels_by_source(kernels: list, sources: dict[str, dict], steps: int, top: int = 30,
                      skip=re.compile(r"lora|attention|write_kv|gemm|nvjet|cublas", re.I)) -> list:
    """The trace's kernels (gpu_kernels) summed by name over the profiled steps, those `skip` does not match
    (by default the GEMMs and the Pallas kernels, whose source is known): [kernel, µs a step, launches a step,
    op_name, source, what it fuses], largest first."""
    total, calls = collections.Counter(), collections.Counter()
    for e in kernels:
        name = str(e.get("args", {}).get("hlo_op") or e.get("name"))
        if skip is not None and skip.search(name):
            continue
        total[kernel_key(name)] += e["dur"]
        calls[kernel_key(name)] += 1
    rows = []
    for name, us in total.most_common(top):
        record = sources.get(name, {})
        rows.append([name, us / steps, calls[name] / steps, record.get("op", ""), record.get("source") or "",
                     record.get("fused", [])[:4]])
    return rows
