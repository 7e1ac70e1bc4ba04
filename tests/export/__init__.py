"""Tests for medtune.export (a package so that test file names may repeat across folders)."""
