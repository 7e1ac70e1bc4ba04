"""medtune.export."""
