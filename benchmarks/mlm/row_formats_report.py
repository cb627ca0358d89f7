"""The markdown table of benchmarks.mlm.row_formats' results."""

from __future__ import annotations


def _pct(x: float) -> str:
    return f"{x:.2%}" if x >= 1e-4 else f"{x:.1e}"


def _storage(errors: dict) -> str:
    added = errors.get("storage_adds")
    return "" if added is None else f"{_pct(added['loss_error'])} / {_pct(added['grad_error'])}"


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# Bytes per masked position and loss error of each cache row format", "",
        f"Device: {r['device']} ({r['torch_threads']} threads), commit {r['commit']}"
        f"{'' if r['clean_tree'] else ' (with uncommitted changes)'}; {r['seconds']} s. "
        f"Teacher: a random BERT masked LM ({r['teacher']['num_hidden_layers']} layers, hidden "
        f"{r['teacher']['hidden_size']}, vocabulary {r['teacher']['vocab_size']:,}), output "
        f"logits of std {s['logit_std']}; {r['positions']} masked positions of "
        f"{s['examples']} random sequences of {s['tokens']} tokens; T = {s['temperature']}.", "",
        "Errors against the full teacher, relative: loss |L - L_full| / L_full and gradient "
        "||g - g_full|| / ||g_full||, for a uniform student and one near the teacher (its "
        "logits plus noise of std 2). *Storage adds*: the rows read back against the same "
        "rows' exact values (loss / gradient). Bytes per position: the row's tensors by the "
        "formula of `kdscale.cache.sizes`, and the shards on disk over the positions (with "
        "each example's id and row count and the safetensors header).", "",
        "| format | k | bytes/position | on disk | top-k mass | loss err, uniform | "
        "grad err, uniform | loss err, near | grad err, near | storage adds, uniform | "
        "storage adds, near |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in r["formats"]:
        u, n = f["uniform"], f["near"]
        mass = f"{f['mass_covered']:.1%}" if "mass_covered" in f else "100%"
        lines.append(
            f"| {f['format']} | {f['k'] or 'all'} | {f['row_bytes']:,} | "
            f"{f['bytes_per_position']:,.1f} | {mass} | {_pct(u['loss_error'])} | "
            f"{_pct(u['grad_error'])} | {_pct(n['loss_error'])} | {_pct(n['grad_error'])} | "
            f"{_storage(u)} | {_storage(n)} |")
    return "\n".join(lines) + "\n"
