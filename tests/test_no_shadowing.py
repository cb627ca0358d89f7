"""Nothing in the checkout shadows an installed library.

Run from the repository root (`python -m ...`, `accelerate launch -m kdscale`, pytest's
`pythonpath`), the root is first on `sys.path`: a folder there that is a package named like an
installed library (a top-level `kernels/__init__.py` did, and transformers imports Hugging Face's
`kernels` when it loads a model) replaces that library in every process started there.
"""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter whose sys.path starts with the repository root, as `python -m`
# from the root has it. Prints where `import kernels` resolved: a file, a namespace or nothing.
WHERE_KERNELS_RESOLVES = """
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
spec = importlib.util.find_spec("kernels")
print(json.dumps(None if spec is None else {
    "origin": spec.origin, "locations": list(spec.submodule_search_locations or [])}))
"""

# Saves a small BERT and loads it back with transformers (the load that imports `kernels`).
LOAD_A_BERT = """
import sys, tempfile
sys.path.insert(0, sys.argv[1])
import torch
from transformers import BertConfig, BertForSequenceClassification
config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, num_labels=2)
with tempfile.TemporaryDirectory() as folder:
    BertForSequenceClassification(config).save_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder)
logits = model(input_ids=torch.tensor([[1, 5, 9, 2]])).logits
print(tuple(logits.shape))
"""


def _run_from_root(script):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script, str(ROOT)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def _installed_init(distribution, package):
    """The `__init__.py` that an installed distribution put down for `package`, or None."""
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(found.locate_file(f"{package}/__init__.py")).resolve()


def test_import_kernels_from_the_root_reaches_the_library_or_nothing():
    spec = json.loads(_run_from_root(WHERE_KERNELS_RESOLVES))
    library = _installed_init("kernels", "kernels")
    if library is not None:
        assert spec is not None and spec["origin"] is not None, spec
        assert Path(spec["origin"]).resolve() == library, f"`kernels` is {spec['origin']}"
    else:  # at most the bare folder, as a namespace with no code of ours
        assert spec is None or spec["origin"] is None, spec


def test_transformers_loads_and_runs_a_bert_from_the_root():
    assert _run_from_root(LOAD_A_BERT) == "(1, 2)"


def test_no_top_level_package_is_named_like_an_installed_library():
    installed = importlib.metadata.packages_distributions()
    ours = {"kdscale"}
    clashes = []
    for entry in ROOT.iterdir():
        name = entry.stem if entry.suffix == ".py" else entry.name
        importable = (entry / "__init__.py").exists() or entry.suffix == ".py"
        if importable and name not in ours and name in installed:
            clashes.append(f"{entry.name} (installed by {', '.join(installed[name])})")
    assert not clashes, f"shadow installed libraries when run from the root: {clashes}"
