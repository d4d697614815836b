"""Model definition, loading/saving and transformers registration."""
