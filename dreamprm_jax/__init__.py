"""DreamPRM in JAX/Flax: domain-reweighted process reward models with exact hypergradients."""

__version__ = "0.1.0"
