"""medtune.ui."""
