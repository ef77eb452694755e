"""shoal net package."""
