"""Backends: one module per implementation behind one launcher protocol (see protocol.py)."""
