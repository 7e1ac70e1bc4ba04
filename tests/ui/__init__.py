"""Tests for medtune.ui (a package so that test file names may repeat across folders)."""
