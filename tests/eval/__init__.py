"""Tests for medtune.eval (a package so that test file names may repeat across folders)."""
