"""`kdscale env`: the plan of a launch, for every accelerate config in configs/accelerate/."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from transformers import BertConfig

from kdscale.cli import main
from kdscale.config import ConfigError
from tests.support.pipeline import LAUNCH_ENV, REPO, launch_command

CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
BERT_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "intermediate_size": 4096}


@pytest.fixture(scope="module")
def bert_large(tmp_path_factory):
    """A BERT-large-shaped model directory: its config alone, which is all a plan reads."""
    directory = tmp_path_factory.mktemp("bert_large")
    BertConfig(**BERT_LARGE).save_pretrained(directory)
    return directory


def plan_of(capsys, *args: str) -> dict:
    assert main(["env", "--config", "configs/sst2_bert_large.yaml", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def deepspeed_stage(accelerate_config) -> int:
    raw = yaml.safe_load(accelerate_config.read_text())
    ds_file = REPO / raw["deepspeed_config"]["deepspeed_config_file"]
    return json.loads(ds_file.read_text())["zero_optimization"]["stage"]


@pytest.mark.parametrize("accelerate_config", CONFIGS, ids=lambda p: p.stem)
def test_every_accelerate_config_plans(accelerate_config, bert_large, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # accelerate configs name their DeepSpeed files from here
    raw = yaml.safe_load(accelerate_config.read_text())
    plan = plan_of(capsys, "--accelerate_config", str(accelerate_config),
                   "--teacher.model", str(bert_large))
    launch = plan["launch"]
    assert (launch["nodes"], launch["world_size"]) == (raw["num_machines"],
                                                      raw["num_processes"])
    assert plan["student_zero"]["stage"] == deepspeed_stage(accelerate_config)
    distill = plan["batches"]["distill"]
    assert distill["effective"] == 64 * distill["accumulation"] * raw["num_processes"]
    sizes = plan["sizes"]
    assert 334e6 < sizes["teacher_params"] < 336e6  # BERT-large with a 2-way head
    assert sizes["student_layers"] == 6  # uniform:6 in the experiment


def terms(plan: dict, stage: str) -> dict[str, float]:
    return {t["name"]: t["bytes"] for t in plan["memory"][stage]["terms"]}


def test_more_processes_split_the_student_state_as_the_zero_stage_says(bert_large, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(REPO)
    common = ["--teacher.model", str(bert_large), "--device_memory_gib", "80",
              "--device", "gpu"]
    one = plan_of(capsys, "--accelerate_config", "configs/accelerate/gpu_1.yaml", *common)
    many = plan_of(capsys, "--accelerate_config", "configs/accelerate/multi_node.yaml",
                   "--num_machines", "4", "--num_processes", "32", *common)
    student_one, student_many = terms(one, "distill"), terms(many, "distill")
    # ZeRO-2 in bf16: master weights, moments and gradients split 32 ways, the weights whole.
    assert student_many["weights"] == student_one["weights"]
    for part in ("fp32 master weights", "Adam moments", "gradient partition"):
        assert student_many[part] == pytest.approx(student_one[part] / 32)
    params = one["sizes"]["student_params"]
    assert student_one["Adam moments"] == 8 * params
    assert student_one["weights"] == 2 * params
    # zero2.json: two bf16 buckets of 5e7 elements (overlap_comm), whole on a GPU
    assert student_one["reduce buckets"] == 2 * 50_000_000 * 2
    # BERT-large in bf16 (0.6 GiB) fits an 80 GiB device: a replica on every device.
    assert many["teacher"]["placement"] == "replicate"
    assert many["teacher"]["weights"] == 2 * many["sizes"]["teacher_params"]
    assert terms(many, "cache")["teacher weights"] == many["teacher"]["weights"]


def test_a_small_device_gets_a_sharded_teacher(bert_large, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    plan = plan_of(capsys, "--accelerate_config", "configs/accelerate/gpu_node.yaml",
                   "--teacher.model", str(bert_large), "--device_memory_gib", "1")
    assert plan["teacher"]["placement"] == "zero3"
    assert terms(plan, "cache")["teacher shard"] == pytest.approx(plan["teacher"]["weights"] / 8)


@pytest.mark.parametrize("source, overrides", [("cache", []),
                                               ("online", ["--teacher.source", "online"]),
                                               ("none", ["--loss.alpha", "0"])])
def test_the_plan_reads_the_cache_only_when_distill_does(source, overrides, bert_large, capsys,
                                                         monkeypatch):
    """A hard-label run (alpha 0) and an online teacher read no cache; only an online
    teacher's weights sit beside the student while distilling."""
    monkeypatch.chdir(REPO)
    common = ["--teacher.model", str(bert_large), "--device_memory_gib", "80", *overrides]
    plan = plan_of(capsys, *common)
    assert plan["teacher"]["source"] == source
    assert plan["cache"]["read"] == (source == "cache")
    distill = terms(plan, "distill")
    online = {name: value for name, value in distill.items() if name.startswith("online")}
    assert bool(online) == (source == "online")
    if online:  # the replica beside the student, as the cache stage counts it
        assert online["online teacher: teacher weights"] == terms(plan, "cache")[
            "teacher weights"]
    assert main(["env", "--config", "configs/sst2_bert_large.yaml", *common]) == 0
    cache_line = next(line for line in capsys.readouterr().out.splitlines()
                      if line.startswith("cache "))
    assert ("not read" in cache_line) == (source != "cache")


def test_an_existing_cache_is_measured(quick_demo, capsys):
    plan = plan_of(capsys, "--teacher.checkpoint", str(quick_demo / "teacher"),
                   "--teacher.model", "null", "--student.layers", "first:2",
                   "--cache.dir", str(quick_demo / "cache"))
    cache = plan["cache"]
    on_disk = sum(p.stat().st_size for p in (quick_demo / "cache").iterdir() if p.is_file())
    assert cache["written"] and cache["bytes"] == on_disk
    assert cache["examples"] == 256


def test_bad_launch_settings_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    uneven = tmp_path / "uneven.yaml"
    uneven.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 3\n")
    missing_ds = tmp_path / "missing.yaml"
    missing_ds.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n"
                          "  deepspeed_config_file: configs/deepspeed/nope.json\n")
    from kdscale.plan.launch import launch_from_file

    with pytest.raises(ConfigError, match="must divide evenly by num_machines 2"):
        launch_from_file(uneven)
    with pytest.raises(ConfigError, match="nope.json does not exist"):
        launch_from_file(missing_ds)
    with pytest.raises(ConfigError, match="accelerate config .*absent.yaml does not exist"):
        launch_from_file(tmp_path / "absent.yaml")


def test_under_accelerate_launch_the_plan_is_the_launch_itself(bert_large):
    """Run under a real 2-process ZeRO-3 launch, env reads the launch from the environment
    the launcher set, and prints once."""
    command = launch_command("-m", "kdscale", "env", "--config", "configs/sst2_bert_large.yaml",
                             "--teacher.model", str(bert_large), "--json",
                             config_file="configs/accelerate/cpu_zero3.yaml")
    result = subprocess.run(command, cwd=REPO, env=LAUNCH_ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout[result.stdout.index("{"):])
    assert result.stdout.count('"launch"') == 1
    assert plan["launch"]["origin"] == "environment"
    assert plan["launch"]["world_size"] == 2
    assert plan["student_zero"]["stage"] == 3


def test_num_processes_without_an_accelerate_config_plans_that_many(bert_large, capsys,
                                                                    monkeypatch):
    """As `accelerate launch --multi_gpu --num_processes 4` would run it: no DeepSpeed for the
    student, the teacher's shard a quarter."""
    monkeypatch.chdir(REPO)
    plan = plan_of(capsys, "--num_processes", "4", "--teacher.model", str(bert_large),
                   "--teacher.placement", "zero3")
    assert (plan["launch"]["world_size"], plan["launch"]["nodes"]) == (4, 1)
    assert plan["batches"]["distill"]["effective"] == 4 * plan["batches"]["distill"]["per_device"]
    assert terms(plan, "cache")["teacher shard"] == pytest.approx(
        plan["teacher"]["weights"] / 4)
