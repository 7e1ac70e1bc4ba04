"""medtune.train."""
