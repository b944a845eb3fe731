"""Persistent state behind one small async interface (see base.Store)."""
