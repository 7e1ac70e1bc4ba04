"""Tiny-model fixtures (owned by the training area): built in-process, nothing downloaded."""
