"""shoal trainer package."""
