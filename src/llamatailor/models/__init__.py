"""Models: where they come from, their chat families, loading, and tiny test models."""
