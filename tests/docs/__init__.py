"""Tests for the documentation site (a package so that test file names may repeat across folders)."""
