"""`kdscale cache` never loses a good cache and repairs a damaged one: a replacement is built
beside and swapped in only when complete, a bad teacher stops the job before any shard, and
the damaged shards of a complete cache are rewritten alone, to the teacher's own bytes."""

from __future__ import annotations

import json

import pytest

from kdscale.cache import LogitCache
from kdscale.errors import KdscaleError
from tests.support.bad_cases import (
    CLASSIFIER,
    flip_a_bit,
)
from tests.support.bad_input import (
    changed,
    copy_tree,
    nan_logits,
    resave_teacher,
    run_command,
    set_,
    snapshot,
    write_experiment,
)


def test_nan_teacher_stops_the_cache_job_before_a_shard_is_written(pipe, tmp_path):
    teacher = resave_teacher(pipe / "teacher", tmp_path / "teacher", set_(CLASSIFIER, float("nan")))
    config = write_experiment(pipe, tmp_path / "experiment.yaml", output_dir=str(tmp_path),
                              teacher={"checkpoint": str(teacher), "placement": "replicate"},
                              cache={"dir": str(tmp_path / "cache")})
    before = snapshot(pipe)
    with pytest.raises(KdscaleError, match=r"teacher logits are not finite for example ids"):
        run_command("cache", config)
    assert changed(before, snapshot(pipe)) == []
    assert not list((tmp_path / "cache").glob("shard-*")) and not list(
        (tmp_path / "cache").glob("manifest.json"))


def test_overwrite_builds_beside_the_cache_and_swaps_it_in_when_complete(pipe, tmp_path):
    cache = copy_tree(pipe / "cache", tmp_path / "cache")
    config = write_experiment(pipe, tmp_path / "experiment.yaml", output_dir=str(tmp_path),
                              cache={"dir": str(cache), "overwrite": True},
                              data={"max_train_examples": 40})
    run_command("cache", config)
    assert json.loads((cache / "manifest.json").read_text())["num_examples"] == 40
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert len(LogitCache(cache)) == 40


def linked_out(cache):
    """A shard swapped for a link to a file outside the cache (a copy of other bytes)."""
    shard = cache / "shard-00001.safetensors"
    outside = cache.parent / "elsewhere.safetensors"
    outside.write_bytes(b"not this cache's shard")
    shard.unlink()
    shard.symlink_to(outside)


@pytest.mark.parametrize("damage", [
    flip_a_bit,
    lambda c: (c / "shard-00002.safetensors").write_bytes(b"\0" * 8),  # truncated
    lambda c: (c / "shard-00000.safetensors").unlink(),
    nan_logits,
    linked_out,
], ids=["flipped bit", "truncated", "missing", "NaN values", "linked out"])
def test_kdscale_cache_rewrites_just_the_damaged_shards(pipe, tmp_path, damage, capsys):
    """What distill's refusal advises works: `kdscale cache` finds the damaged shards of a
    complete cache and rewrites those alone, to the bytes the teacher wrote the first time."""
    cache = copy_tree(pipe / "cache", tmp_path / "cache")
    damage(cache)
    config = write_experiment(pipe, tmp_path / "experiment.yaml", output_dir=str(tmp_path),
                              cache={"dir": str(cache)})
    untouched = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*")}
    run_command("cache", config)
    assert "rewriting damaged shard(s)" in capsys.readouterr().out
    assert snapshot(cache) == {k.replace(str(pipe), str(tmp_path)): v
                               for k, v in snapshot(pipe / "cache").items()
                               if not k.endswith("build.json")} | {
        str(cache / "build.json"): snapshot(cache)[str(cache / "build.json")]}
    rewritten = [name for name, mtime in untouched.items()
                 if (cache / name).stat().st_mtime_ns != mtime]
    assert len(rewritten) <= 1 or damage is nan_logits
    if damage is linked_out:  # replaced by a file of its own, never written through the link
        assert (tmp_path / "elsewhere.safetensors").read_bytes() == b"not this cache's shard"


def test_a_damaged_manifest_is_rebuilt_beside_with_overwrite(pipe, tmp_path):
    cache = copy_tree(pipe / "cache", tmp_path / "cache")
    (cache / "manifest.json").write_text("{")
    config = write_experiment(pipe, tmp_path / "experiment.yaml", output_dir=str(tmp_path),
                              cache={"dir": str(cache)})
    with pytest.raises(KdscaleError, match="holds a damaged manifest .*--cache.overwrite true"):
        run_command("cache", config)
    run_command("cache", config, ["--cache.overwrite", "true"])
    assert LogitCache(cache).manifest.num_examples == 48
