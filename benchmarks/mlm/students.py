"""Every kind's student for every seed: the same sentences, the same steps, one evaluator.

The teacher and the caches are built once; a seed changes the student's data order and
dropout, and nothing a cache holds (a sampled cache's draws come from experiment.seed).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.mlm.kinds import config_layers
from benchmarks.sst2.evaluation import timed
from benchmarks.sst2.kdscale_side import optimizer_steps
from benchmarks.sst2.run import kdscale_config
from kdscale.commands.distill import run_distill
from kdscale.config import Config


def student_config(settings: dict, root: Path, name: str, k: int | None, seed: int) -> Config:
    layers = config_layers(settings, root, name, k)
    return kdscale_config(settings, root, f"{name}-seed{seed}", *layers, {"seed": seed})


def train_students(settings: dict, root: Path, ks: dict[str, int], held_out) -> dict:
    """kind -> one record per seed: the held-out figures, steps and training seconds."""
    runs = {name: [] for name in settings["kinds"]}
    for seed in settings["seeds"]:  # seeds outermost: every kind has a run early on
        for name in runs:
            config = student_config(settings, root, name, ks.get(name), seed)
            _, seconds = timed(run_distill, config)
            scores, score_s = timed(held_out.score, config.student_dir)
            record = {"seed": seed, **scores, "steps": optimizer_steps(config.student_dir),
                      "train_s": round(seconds, 1), "score_s": round(score_s, 1)}
            runs[name].append(record)
            print(f"student {name} seed {seed}: accuracy {record['accuracy']:.4f}, perplexity "
                  f"{record['perplexity']:.1f}, {record['steps']} steps in {seconds:.0f} s",
                  flush=True)
    return runs
