"""Masked-LM distillation end to end: masks fixed by seed and example id, a top-k cache of
the teacher at the masked positions written by 2 processes, a student distilled from it,
and a cache built with other masks refused."""

from __future__ import annotations

import pytest
import torch

from kdscale.cache import LogitCache
from kdscale.commands.cache import cached_rows, plan_job
from kdscale.commands.demo import build_demo_tokenizer
from kdscale.config import ConfigError, config_from_dict
from kdscale.distributed import process_state
from kdscale.models import load_tokenizer
from kdscale.plan.estimates import cache_estimate
from kdscale.plan.sizes import model_sizes
from kdscale.tasks import get_task
from kdscale.tasks.mlm import Masker
from tests.support.pipeline import (
    accelerate_launch,
    distill_and_evaluate,
    kdscale,
    small_task_config,
)

pytestmark = pytest.mark.slow  # real launches: scheduled first (tests/conftest.py)

K = 8


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """configs/mlm_local.yaml, smaller and shorter, with its teacher fine-tuned."""
    root = tmp_path_factory.mktemp("mlm")
    path, config = small_task_config(
        "mlm_local", root, data={"max_train_examples": 96, "max_eval_examples": 32,
                                 "mask_seed": 3},
        cache={"k": K, "shard_rows": 32, "batch_size": 16})
    result = kdscale("finetune", "--config", str(path), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, path, config


@pytest.fixture(scope="module")
def cached(experiment):
    """The experiment with its cache, written by 2 processes."""
    root, path, config = experiment
    two = accelerate_launch("-m", "kdscale", "cache", "--config", str(path))
    assert two.returncode == 0, two.stderr[-3000:]
    return experiment


def masked(config: dict, split: str = "train", **data):
    cfg = config_from_dict({**config, "data": {**config["data"], **data}})
    return get_task("mlm").load_split(cfg, load_tokenizer(cfg.teacher.tokenizer), split)


def test_masks_depend_on_the_seed_and_example_alone(experiment):
    _, _, config = experiment
    first, again = masked(config), masked(config)
    assert first.fingerprint == again.fingerprint
    assert first.dataset["labels"] == again.dataset["labels"]
    other = masked(config, mask_seed=4)
    assert other.fingerprint != first.fingerprint
    assert other.dataset["labels"] != first.dataset["labels"]
    # A subset masks its examples exactly as the whole set does (ids and the seed decide).
    subset = masked(config, max_train_examples=10)
    assert subset.dataset["labels"] == first.dataset["labels"][:10]


def test_the_masks_follow_the_bert_recipe():
    tokenizer = build_demo_tokenizer()
    masker = Masker(tokenizer, 0.15, seed=0)
    words = "the film is good but the plot is slow and dull".split()
    encoded = tokenizer(" ".join(words * 4), return_special_tokens_mask=True)
    chosen = replaced = 0
    for example_id in range(400):
        ids, labels = masker(encoded["input_ids"], encoded["special_tokens_mask"], example_id)
        positions = [i for i, label in enumerate(labels) if label != -100]
        assert len(positions) == round(0.15 * (len(ids) - 2))
        assert 0 not in positions and len(ids) - 1 not in positions  # [CLS], [SEP] kept
        assert all(labels[i] == encoded["input_ids"][i] for i in positions)
        chosen += len(positions)
        replaced += sum(ids[i] == tokenizer.mask_token_id for i in positions)
    assert 0.75 < replaced / chosen < 0.85  # 80% become [MASK]


def test_a_tokenizer_of_special_tokens_alone_is_refused():
    """Such a tokenizer maps every word to [UNK]: nothing could be masked and predicted, and
    a random replacement token would be drawn forever."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials)},
                                                    unk_token="[UNK]")),
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]")
    with pytest.raises(ConfigError, match="tokens are all special ones"):
        Masker(tokenizer, 0.15, seed=0)


def test_cache_of_two_processes_matches_one_and_holds_the_masked_positions(cached):
    root, path, config = cached
    one_dir = root / "cache-one"
    one = kdscale("cache", "--config", str(path), "--cache.dir", str(one_dir), cwd=root)
    assert one.returncode == 0, one.stderr[-3000:]
    shards = sorted(p.name for p in (root / "run" / "cache").glob("shard-*.safetensors"))
    assert shards == sorted(p.name for p in one_dir.glob("shard-*.safetensors"))
    for name in shards:  # the same masks on every rank and every rerun: the same bytes
        assert (root / "run" / "cache" / name).read_bytes() == (one_dir / name).read_bytes()

    cache = LogitCache(root / "run" / "cache")
    data = masked(config)
    labels = data.dataset["labels"]
    assert cache.per_position and cache.manifest.k == K
    assert cache.manifest.masking == {"seed": 3, "probability": 0.15, "recipe": "bert-80-10-10"}
    assert cache.manifest.num_rows == sum(sum(x != -100 for x in row) for row in labels)
    # What kdscale cache sizes a shard's memory by, before any forward: its rows, exactly.
    job = plan_job(config_from_dict(config), process_state())
    assert [cached_rows(job, shard) for shard in range(len(job.plan.shards))] == [
        shard["rows"] for shard in cache.manifest.shards]
    ids = torch.tensor(data.dataset["example_id"][:4])
    topk = cache.get_topk(ids)
    want = [i for row in labels[:4] for i, x in enumerate(row) if x != -100]
    assert topk.positions.tolist() == want
    # `kdscale env` sized it before it was written: an upper bound (every example full length)
    planned = config_from_dict({**config, "cache": {**config["cache"], "dir": str(one_dir / "x")}})
    estimate = cache_estimate(planned, model_sizes(planned))["bytes"]
    assert cache_bytes(cache) <= estimate <= 3 * cache_bytes(cache)


def cache_bytes(cache: LogitCache) -> int:
    return sum(s["bytes"] for s in cache.manifest.shards)


def test_cached_values_are_the_teachers_top_k(cached):
    root, _, config = cached
    cache = LogitCache(root / "run" / "cache")
    data = masked(config)
    teacher = get_task("mlm").from_pretrained(root / "run" / "teacher").eval()
    row = data.dataset[0]
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0]
    positions = [i for i, x in enumerate(row["labels"]) if x != -100]
    values, indices = logits[positions].topk(K, dim=-1)
    cached = cache.get_topk([row["example_id"]])
    torch.testing.assert_close(cached.values.float(), values, atol=2e-3, rtol=2e-3)  # fp16
    assert torch.equal(cached.indices, indices.long())


def test_student_distils_from_the_cache_and_is_evaluated(cached):
    root, path, _ = cached
    log, report = distill_and_evaluate(root, path)
    assert [r["step"] for r in log if "loss" in r] == [2, 4, 6]
    assert all(r["soft"] > 0 and r["hard"] > 0 for r in log if "loss" in r)
    assert report["student"]["layers"] == 2 and report["teacher"]["layers"] == 4
    for model in ("teacher", "student"):
        assert 0 <= report[model]["accuracy"] <= 1 and report[model]["perplexity"] > 1
        assert report[model]["masked_tokens"] > 0


def test_a_cache_built_with_other_masks_is_refused(cached):
    root, path, _ = cached
    result = kdscale("distill", "--config", str(path), "--data.mask_seed", "4",
                     "--output_dir", str(root / "other"), "--cache.dir",
                     str(root / "run" / "cache"), "--teacher.checkpoint",
                     str(root / "run" / "teacher"), cwd=root)
    assert result.returncode == 2
    assert "masking: cache has {'seed': 3" in result.stderr
    assert "expected {'seed': 4" in result.stderr


def test_a_tail_cache_holds_the_mass_off_the_top_k_and_serves_its_temperature_only(experiment):
    root, path, config = experiment
    tail_dir = str(root / "tail_cache")
    common = ["--config", str(path), "--cache.dir", tail_dir, "--cache.tail", "true",
              "--teacher.checkpoint", str(root / "run" / "teacher")]
    result = kdscale("cache", *common, "--loss.temperature", "2", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    cache = LogitCache(tail_dir)
    assert cache.manifest.tail_temperature == 2.0
    row = masked(config).dataset[0]
    teacher = get_task("mlm").from_pretrained(root / "run" / "teacher").eval()
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0]
    positions = [i for i, x in enumerate(row["labels"]) if x != -100]
    probs = torch.softmax(logits[positions] / 2.0, dim=-1)
    want = 1 - probs.topk(K, dim=-1).values.sum(dim=-1)
    torch.testing.assert_close(cache.get_topk([row["example_id"]]).tail, want, atol=1e-5,
                               rtol=1e-4)
    other = kdscale("distill", *common, "--loss.temperature", "3", "--output_dir",
                    str(root / "tail_t3"), cwd=root)
    assert other.returncode == 2
    assert "holds tails at temperature 2, and loss.temperature is 3" in other.stderr
    same = kdscale("distill", *common, "--loss.temperature", "2", "--output_dir",
                   str(root / "tail_t2"), cwd=root)
    assert same.returncode == 0, same.stderr[-3000:]


def test_the_cache_audits_its_top_k_against_the_full_teacher(cached):
    """Stored in the manifest and printed: the mass the k slots cover, and the loss and
    gradient errors of top-k alone and with a tail, for a uniform student."""
    root, _, _ = cached
    audit = LogitCache(root / "run" / "cache").manifest.audit
    assert audit["k"] == K and 0 < audit["rows"] <= 512
    assert 0 < audit["mass_covered_min"] <= audit["mass_covered"] < 1
    # A tail slot carries the missing mass: its loss is closer to the full teacher's.
    assert audit["topk_tail"]["loss_error"] < audit["topk"]["loss_error"]
    assert audit["topk_tail"]["grad_error"] < audit["topk"]["grad_error"]


def test_a_sampled_cache_is_the_same_from_one_process_or_two_and_trains_a_student(experiment):
    root, path, _ = experiment
    teacher = ["--teacher.checkpoint", str(root / "run" / "teacher")]
    common = ["--config", str(path), "--cache.kind", "sampled", "--loss.temperature", "2",
              *teacher]
    one = kdscale("cache", *common, "--cache.dir", str(root / "sampled1"), cwd=root)
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch("-m", "kdscale", "cache", *common, "--cache.dir",
                            str(root / "sampled2"))
    assert two.returncode == 0, two.stderr[-3000:]
    shards = [[s["sha256"] for s in LogitCache(root / name).manifest.shards]
              for name in ("sampled1", "sampled2")]
    assert shards[0] == shards[1]
    cache = LogitCache(root / "sampled1")
    assert cache.manifest.sampling == {"draws": K, "temperature": 2.0, "seed": 42}
    rows = cache.get_topk(cache.example_ids()[:4])
    counts = torch.where(rows.indices >= 0, (rows.values.float() / 2).exp(), 0.0).sum(dim=1)
    torch.testing.assert_close(counts, torch.full_like(counts, float(K)), rtol=1e-3, atol=1e-3)
    student = kdscale("distill", *common, "--cache.dir", str(root / "sampled1"),
                      "--output_dir", str(root / "sampled_student"), cwd=root)
    assert student.returncode == 0, student.stderr[-3000:]


def test_an_int8_cache_is_the_same_from_one_process_or_two_and_trains_a_student(experiment):
    """cache.dtype int8: uint16 indices (the vocabulary fits), int8 codes and a float16 grid
    per row, audited against the unquantized rows; the student reads it dequantized."""
    root, path, _ = experiment
    common = ["--config", str(path), "--cache.dtype", "int8",
              "--teacher.checkpoint", str(root / "run" / "teacher")]
    one = kdscale("cache", *common, "--cache.dir", str(root / "int8_1"), cwd=root)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "stored as int8, topk rows add a loss error of" in one.stdout
    two = accelerate_launch("-m", "kdscale", "cache", *common, "--cache.dir",
                            str(root / "int8_2"))
    assert two.returncode == 0, two.stderr[-3000:]
    shards = [sorted((root / name).glob("shard-*.safetensors")) for name in ("int8_1", "int8_2")]
    assert [s.name for s in shards[0]] == [s.name for s in shards[1]]
    for one_shard, two_shard in zip(*shards, strict=True):
        assert one_shard.read_bytes() == two_shard.read_bytes()
    cache = LogitCache(root / "int8_1")
    assert (cache.manifest.dtype, cache.manifest.index_dtype) == ("int8", "uint16")
    stored = cache.manifest.audit["stored"]
    assert (stored["kind"], stored["dtype"]) == ("topk", "int8")
    assert 0 < stored["grad_error"] < 0.05 and stored["loss_error"] < 0.01
    student = kdscale("distill", *common, "--cache.dir", str(root / "int8_1"),
                      "--output_dir", str(root / "int8_student"), cwd=root)
    assert student.returncode == 0, student.stderr[-3000:]
