"""Leaderboard: aggregate results.json files over seeds and attacks, apply the capability and fluency
guards, render tables and a static site, and accept and verify submissions from outside groups."""
