"""A typo in a DeepSpeed JSON stops the job at start with the key's name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdscale.config import ConfigError
from kdscale.config.deepspeed import check_deepspeed_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "deepspeed").glob("*.json")),
                         ids=lambda p: p.name)
def test_the_shipped_configs_pass(path):
    check_deepspeed_config(path, path.name)


@pytest.mark.parametrize("config, message", [
    ({"gradient_cliping": 1.0}, "unknown DeepSpeed key 'gradient_cliping' (did you mean "
                                "'gradient_clipping'?)"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_sise": 5}},
     "unknown DeepSpeed key 'zero_optimization.reduce_bucket_sise' (did you mean "
     "'reduce_bucket_size'?)"),
    ({"zero_optimization": {"stage": 7}}, "zero_optimization: Input should be"),
])
def test_typos_are_named(config, message):
    with pytest.raises(ConfigError) as error:
        check_deepspeed_config(config, "ds.json")
    assert message in str(error.value)


def test_a_key_far_from_any_deepspeed_key_is_left_alone():
    check_deepspeed_config({"my_team_notes": "kept by DeepSpeed as it is"}, "ds.json")


def test_distill_refuses_a_launch_config_with_a_typo_before_any_work(tmp_path):
    typo = tmp_path / "zero2.json"
    typo.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_coms": True}}))
    data = tmp_path / "train.jsonl"
    data.write_text('{"sentence": "a fine film", "label": 1}\n')
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(typo)}
    result = subprocess.run([sys.executable, "-m", "kdscale", "distill", "--config",
                             str(REPO / "configs" / "demo.yaml"),
                             "--output_dir", str(tmp_path / "out"),
                             "--data.train_file", str(data), "--data.eval_file", str(data)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "zero_optimization.overlap_coms" in result.stderr
    assert not (tmp_path / "out").exists()
