"""Exporters: checkpoints that serving engines load."""
