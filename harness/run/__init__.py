"""Configuring and executing runs: config, the stage pipeline, executors, sweeps, the stage cache."""
