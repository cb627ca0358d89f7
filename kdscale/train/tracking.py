"""Experiment trackers through Accelerate: TensorBoard by default, or any tracker Accelerate
supports (`train.report_to`), with the run's whole config as hyper-parameters."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType

from kdscale.config import ConfigError


def trackers(report_to: list[str], section: str) -> list[str] | None:
    """The tracker names for Accelerator(log_with=...), checked: an unknown or uninstalled
    tracker stops the job at start, naming the key."""
    if report_to in ([], ["none"]):
        return None
    known = [name for name in LoggerType.list() if name != "all"]
    unknown = [name for name in report_to if name not in known]
    if unknown:
        raise ConfigError(f"{section}.report_to: unknown tracker {', '.join(unknown)}; "
                          f"expected some of {', '.join(known)}, or 'none'")
    installed = {str(tracker) for tracker in get_available_trackers()}
    missing = [name for name in report_to if name not in installed]
    if missing:
        raise ConfigError(f"{section}.report_to: {', '.join(missing)} is not installed "
                          f"(pip install {' '.join(missing)}), or set it to 'none'")
    return report_to


def start_tracking(accelerator: Accelerator, run_name: str, config: dict) -> None:
    """Opens the trackers (main process only, as Accelerate does) under `<project>/run_name`,
    with the config flattened to scalar hyper-parameters."""
    if accelerator.log_with:
        accelerator.init_trackers(run_name, config=hyperparameters(config))


def hyperparameters(config: dict, prefix: str = "") -> dict:
    """{"distill": {"learning_rate": 1e-4}} -> {"distill.learning_rate": 1e-4}; values that
    are not numbers, strings or booleans become strings (TensorBoard's hparams take scalars)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(hyperparameters(value, name + "."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def flat_metrics(record: dict) -> dict[str, float]:
    """A log record as tracker scalars: nested timings become `step_ms/forward` etc."""
    metrics = {}
    for key, value in record.items():
        if isinstance(value, dict):
            metrics.update({f"{key}/{name}": v for name, v in value.items()})
        elif key != "step" and isinstance(value, int | float):
            metrics[key] = value
    return metrics


def log_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "logs"
