"""The harness's offline lm-eval task configs (YAML templates) and the Python hooks they use.

Each ``*.yaml`` here names its data as ``${HARNESS_DATA_DIR}/capability_eval/...``;
``evaluators.capability.render_local_tasks`` writes them with absolute paths into a work directory,
which is what lm-eval's ``TaskManager(include_path=...)`` then reads.
"""
