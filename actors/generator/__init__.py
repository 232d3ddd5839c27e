"""Generators: vLLM engine actors and the pool that drives them."""
