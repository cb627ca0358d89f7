"""Training: the Accelerate loop, the distillation objective and its losses, schedules of
the loss weights, checkpoints, stopping, timing, tracking and evaluation during training."""
