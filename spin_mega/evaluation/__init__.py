"""Evaluation of a model between iterations: held-out metrics (heldout.py), lm-evaluation-harness tasks
(leaderboard.py) and the paired significance test the report's verdict rests on (significance.py)."""
