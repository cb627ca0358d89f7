"""Shared fixtures: an offline word-level tokenizer and a tiny random BERT teacher.

Nothing is downloaded: the hub is switched off, and `datasets` caches into a temporary
directory rather than the user's home (both set here, before `datasets` is first imported);
DeepSpeed builds its ops in the environment's own folder.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each worker shares the cores with the others: one thread apiece, so parallel tests
    # (and the processes they launch) do not oversubscribe the machine.
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_DATASETS_CACHE = tempfile.mkdtemp(prefix="kdscale-tests-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE  # never the user's own cache
atexit.register(shutil.rmtree, _DATASETS_CACHE, ignore_errors=True)
if os.access(sys.prefix, os.W_OK):
    # DeepSpeed compiles its CPU communication op at first use into one folder per user, and
    # relinks it whenever another environment's paths differ: two checkouts' tests at once
    # would rebuild it under each other. One folder per environment, built once there.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from kdscale.commands.demo import build_demo_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return build_demo_tokenizer()


@pytest.fixture
def teacher(tokenizer):
    """A 4-layer BERT classifier with seeded random weights, in eval mode (no dropout)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, num_labels=2))
    return model.eval()


def pytest_configure(config):
    """Keep the order below: pytest-xdist would otherwise hand out files by their number of
    tests, which sends long files of few tests last."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    """Slow end-to-end files first: parallel workers take whole files in collection order,
    and a long file taken last would leave one worker running it alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """One short `kdscale demo` run (teacher, cache, student, report) shared by the tests
    that need a real pipeline's files; under pytest-xdist the first worker to need it
    builds it and the others wait for it and read the same files."""
    from filelock import FileLock

    from tests.support.pipeline import QUICK, kdscale

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder every worker's own temporary folder sits in
    out = root / "quick-demo" / "run"
    with FileLock(str(root / "quick-demo.lock")):
        if not (out / "report.json").is_file():
            shutil.rmtree(out.parent, ignore_errors=True)  # a build that died half-way
            out.parent.mkdir()
            result = kdscale("demo", "--output_dir", str(out), *QUICK, cwd=out.parent)
            assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A tiny finished pipeline (teacher, cache, a checkpointed run) built in-process in
    about a second, for the bad-input and safe-loading tests to copy and damage."""
    from tests.support.bad_input import build_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    build_pipeline(root)
    return root


@pytest.fixture
def sst2():
    """The SST-2 folder beside the repository (../shared/data/sst2). Where it is missing a
    test skips, except in CI (CI=true), where a missing folder is a failure: a suite that
    skipped its real-data tests must not pass there."""
    from tests.support.sst2 import TRAIN

    if not TRAIN.is_file():
        message = f"SST-2 not found at {TRAIN} (read from ../shared/data/sst2)"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(message)
        pytest.skip(message)
    return TRAIN.parent


def pytest_terminal_summary(terminalreporter):
    """The fault tests' seed, printed after any run of them (under -q too): a run that
    passed says which faults it covered, and one that failed how to replay them."""
    reports = [r for reports in terminalreporter.stats.values() for r in reports]
    if any(getattr(r, "nodeid", "").startswith("tests/faults/") for r in reports):
        from tools.faults.sample import SEED_VARIABLE, fault_seed

        terminalreporter.write_line(f"fault seed {fault_seed()}: {SEED_VARIABLE}="
                                    f"{fault_seed()} reruns these faults")
