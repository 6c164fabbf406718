"""Budgeted worst-case attack search: the strongest attack a budget finds, not the worst of a fixed grid.

A search file (:mod:`harness.search.space`) declares attack kinds and the ranges of their params;
Optuna (:mod:`harness.search.study`) proposes trials, each an ordinary cached run; the objective and
the capability/fluency constraint are read from the run's results.json (:mod:`harness.search.objective`);
:mod:`harness.search.report` turns the trials into the worst case and the trials-to-break curve.
"""
