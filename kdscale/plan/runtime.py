"""The memory every process holds before any model: the runtime.

On a CPU it is measured at plan time (`kdscale.commands.env.measured_runtime_bytes`): the
resident memory of a process that has imported what a kdscale job imports (torch,
transformers, accelerate, DeepSpeed, datasets and kdscale's commands), which each launched
process holds before it loads anything. On a GPU the device's share is the CUDA context and
the kernel images loaded into it, which a login node cannot measure: it is stated, and
`--runtime_gib` replaces it with a figure measured on the cluster's own GPUs (`nvidia-smi`
beside an idle `python -c "import torch; torch.zeros(1, device='cuda')"`)."""

from __future__ import annotations

from kdscale.plan.memory import GiB, Term

# CUDA 12 with PyTorch's kernels loaded lazily: about 0.5 GiB on A100 and H100 class GPUs.
GPU_CONTEXT_BYTES = 0.5 * GiB


def runtime_term(device: str, stated_gib: float | None = None,
                 measured_bytes: float | None = None) -> Term:
    if stated_gib is not None:
        return Term("runtime", stated_gib * GiB, "--runtime_gib, as stated")
    if device == "gpu" or measured_bytes is None:
        return Term("runtime", GPU_CONTEXT_BYTES, "CUDA context and kernels (stated, not "
                    "measured here: --runtime_gib sets the cluster's own figure)")
    return Term("runtime", measured_bytes, "a process with kdscale's commands imported "
                "(torch, transformers, accelerate, DeepSpeed, datasets), measured now")
