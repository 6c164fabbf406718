"""Sharded training across processes (PyTorch FSDP2): process group, sharding, launch, rank-0 writes.

One process per device runs the whole pipeline; every rank joins each training stage (parameters,
gradients and optimizer state sharded with ``fully_shard``), and rank 0 alone writes the stage cache,
runs evaluations and writes results. Nothing here is imported by a single-process run except
``global_batch``, whose whole-batch helpers are identities there.
"""
