"""Tests for medtune.tasks (a package so that test file names may repeat across folders)."""
