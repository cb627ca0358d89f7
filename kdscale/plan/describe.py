"""The plan as `kdscale env` prints it: the launch, batches, models, placement, cache, and
the memory per process of each stage, term by term with how each is counted."""

from __future__ import annotations

GiB, MiB = 1024**3, 1024**2

# What distill's memory holds, by where it reads teacher output from (teacher_source).
DISTILL_HOLDS = {"cache": "the student; the teacher is read from the cache",
                 "online": "the student and the online teacher", "none": "the student"}
STAGE_HOLDS = {"cache": "the teacher's forward", "finetune": "the teacher trained"}


def gib(value: float | None) -> str:
    if value is None:
        return "unknown"
    if value >= GiB:
        return f"{value / GiB:.2f} GiB"
    return f"{value / MiB:.1f} MiB"


def describe_plan(plan) -> str:
    return "\n".join([*_launch_lines(plan), *_memory_lines(plan)])


def _launch_lines(plan) -> list[str]:
    launch, sizes, teacher, zero = plan.launch, plan.sizes, plan.teacher, plan.student_zero
    lines = [
        f"launch        {launch.origin}",
        f"world size    {launch.world_size} process(es) = {launch.nodes} node(s) x "
        f"{launch.per_node} per node; distill precision {launch.mixed_precision}",
    ]
    for stage, batch in plan.batches.items():
        lines.append(f"{stage:<14}{batch['per_device']} rows per device x "
                     f"{batch['accumulation']} accumulation x {launch.world_size} = "
                     f"effective batch {batch['effective']}")
    offload = " + optimizer offload" if zero["offload_optimizer"] else ""
    stage = f"DeepSpeed ZeRO-{zero['stage']}{offload} ({launch.deepspeed_file})" \
        if launch.deepspeed_file else "no DeepSpeed (DDP)"
    return lines + [
        f"student       {sizes.student_layers} layers, {sizes.student_params / 1e6:.1f}M "
        f"parameters; {stage}",
        f"teacher       {sizes.teacher_layers} layers, {sizes.teacher_params / 1e6:.1f}M "
        f"parameters ({sizes.teacher_from}), {teacher['dtype']}; runs in: {teacher['runs_in']}",
        f"  placement   {teacher['placement']}: {teacher['why']}",
        f"  DeepSpeed   {teacher['deepspeed']}",
        cache_line(plan.cache),
    ]


def _memory_lines(plan) -> list[str]:
    memory = plan.memory
    where = "GPU" if memory["device"] == "gpu" else "CPU (host memory)"
    lines = [f"memory per process on a {where}, by stage (peak; each term says how it "
             f"is counted):"]
    holds = {**STAGE_HOLDS, "distill": DISTILL_HOLDS[plan.teacher["source"]]}
    for stage, what in holds.items():
        lines.append(f"  {stage} ({what}): {gib(memory[stage]['total'])}")
        lines += [_term_line(t) for t in memory[stage]["terms"]]
        run = {t["name"] for t in memory[stage]["terms"]}
        for phase in ("load", "save"):
            terms = memory[stage][f"{phase}_terms"]
            if terms:
                total = sum(t["bytes"] for t in terms if t["where"] == "device")
                lines.append(f"    while {PHASES[phase]}: {gib(total)}, the run's terms less "
                             f"those it has not or no longer holds, and:")
                lines += [_term_line(t) for t in terms if t["name"] not in run]
    return lines


PHASES = {"load": "loading", "save": "saving (main process)"}


def _term_line(term: dict) -> str:
    host = " [host memory, not the GPU's]" if term["where"] == "host" else ""
    return f"    {term['name']:<30}{gib(term['bytes']):>11}  {term['why']}{host}"


def cache_line(cache: dict) -> str:
    if not cache["read"]:
        return f"cache         {cache['dir']}: {cache['why']}"
    if cache["written"]:
        return (f"cache         {cache['dir']}: written, {cache['examples']:,} examples, "
                f"{cache['kind']} {cache['dtype']}, {gib(cache['bytes'])} on disk")
    rows = f"{cache['examples']:,} examples" if cache["examples"] else "rows unknown"
    size = f"~{gib(cache['bytes'])}" if cache["bytes"] else "size unknown"
    return (f"cache         {cache['dir']}: not written yet; {rows} x "
            f"{cache['bytes_per_row']} B ({cache['kind']} {cache['dtype']}) = {size}")
