"""Tests for medtune.serve (a package so that test file names may repeat across folders)."""
