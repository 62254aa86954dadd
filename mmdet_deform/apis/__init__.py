"""Explicit, opt-in steps a user calls on a built detector (each in its own
module, imported by name, e.g. ``mmdet_deform.apis.export``)."""
