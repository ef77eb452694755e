"""shoal node package."""
