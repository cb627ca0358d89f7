"""What `kdscale env` estimates before a launch: batches, ZeRO settings, model sizes, the
teacher's placement, the cache's size and the memory per process."""
