"""Model engines: one contract (engines/base.py), one module per engine kind."""
