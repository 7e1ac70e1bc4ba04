"""medtune.serve."""
