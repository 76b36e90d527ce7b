"""Helpers that build tiny real-format checkpoints and audio for tests and examples."""
