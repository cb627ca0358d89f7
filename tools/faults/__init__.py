"""Fault injection over real `kdscale cache` and `kdscale distill` jobs (2 processes, gloo).

`pipeline` builds a tiny experiment, `inject` starts jobs and delivers faults, `checks` compares
what survived with an uninterrupted run, `harness` runs N faults and reports the figures:

    python -m tools.faults.harness --kind cache --faults 20 --seed 0 --out cache.json
"""
