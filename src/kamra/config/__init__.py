"""Configuration keys, effective configuration and resource plans (DESIGN.md, "Configuration model").

``keys`` is the one registry of keys (validator, doc, default, live-ness); ``resolve``
layers defaults <- plan <- container overrides; ``plans`` stores named sets of values.
"""
