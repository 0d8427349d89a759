"""persrep: personalised visual representations from personalised generation, at cluster scale."""

__version__ = "0.1.0"
