"""Tests for medtune.train (a package so that test file names may repeat across folders)."""
