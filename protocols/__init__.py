"""shoal protocols package."""
