"""The converted example script run as a user runs it: `python` for one process, and real
`accelerate launch` for two CPU processes (gloo), plain or with `--deepspeed` ZeRO-2/ZeRO-3.
Each run distills from the cache or from the live teacher and must follow the one-process
trajectory on the same 16-row global batches; the saved model is the student alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tests.support.exit_probe import EXIT_HANDLERS_ONLY, exit_marks, probe_env
from tests.support.hf import EXAMPLE, make_task, script_args, train_logs
from tests.support.pipeline import LAUNCH_ENV, REPO, launch_command

pytestmark = pytest.mark.slow  # real launches: scheduled first (tests/conftest.py)

TIMEOUT = 300


def run_script(script: str, args: list[str], launch: bool = False,
               env: dict | None = None) -> subprocess.CompletedProcess:
    command = (launch_command(EXAMPLE / script, *args) if launch
               else [sys.executable, str(EXAMPLE / script), *args])
    result = subprocess.run(command, cwd=REPO, env={**LAUNCH_ENV, **(env or {})},
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def losses(out: Path, *names: str) -> torch.Tensor:
    return torch.tensor([[h[n] for n in ("loss", *names)] for h in train_logs(out)])


def eval_loss(out: Path) -> float:
    return json.loads((out / "eval_results.json").read_text())["eval_loss"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("hf_dist_task"))


@pytest.fixture(scope="module")
def one_process(task, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_process")
    args = script_args(task, out, "--kd_cache", str(task.cache))
    result = run_script("run_glue_distill.py", args)
    assert "1 process(es) x 16 rows x 1 accumulation = 16 rows per step" in result.stdout
    return out


def test_one_process_from_the_cache_trains_saves_and_evaluates(task, one_process):
    logs = train_logs(one_process)
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    assert all(h["kd_soft"] > 0 and h["kd_hard"] > 0 for h in logs)
    assert 0.0 <= json.loads((one_process / "eval_results.json").read_text())["eval_accuracy"]
    saved = load_file(one_process / "model.safetensors")
    student = load_file(task.student / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in student.items()}
    assert any(not torch.equal(saved[k], student[k]) for k in student)  # it trained


def test_one_process_from_the_live_teacher_matches_its_cache(task, one_process, tmp_path):
    # The cache holds float32 logits of the same teacher on the same rows: the same run.
    result = run_script("run_glue_distill.py", script_args(task, tmp_path,
                                                           "--kd_teacher", str(task.teacher)))
    assert "a live teacher (replicate" in result.stdout
    torch.testing.assert_close(losses(tmp_path, "kd_soft"), losses(one_process, "kd_soft"),
                               rtol=1e-5, atol=1e-6)


def test_the_stock_script_trains_without_distillation(task, one_process, tmp_path):
    run_script("run_glue.py", script_args(task, tmp_path))
    logs = train_logs(tmp_path)
    assert len(logs) == 4 and not any("kd_soft" in h for h in logs)
    # Its loss is the cross-entropy alone: the distilled run's hard part at step 1.
    assert logs[0]["loss"] == pytest.approx(train_logs(one_process)[0]["kd_hard"], rel=1e-4)


def test_the_stock_script_saves_its_label_names(task, tmp_path):
    """A model that starts without id2label (transformers would save LABEL_0, LABEL_1, which
    `kdscale cache` cannot match to the data) leaves the script with the data's label names."""
    unnamed = AutoModelForSequenceClassification.from_pretrained(task.student)
    unnamed.config.id2label = {0: "LABEL_0", 1: "LABEL_1"}
    unnamed.config.label2id = {"LABEL_0": 0, "LABEL_1": 1}
    unnamed.save_pretrained(tmp_path / "unnamed")
    assert "id2label" not in (tmp_path / "unnamed" / "config.json").read_text()
    run_script("run_glue.py", script_args(task, tmp_path / "out", "--model_name_or_path",
                                          str(tmp_path / "unnamed"), "--tokenizer_name",
                                          str(task.student), steps=1))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["id2label"] == {"0": "0", "1": "1"}
    assert saved["label2id"] == {"0": 0, "1": 1}


@pytest.mark.parametrize("stage, teacher, batch, accumulation", [
    ("ddp", "replicate", 8, 1),  # plain DDP over gloo, a teacher copy per process
    ("zero2", "cache", 4, 2),  # 2 processes x 4 rows x 2 accumulation = 16 rows
    ("zero3", "zero3", 8, 1),  # the teacher on its own ZeRO-3 engine beside the student's
    ("zero3", "replicate", 4, 2),  # a whole teacher, though the student's config is ZeRO-3
])
def test_two_processes_follow_the_one_process_run(task, one_process, tmp_path, stage, teacher,
                                                  batch, accumulation):
    source = (["--kd_cache", str(task.cache)] if teacher == "cache" else
              ["--kd_teacher", str(task.teacher), "--kd_teacher_placement", teacher])
    if stage != "ddp":
        source += ["--deepspeed", str(REPO / "configs" / "deepspeed" / f"{stage}.json")]
    args = script_args(task, tmp_path, *source, "--gradient_accumulation_steps",
                       str(accumulation), batch_size=batch)
    result = run_script("run_glue_distill.py", args, launch=True,
                        env=probe_env(tmp_path / "probe"))
    assert f"2 process(es) x {batch} rows x {accumulation} accumulation = 16 rows per step" \
        in result.stdout
    # end_process(): no rank meets its groups' gloo threads in the interpreter's teardown.
    assert exit_marks(tmp_path / "probe") == EXIT_HANDLERS_ONLY
    if teacher != "cache":
        assert f"a live teacher ({teacher}," in result.stdout
    torch.testing.assert_close(losses(tmp_path, "kd_soft", "kd_hard"),
                               losses(one_process, "kd_soft", "kd_hard"), rtol=2e-3, atol=1e-5)
    assert eval_loss(tmp_path) == pytest.approx(eval_loss(one_process), rel=2e-3)
    # The saved model is the student, gathered from its shards; nothing of the teacher.
    # (Under ZeRO-3 transformers writes LayerNorm weights by their legacy names, gamma and
    # beta, which from_pretrained maps back: compare the loaded models.)
    saved, reference = (AutoModelForSequenceClassification.from_pretrained(out).state_dict()
                        for out in (tmp_path, one_process))
    assert saved.keys() == reference.keys()
    assert len(load_file(tmp_path / "model.safetensors")) == len(reference)
    for name, weight in reference.items():
        torch.testing.assert_close(saved[name], weight, rtol=1e-2, atol=1e-3)


def deepspeed_json(tmp_path: Path, train_batch_size) -> Path:
    """configs/deepspeed/zero2.json with a train_batch_size, as Hugging Face examples write it."""
    config = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**config, "train_batch_size": train_batch_size}))
    return path


@pytest.mark.parametrize("train_batch_size", ["auto", 16])
def test_a_deepspeed_train_batch_size_counts_every_process(task, one_process, tmp_path,
                                                           train_batch_size):
    """2 processes x 4 rows x 2 accumulation: "auto" resolves to 16, and 16 is taken."""
    args = script_args(task, tmp_path, "--kd_cache", str(task.cache), "--deepspeed",
                       str(deepspeed_json(tmp_path, train_batch_size)),
                       "--gradient_accumulation_steps", "2", batch_size=4)
    result = run_script("run_glue_distill.py", args, launch=True)
    assert "2 process(es) x 4 rows x 2 accumulation = 16 rows per step" in result.stdout
    torch.testing.assert_close(losses(tmp_path, "kd_soft", "kd_hard"),
                               losses(one_process, "kd_soft", "kd_hard"), rtol=2e-3, atol=1e-5)


def test_a_deepspeed_batch_of_another_launch_is_refused_in_one_line(task, tmp_path):
    args = script_args(task, tmp_path, "--kd_cache", str(task.cache), "--deepspeed",
                       str(deepspeed_json(tmp_path, 8)), "--gradient_accumulation_steps", "2",
                       batch_size=4)
    result = subprocess.run(launch_command(EXAMPLE / "run_glue_distill.py", *args), cwd=REPO,
                            env=LAUNCH_ENV, capture_output=True, text=True, timeout=TIMEOUT)
    line = (f"kdscale: error: --deepspeed {tmp_path / 'ds.json'}: values that contradict the "
            f"training arguments (ds train_batch_size=8 vs hf train_batch_size (calculated)=16); "
            f"expected \"auto\" (the arguments' value) or equal values")
    assert result.returncode != 0
    # The first process to refuse makes the launcher stop the other, which may be killed
    # before it prints: one or two copies of the line, and no other error.
    errors = [text for text in result.stderr.splitlines() if text.startswith("kdscale: error")]
    assert 1 <= len(errors) <= 2 and set(errors) == {line}
    assert not (tmp_path / "trainer_state.json").exists()
    assert not list(tmp_path.glob("checkpoint-*"))  # refused before any step


def test_a_launch_without_multi_gpu_trains_alone_and_says_so(task, one_process, tmp_path):
    """accelerate launch --num_processes 2, no --multi_gpu: one process runs (accelerate's
    doing); kdscale names the missing flag, and the run is the one-process run."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(EXAMPLE / "run_glue_distill.py"),
               *script_args(task, tmp_path, "--kd_cache", str(task.cache))]
    result = subprocess.run(command, cwd=REPO, env=LAUNCH_ENV, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "add --multi_gpu" in line]
    assert len(warnings) == 1 and warnings[0].startswith("accelerate launch was asked for "
                                                         "several processes")
    assert "1 process(es) x 16 rows x 1 accumulation = 16 rows per step" in result.stdout
    torch.testing.assert_close(losses(tmp_path, "kd_soft"), losses(one_process, "kd_soft"))
