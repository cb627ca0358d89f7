"""The teacher at inference time: its placement (replicated or sharded by ZeRO-3) and the
runner that computes its outputs for the cache or beside a student."""

from kdscale.teacher.placement import (
    DEEPSPEED_CONFIGS,
    Placement,
    check_teacher_deepspeed_config,
    choose_placement,
    compute_dtype,
    deepspeed_config,
    teacher_source,
)
from kdscale.teacher.runner import TeacherRunner, load_runner

__all__ = ["DEEPSPEED_CONFIGS", "Placement", "TeacherRunner", "check_teacher_deepspeed_config",
           "choose_placement",
           "compute_dtype", "deepspeed_config", "load_runner", "teacher_source"]
