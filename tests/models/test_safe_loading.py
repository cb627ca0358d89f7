"""Loading never runs code from a file: configs through yaml.safe_load, caches through JSON and
safetensors headers, checkpoints through torch.load(weights_only=True) or a refusal, models
without trust_remote_code; and a cache reads only files inside its own directory."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdscale.cache import CacheError, LogitCache
from kdscale.config import ConfigError, load_config
from kdscale.models import CheckpointError, load_model
from kdscale.train.checkpoint import ResumeError, check_pickles
from tests.support.bad_input import copy_tree, edit_manifest, rewrite_shard


class Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_yaml_tag_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "experiment.yaml"
    config.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(config)
    with pytest.raises(ConfigError, match="--seed"):  # overrides are YAML too
        load_config(overrides=["--seed", f'!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()


def test_the_checkpoints_kdscale_writes_pass_the_pickle_check(pipe):
    for step in (1, 2):
        check_pickles(pipe / "run" / "checkpoints" / "distill" / f"step-{step:08d}")


def test_deepspeed_optimizer_states_pass_the_pickle_check(tmp_path):
    """What a DeepSpeed ZeRO optimizer file holds besides tensors (its loss scaler, stage and
    fragment addresses), as `deepspeed.initialize` pickles it: accepted."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"optimizer_state_dict": {
        "loss_scaler": LossScaler(1.0), "overflow": False,
        "dynamic": DynamicLossScaler(2.0**16, 1000, 1.0, 2, False),
        "zero_stage": ZeroStageEnum.gradients, "param_slice_mappings": [
            {"w": fragment_address(numel=4, start=0)}], "fp32": [torch.ones(4)]}}
    (tmp_path / "pytorch_model").mkdir()
    torch.save(state, tmp_path / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_pickles(tmp_path)


@pytest.mark.parametrize("file", ["random_states_0.pkl", "optimizer.bin",
                                  "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_checkpoint_pickle_that_would_run_code_is_refused_unread(pipe, tmp_path, file):
    checkpoint = copy_tree(pipe / "run" / "checkpoints" / "distill" / "step-00000002",
                           tmp_path / "step-00000002")
    marker = tmp_path / "ran"
    (checkpoint / file).parent.mkdir(exist_ok=True)
    torch.save({"state": Payload(marker), "weights": torch.ones(2)}, checkpoint / file)
    with pytest.raises(ResumeError, match=rf"{file} would import \['posix.system'\]"):
        check_pickles(checkpoint)
    assert not marker.exists()


def test_a_plain_pickle_in_a_checkpoint_is_refused_unread(pipe, tmp_path):
    checkpoint = copy_tree(pipe / "run" / "checkpoints" / "distill" / "step-00000002",
                           tmp_path / "step-00000002")
    marker = tmp_path / "ran"
    (checkpoint / "random_states_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ResumeError, match="random_states_0.pkl is not a file torch.save wrote"):
        check_pickles(checkpoint)
    assert not marker.exists()


def test_distill_refuses_to_resume_from_a_poisoned_checkpoint(pipe, tmp_path):
    from tests.support.bad_input import run_command, snapshot, write_experiment

    run = copy_tree(pipe / "run", tmp_path / "run")
    marker = tmp_path / "ran"
    torch.save(Payload(marker), run / "checkpoints" / "distill" / "step-00000002" / "scheduler.bin")
    config = write_experiment(pipe, tmp_path / "experiment.yaml", output_dir=str(run),
                              distill={"max_steps": 3})
    before = snapshot(run)
    with pytest.raises(ResumeError, match="scheduler.bin would import"):
        run_command("distill", config)
    assert snapshot(run) == before and not marker.exists()


def test_a_teacher_with_a_pickled_weight_file_that_would_run_code_is_refused(pipe, tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    shutil.copy(pipe / "teacher" / "config.json", teacher)
    marker = tmp_path / "ran"
    torch.save({"classifier.weight": Payload(marker)}, teacher / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"teacher checkpoint {teacher} cannot be loaded"):
        load_model(teacher, "teacher")
    assert not marker.exists()


def test_code_shipped_with_a_checkpoint_does_not_run(pipe, tmp_path):
    """A config naming its own classes (auto_map) loads as the model type it declares:
    kdscale never passes trust_remote_code."""
    teacher = copy_tree(pipe / "teacher", tmp_path / "teacher")
    marker = tmp_path / "ran"
    (teacher / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                     "from transformers import BertConfig as EvilConfig\n")
    config = json.loads((teacher / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig",
                          "AutoModelForSequenceClassification": "evil.EvilModel"}
    (teacher / "config.json").write_text(json.dumps(config))
    model = load_model(teacher, "teacher")
    assert isinstance(model, BertForSequenceClassification) and not marker.exists()


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd",
                                  "sub/shard-00000.safetensors"])
def test_a_manifest_cannot_name_a_file_outside_its_directory(pipe, tmp_path, name):
    cache = copy_tree(pipe / "cache", tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0]["file"] = name
    edit_manifest(cache, shards=manifest["shards"])
    with pytest.raises(CacheError, match=rf"shards\[0\].file': expected "
                                         rf"'shard-00000.safetensors', got '{name}'"):
        LogitCache(cache)


def test_a_shard_linked_out_of_the_cache_is_refused(pipe, tmp_path):
    cache = copy_tree(pipe / "cache", tmp_path / "cache")
    outside = tmp_path / "elsewhere.safetensors"
    (cache / "shard-00001.safetensors").rename(outside)
    (cache / "shard-00001.safetensors").symlink_to(outside)
    with pytest.raises(CacheError, match=rf"shard-00001.safetensors in {cache} is a link to "
                                         rf"{outside}, outside the cache directory"):
        LogitCache(cache)
    # A link that stays inside the directory reads as the file it points at.
    inside = cache / ".shard-00001.data"
    outside.rename(inside)
    (cache / "shard-00001.safetensors").unlink()
    (cache / "shard-00001.safetensors").symlink_to(inside.name)
    assert len(LogitCache(cache)) == 48


def test_a_pickle_posing_as_a_shard_is_refused_unread(pipe, tmp_path):
    cache = copy_tree(pipe / "cache", tmp_path / "cache")
    marker = tmp_path / "ran"
    path = tmp_path / "payload.pt"
    torch.save(Payload(marker), path)
    rewrite_shard(cache, 0, path.read_bytes())
    with pytest.raises(CacheError, match="shard shard-00000.safetensors: header length"):
        LogitCache(cache)
    assert not marker.exists()


def test_a_bert_config_with_remote_code_keys_stays_a_bert(tmp_path):
    """The same through AutoConfig alone (what the cache job and the layer checks read)."""
    from transformers import AutoConfig

    BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
               intermediate_size=8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    assert type(AutoConfig.from_pretrained(tmp_path)) is BertConfig
    assert not (tmp_path / "ran").exists()
