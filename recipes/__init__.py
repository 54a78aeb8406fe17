"""medssl recipes: one module + one YAML per pretraining method (in progress)."""
