"""Benchmark of the distillation loss: ``python -m kdscale.kernels.bench [--quick] [--out DIR]
[--plot]``; ``--help`` lists the flags that pick a subset of the sweep.

For each teacher (dense; top-k with k = 32, 64), dtype (bf16, fp32), rows N and outputs V:
forward and forward+backward time (median of ``triton.testing.do_bench``), bandwidth and
peak memory of one training step, for

    kdscale  ``kd_loss_terms_triton``: the fused kernel, the call training makes (``KDLoss.parts``
             in ``kdscale distill`` and the Trainer): one launch for the loss, its gradient
             and the soft and hard terms that training logs
    eager    ``kd_loss_terms_reference``: the pure-PyTorch definition, the same call
    compile  ``torch.compile(kd_loss_terms_reference)``, default settings
    liger    Liger-Kernel's ``LigerKLDIVLoss(reduction="batchmean", log_target=True)``, when
             installed; dense teacher only. It takes log-probabilities, so its inputs are
             ``log_softmax(z / T)`` of both logits, computed outside the timed region: its
             time leaves out the two softmaxes over each row that the others include, and the
             T^2 factor and the CE term; its gradient is w.r.t. the log-probabilities.

All compute ``alpha = 0.5, T = 2`` with training's arguments: ``reduction="sum"``, 10% of rows
ignored and 10% labelled by the teacher alone (``soft_only_index``, as augmented copies are),
inputs requiring grad (a training step); top-k values come in the logits' dtype with int32
indices, as in the logit cache.

Byte model (the least one training step must move): read the student logits once, read the
teacher once (dense: N*V logits; top-k: N*k values and indices), write the gradient once, plus
the labels. GB/s = model bytes / forward+backward time; "% copy" compares it with a 1 GiB
device-to-device copy timed in the same run (bytes read + written). The fused kernel itself
moves more than the model: it reads the student and a dense teacher twice (statistics, then
gradient), and its backward reads and writes the gradient once more to scale it by
grad_output; for a dense teacher that is 7 tensor passes against the model's 3.

Without CUDA the bench runs a tiny sanity sweep instead (kdscale in Triton's interpreter
against eager, fp32): it checks the harness and that the two agree; its times and GB/s say
nothing about the kernel's speed.
"""

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from . import kd_loss_terms_reference, kd_loss_terms_triton

SWEEP = dict(vocab=[2, 3, 1024, 8192, 30522, 50257, 128256], rows=[4096, 8192, 32768],
             dtype=["bf16", "fp32"], teacher=["dense", "topk32", "topk64"],
             provider=["kdscale", "eager", "compile", "liger"])
QUICK = dict(vocab=[2, 1024, 30522, 128256], rows=[8192], dtype=["bf16"],
             teacher=["dense", "topk32"])
CPU_SANITY = dict(vocab=[2, 3, 1271], rows=[16], dtype=["fp32"], teacher=["dense", "topk32"],
                  provider=["kdscale", "eager"])
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TEMPERATURE, ALPHA = 2.0, 0.5
SOFT_ONLY = -1  # the label of a row the teacher alone labelled (kdscale.data.augment.NO_LABEL)
TRAINING_CALL = dict(temperature=TEMPERATURE, alpha=ALPHA, soft_only_index=SOFT_ONLY,
                     reduction="sum")  # as KDLoss.parts calls kd_loss_terms in training
BYTE_MODEL = ("read student N*V + read teacher (N*V, or N*k values + indices) + write "
              "gradient N*V + labels N*8 bytes")


def make_case(rows, vocab, dtype, teacher, device, seed=0):
    """Inputs of one configuration: the student requires grad; 10% of rows ignored, 10%
    labelled by the teacher alone."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g, device=device).mul_(2).to(dtype)
    t = torch.randn(rows, vocab, generator=g, device=device).mul_(2).to(dtype)
    y = torch.randint(0, vocab, (rows,), generator=g, device=device)
    y[: rows // 10] = -100
    y[rows // 10: rows // 5] = SOFT_ONLY
    case = dict(student=s.requires_grad_(), labels=y, teacher_logits=t)
    if teacher.startswith("topk"):
        values, indices = t.topk(min(int(teacher[4:]), vocab), dim=-1)
        case.update(teacher_logits=None, teacher_topk_values=values,
                    teacher_topk_indices=indices.to(torch.int32))
    return case


def model_bytes(case):
    s = case["student"]
    teacher = [case["teacher_logits"]] if case["teacher_logits"] is not None else \
        [case["teacher_topk_values"], case["teacher_topk_indices"]]
    return 2 * s.numel() * s.element_size() + sum(x.numel() * x.element_size() for x in teacher) \
        + case["labels"].numel() * 8


def loss_fn(provider, case, compiled):
    """The leaf the gradient goes to, and a closure computing the provider's loss."""
    kw = {k: v for k, v in case.items() if k != "student"}
    kw.update(TRAINING_CALL)
    s = case["student"]
    if provider == "kdscale":
        return s, lambda: kd_loss_terms_triton(s, **kw).loss
    if provider == "eager":
        return s, lambda: kd_loss_terms_reference(s, **kw).loss
    if provider == "compile":
        return s, lambda: compiled(s, **kw).loss
    if case["teacher_logits"] is None:
        raise NotApplicable("dense teacher only")
    from liger_kernel.transformers import LigerKLDIVLoss

    log_q = torch.log_softmax(s.detach().float() / TEMPERATURE, -1).to(s.dtype)
    log_p = torch.log_softmax(case["teacher_logits"].float() / TEMPERATURE, -1).to(s.dtype)
    liger, log_q = LigerKLDIVLoss(reduction="batchmean", log_target=True), log_q.requires_grad_()
    return log_q, lambda: liger(log_q, log_p)


class NotApplicable(Exception):
    pass


def timed_ms(fn, grad_of, cuda):
    """Median milliseconds of fn() (gradients of grad_of reset between calls)."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, grad_to_none=[grad_of], return_mode="median")
    times = []
    for _ in range(3):
        grad_of.grad = None
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(provider, case, compiled, cuda):
    """Forward and forward+backward ms, peak extra MiB and the loss, for one provider."""
    leaf, forward = loss_fn(provider, case, compiled)
    loss = forward()  # warm-up: compiles and autotunes outside the timed region
    loss.backward()
    fwd = timed_ms(forward, leaf, cuda)
    fwd_bwd = timed_ms(lambda: forward().backward(), leaf, cuda)
    peak = None
    if cuda:
        leaf.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        forward().backward()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    leaf.grad = None
    return dict(fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, peak_mib=peak, loss=float(loss.detach()))


def copy_gbps(device):
    """Device-to-device copy of 1 GiB (64 MiB on CPU), bytes read + written per second."""
    n = 2**30 if device == "cuda" else 2**26
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), src, device == "cuda")
    return 2 * n / ms / 1e6


def run_sweep(sweep, device, copy):
    results = []
    for teacher in sweep["teacher"]:
        for dtype in sweep["dtype"]:
            compiled = None
            if "compile" in sweep["provider"]:
                torch._dynamo.reset()  # one compiled reference per teacher and dtype
                compiled = torch.compile(kd_loss_terms_reference)
            for rows in sweep["rows"]:
                for vocab in sweep["vocab"]:
                    results += run_config(sweep["provider"], teacher, dtype, rows, vocab,
                                          device, copy, compiled)
    return results


def run_config(providers, teacher, dtype, rows, vocab, device, copy, compiled):
    base = dict(teacher=teacher, dtype=dtype, rows=rows, vocab=vocab)
    try:
        case = make_case(rows, vocab, DTYPES[dtype], teacher, device)
    except torch.cuda.OutOfMemoryError:
        return [dict(base, provider=p, status="oom (inputs)") for p in providers]
    nbytes, out = model_bytes(case), []
    for provider in providers:
        row = dict(base, provider=provider, model_bytes=nbytes)
        try:
            row.update(measure(provider, case, compiled, device == "cuda"), status="ok")
            row["gbps"] = nbytes / row["fwd_bwd_ms"] / 1e6
            row["copy_fraction"] = row["gbps"] / copy
        except NotApplicable as e:
            row["status"] = f"n/a ({e})"
        except ImportError:
            row["status"] = "not installed"
        except torch.cuda.OutOfMemoryError:
            row["status"] = "oom"
        case["student"].grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
        out.append(row)
    for row in out:
        check_against_eager(row, out)
        print(format_row(row), flush=True)
    return out


def check_against_eager(row, rows):
    """Flags a loss that differs from eager's (both fp32 sums over the same inputs)."""
    eager = next((r for r in rows if r["provider"] == "eager" and r["status"] == "ok"), None)
    if eager is None or row["status"] != "ok" or row["provider"] in ("eager", "liger"):
        return
    row["rel_diff_vs_eager"] = abs(row["loss"] - eager["loss"]) / max(abs(eager["loss"]), 1e-6)
    if row["rel_diff_vs_eager"] > 1e-3:
        row["status"] = f"MISMATCH with eager: {row['rel_diff_vs_eager']:.1e} relative"


HEADER = (f"{'teacher':>7} {'dtype':>5} {'N':>6} {'V':>6} {'provider':>8} {'fwd ms':>8} "
          f"{'f+b ms':>8} {'GB/s':>7} {'% copy':>6} {'peak MiB':>9} {'loss':>9}  status")


def format_row(r):
    num = lambda key, fmt, width: (format(r[key], fmt) if r.get(key) is not None  # noqa: E731
                                   else "-").rjust(width)
    return (f"{r['teacher']:>7} {r['dtype']:>5} {r['rows']:>6} {r['vocab']:>6} "
            f"{r['provider']:>8} {num('fwd_ms', '.3f', 8)} {num('fwd_bwd_ms', '.3f', 8)} "
            f"{num('gbps', '.1f', 7)} {num('copy_fraction', '.0%', 6)} "
            f"{num('peak_mib', '.0f', 9)} {num('loss', '.4f', 9)}  {r['status']}")


def plot(results, copy, device, path):
    """GB/s against V, one panel per teacher and dtype at the largest N, a line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["teacher"], r["dtype"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (teacher, dtype) in zip(axes[0], panels, strict=True):
        rows = [r for r in results if (r["teacher"], r["dtype"]) == (teacher, dtype)]
        n = max(r["rows"] for r in rows)
        for provider in dict.fromkeys(r["provider"] for r in rows):
            points = sorted((r["vocab"], r["gbps"]) for r in rows if r["rows"] == n
                            and r["provider"] == provider and r.get("gbps"))
            if points:
                ax.plot([v for v, _ in points], [gbps for _, gbps in points], marker="o",
                        label=provider)
        ax.axhline(copy, color="gray", linestyle="--", label="device copy")
        ax.set(xscale="log", yscale="log", xlabel="V", ylabel="GB/s (byte model)",
               title=f"{teacher}, {dtype}, N = {n}")
        ax.legend()
    fig.suptitle(f"kd_loss, {device}: GB/s by the byte model: {BYTE_MODEL}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"a subset: {QUICK}")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    words = lambda s: s.split(",")  # noqa: E731
    p.add_argument("--vocab", type=ints, help="comma-separated V values")
    p.add_argument("--rows", type=ints, help="comma-separated N values")
    p.add_argument("--dtype", type=words, help="bf16,fp32")
    p.add_argument("--teacher", type=words, help="dense,topk32,topk64 (topkK for any K)")
    p.add_argument("--provider", type=words, help="kdscale,eager,compile,liger")
    p.add_argument("--out", type=Path, help="directory for kd_loss_bench.json (and .png)")
    p.add_argument("--plot", action="store_true", help="draw GB/s against V (needs --out)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # Before triton is first imported: the kernel runs in the interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # numpy, in the interpreter, warns on the inf - inf of masked lanes that are dropped
        warnings.filterwarnings("ignore", "(invalid value|divide by zero)", RuntimeWarning)
        print("No CUDA device: a sanity sweep of the kernel in Triton's interpreter against "
              "eager; the times and GB/s below say nothing about the kernel's speed.")
    sweep = dict(SWEEP if device == "cuda" else CPU_SANITY)
    sweep.update(QUICK if args.quick and device == "cuda" else {})
    sweep.update({k: getattr(args, k) for k in SWEEP if getattr(args, k)})
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    copy = copy_gbps(device)
    print(f"device: {name}; copy bandwidth {copy:.0f} GB/s (read + write)\n"
          f"byte model: {BYTE_MODEL}; the call: kd_loss_terms({TRAINING_CALL})\n{HEADER}")
    results = run_sweep(sweep, device, copy)
    report = dict(device=name, torch=torch.__version__, copy_gbps=copy, byte_model=BYTE_MODEL,
                  call=dict(function="kd_loss_terms", **TRAINING_CALL), sweep=sweep,
                  results=results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kd_loss_bench.json").write_text(json.dumps(report, indent=1) + "\n")
        if args.plot:
            plot(results, copy, name, args.out / "kd_loss_bench.png")
        print(f"wrote {args.out / 'kd_loss_bench.json'}" + (" and .png" if args.plot else ""))
    return report


if __name__ == "__main__":
    main()
