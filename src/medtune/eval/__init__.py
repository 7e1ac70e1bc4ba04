"""medtune.eval."""
