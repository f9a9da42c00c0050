"""Parallel strategies: one module per ColossalAI plugin, with everything only that plugin does."""
