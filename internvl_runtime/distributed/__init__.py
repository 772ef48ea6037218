"""Tensor parallelism over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

- ``parallel_state``: the group, its collectives and timeouts, start-up checks of the launch.
- ``layers``: which decoder layer is split how (data), the parallel layers, per-rank slice reads.
- ``worker``: the lock-step loop (rank 0 drives, workers follow) and rank 0's runner.
- ``launch``: torchrun / spawned-process glue for ``pipeline(..., tensor_parallel_size=N)`` and ``serve``.
"""
