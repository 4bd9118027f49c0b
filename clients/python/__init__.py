"""latentcast Python client."""
