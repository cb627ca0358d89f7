"""Teacher placement: the `auto` choice, the DeepSpeed config it fills, the size it reads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdscale.commands.demo import demo_config, demo_vocabulary
from kdscale.config import ConfigError, TeacherConfig
from kdscale.teacher import choose_placement, deepspeed_config
from kdscale.teacher.placement import GiB, parameter_count


@pytest.mark.parametrize("weights, free, world, expected", [
    (1.3 * GiB, 78 * GiB, 8, "replicate"),  # BERT-large in bf16 on an H100
    (1.3 * GiB, 2 * GiB, 8, "zero3"),  # a copy does not fit in half the memory, a shard does
    (40 * GiB, 16 * GiB, 2, "zero3_offload"),  # even half does not fit
    (40 * GiB, 16 * GiB, 1, "zero3_offload"),  # one process: sharding cannot help
])
def test_auto_placement(weights, free, world, expected):
    placement = choose_placement("auto", int(weights), int(free), world)
    assert placement.name == expected
    assert "GiB" in placement.reason  # it says why, with the sizes it compared


def test_an_explicit_placement_is_kept():
    assert choose_placement("zero3", 1, 10**12, 2).name == "zero3"


def test_deepspeed_config_fills_every_auto_value():
    ds = deepspeed_config(TeacherConfig(), "zero3", batch_size=48, dtype=torch.bfloat16,
                          hidden_size=1024)
    assert ds["train_micro_batch_size_per_gpu"] == 48
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "none"
    assert zero["stage3_param_persistence_threshold"] == 10 * 1024
    assert "auto" not in json.dumps(ds)


def test_offload_config_offloads_parameters():
    ds = deepspeed_config(TeacherConfig(), "zero3_offload", 8, torch.float32, 64)
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is False


def test_a_user_deepspeed_config_with_unknown_autos_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    unfillable = r"cannot fill \['zero_optimization.reduce_bucket_size'\]"
    with pytest.raises(ConfigError, match=unfillable):
        deepspeed_config(TeacherConfig(deepspeed_config=str(path)), "zero3", 8, torch.float32, 64)
    with pytest.raises(ConfigError, match="teacher.deepspeed_config: file .* does not exist"):
        deepspeed_config(TeacherConfig(deepspeed_config=str(tmp_path / "no.json")), "zero3", 8,
                         torch.float32, 64)


def test_parameter_count_reads_the_config_only(tmp_path):
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, num_labels=3))
    model.config.save_pretrained(tmp_path)  # no weights on disk at all
    assert parameter_count(tmp_path) == sum(p.numel() for p in model.parameters())


def test_demo_config_matches_the_demo_vocabulary():
    assert demo_config().teacher.config["vocab_size"] == len(demo_vocabulary())
