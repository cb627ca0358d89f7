"""Run under `accelerate launch` with 2 processes: trains a small model with kdscale's
Accelerator and loop on different data per rank, then writes whether the ranks' weights
are identical afterwards (they are only when gradients are all-reduced)."""

import json
import sys

import torch

from kdscale.config import TrainConfig
from kdscale.train.accelerator import make_accelerator
from kdscale.train.loop import train_loop


def main(out_path: str) -> None:
    train = TrainConfig(epochs=1, batch_size=4, learning_rate=0.1, warmup_ratio=0.0,
                        log_every=1)
    accelerator = make_accelerator(train, seed=0)
    model = torch.nn.Linear(3, 2)
    initial = torch.cat([p.detach().flatten() for p in model.parameters()])
    # Each rank's data differs, so only all-reduced gradients keep the ranks' weights equal.
    generator = torch.Generator().manual_seed(100 + accelerator.process_index)
    data = [{"x": torch.randn(3, generator=generator), "labels": torch.tensor(i % 2)}
            for i in range(16)]
    loader = torch.utils.data.DataLoader(  # global batches of 4: 2 rows per rank
        data, batch_size=4, collate_fn=lambda rows: {
            "x": torch.stack([r["x"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows])})

    def step(model, batch, timer):
        logits = model(batch["x"])
        return {"loss": torch.nn.functional.cross_entropy(logits, batch["labels"],
                                                          reduction="sum")}

    model, history = train_loop(model, loader, step, train, accelerator, desc="sync check")
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = accelerator.gather(weights[None])  # (ranks, params)
    if accelerator.is_main_process:
        result = {"ranks": gathered.shape[0], "steps": len(history),
                  "distributed_type": accelerator.distributed_type.value,
                  "identical": bool((gathered == gathered[0]).all()),
                  "moved": bool((weights != initial).any())}
        with open(out_path, "w") as f:
            json.dump(result, f)
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()  # leave together: kdscale.distributed


if __name__ == "__main__":
    main(sys.argv[1])
