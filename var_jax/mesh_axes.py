"""The device mesh's axis names, which every layer agrees on.

A mesh has up to three axes: "data" and "fsdp" split the batch (fsdp also splits every weight
along its width, gathered per layer), "tensor" splits attention heads, MLP and vocabulary
(`var_jax.parallel.sharding` maps the model's logical axes onto them).
"""

# The mesh axes a batch is split over, in this order; "tensor" splits weights, never the batch.
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")
# The mesh axis that attention heads are split over.
HEAD_AXIS = "tensor"
