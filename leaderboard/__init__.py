"""Leaderboard: results aggregation, rendering and submissions (see the issues for its roadmap)."""
