"""SUPERB leaderboard submissions: the leaderboard's MAC protocol and the predict.zip upload."""
