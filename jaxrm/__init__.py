"""jaxrm: a JAX research library for RLHF reward models."""
