"""medtune.data."""
