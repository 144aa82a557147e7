"""megascope's public API for your own training loop (placeholder)."""
