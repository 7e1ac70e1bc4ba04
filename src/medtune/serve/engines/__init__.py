"""medtune.serve.engines."""
